"""infra/ and jobs/configs: parse, validate against Kubernetes, KubeRay and Ray's own
schemas offline, agree with pyproject's versions, and name entry points that run."""

from __future__ import annotations

import copy
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from jobs.config import load_config
from jobs.run import parse_args
from pipeline.cluster import (
    GIB,
    ClusterCapacity,
    NodeShape,
    PoolRequest,
    capacity_problem,
    launcher_shapes,
)
from tests.infra.kuberay_schema import KUBERNETES_VERSION, validator

REPO_ROOT = Path(__file__).resolve().parents[2]
INFRA = REPO_ROOT / "infra"
IMAGE_WORKDIR = "/home/ray/dpt-annotate"  # where infra/docker/Dockerfile puts the repository
# What the README tells users to export before `envsubst`; nothing else may appear.
VARIABLES = {
    "IMAGE": "123456789012.dkr.ecr.us-west-2.amazonaws.com/dpt-annotate:0.1.0",
    "INPUT_URI": "s3://example-bucket/images/",
    "OUTPUT_URI": "s3://example-bucket/annotations/",
    "AWS_ROLE_ARN": "arn:aws:iam::123456789012:role/dpt-annotate",
}
MANIFESTS = sorted((INFRA / "kuberay").glob("*.yaml"))
YAML_FILES = sorted([*INFRA.rglob("*.yaml"), *(REPO_ROOT / "jobs").rglob("*.yaml")])


def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def pinned_ray_version() -> str:
    (pin,) = [dep for dep in pyproject()["project"]["dependencies"] if dep.startswith("ray[")]
    return pin.split("==")[1]


def envsubst_line(path: Path) -> str | None:
    """The file's header command `envsubst '...' < path`, if it uses variables at all."""
    found = re.findall(r"envsubst '[^']*' < \S+", path.read_text())
    assert len(found) <= 1, found
    return found[0] if found else None


def substituted(path: Path) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda match: VARIABLES[match.group(1)], path.read_text())


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(substituted(path)) if doc is not None]


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for path in MANIFESTS for doc in documents(path) if doc["kind"] == kind]


def cluster_specs() -> list[dict[str, Any]]:
    return [doc["spec"] for doc in by_kind("RayCluster")] + [
        doc["spec"]["rayClusterSpec"] for doc in by_kind("RayJob")
    ]


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [c for group in groups for c in group["template"]["spec"]["containers"]]


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_every_yaml_file_parses(path):
    assert [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifests_use_only_the_documented_variables_and_say_so(path):
    used = set(re.findall(r"\$\{(\w+)\}", path.read_text()))
    assert used <= set(VARIABLES), used - set(VARIABLES)
    # The envsubst line in the file's header lists exactly what the file uses,
    # so a forgotten variable cannot reach the cluster as a literal ${...}; a
    # file without variables is applied as it is.
    line = envsubst_line(path)
    if not used:
        assert line is None
        assert f"kubectl apply -f infra/kuberay/{path.name}" in path.read_text()
        return
    (listed,) = re.findall(r"envsubst '([^']*)'", line)
    assert set(re.findall(r"\$(\w+)", listed)) == used


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_kubernetes_objects_validate_against_the_kubernetes_schema(path):
    for doc in documents(path):
        if doc["apiVersion"] in ("ray.io/v1", "monitoring.coreos.com/v1"):
            errors = [
                f"{'.'.join(map(str, error.absolute_path))}: {error.message}"
                for error in validator(doc["kind"]).iter_errors(doc)
            ]
            assert not errors, errors
        else:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_kuberay_schema_rejects_what_kuberay_would():
    (cluster,) = by_kind("RayCluster")
    broken = copy.deepcopy(cluster)
    broken["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # must be a string
    broken["spec"]["workerGroupSpecs"][0]["maxReplica"] = 4  # typo
    broken["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["pullPolicy"] = "x"
    errors = list(validator("RayCluster").iter_errors(broken))
    assert len(errors) == 3, [error.message for error in errors]


def test_the_podmonitor_schema_rejects_what_the_prometheus_operator_would():
    (monitor,) = by_kind("PodMonitor")
    broken = copy.deepcopy(monitor)
    broken["spec"]["podMetricsEndpoint"] = broken["spec"].pop("podMetricsEndpoints")  # typo
    broken["spec"]["selector"]["matchLabel"] = {}  # typo, inside Kubernetes' LabelSelector
    errors = list(validator("PodMonitor").iter_errors(broken))
    assert len(errors) == 2, [error.message for error in errors]
    interval = copy.deepcopy(monitor)
    interval["spec"]["podMetricsEndpoints"][0]["interval"] = "30 seconds"
    assert list(validator("PodMonitor").iter_errors(interval))


def cron_container() -> dict[str, Any]:
    (cron,) = by_kind("CronJob")
    (container,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    return container


def test_scheduled_runs_never_overlap():
    (cron,) = by_kind("CronJob")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    job = cron["spec"]["jobTemplate"]["spec"]
    # A submitter that cannot reach its end (a hung stream) is stopped; the run is not.
    assert 0 < job["activeDeadlineSeconds"] < 7 * 24 * 3600
    # The submitter checks the cluster for a scheduled run still going before it
    # submits (tests/infra/test_scheduled_submit.py), because a Ray job outlives
    # the pod that submitted it and Forbid only covers the pod.
    command = cron_container()["command"]
    script = command[1]
    assert command[0] == "python" and script.startswith(IMAGE_WORKDIR + "/")
    assert (REPO_ROOT / script.removeprefix(IMAGE_WORKDIR + "/")).is_file()
    assert "--prefix=dpt-annotate-scheduled-" in command


def test_the_image_carries_the_cronjob_submitter():
    script = cron_container()["command"][1].removeprefix(IMAGE_WORKDIR + "/")
    dockerfile = (INFRA / "docker" / "Dockerfile").read_text()
    assert re.search(rf"^COPY .*\b{re.escape(script)} {re.escape(script)}$", dockerfile, re.M)
    ignore = (INFRA / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
    assert f"!{script}" in ignore


def test_the_submitter_pod_has_room_for_python_and_rays_client():
    limits = cron_container()["resources"]["limits"]
    assert limits["memory"].endswith("Gi") and float(limits["memory"][:-2]) >= 1


def test_clusters_autoscale_with_a_cpu_only_head_and_gpu_workers_on_gpu_nodes():
    for spec in cluster_specs():
        assert spec["enableInTreeAutoscaling"] is True
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
        gpu_groups = [
            group
            for group in spec["workerGroupSpecs"]
            if "nvidia.com/gpu" in group["template"]["spec"]["containers"][0]["resources"]["limits"]
        ]
        assert gpu_groups and all(group["template"]["spec"]["tolerations"] for group in gpu_groups)
        # The GPU request is what places the pods; a label that GPU feature
        # discovery adds after boot would keep node autoscalers from starting a
        # GPU node for a pending pod.
        for group in gpu_groups:
            selector = group["template"]["spec"].get("nodeSelector", {})
            assert not [key for key in selector if key.startswith("nvidia.com/")], selector
        for group in spec["workerGroupSpecs"]:
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    (job,) = by_kind("RayJob")
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    assert job["spec"]["ttlSecondsAfterFinished"] > 0


def test_kuberay_makes_the_object_store_shared_memory():
    # KubeRay mounts a memory-backed emptyDir at /dev/shm, sized to the memory
    # limit, into every Ray container that has none (pod.go, BuildPod): one of
    # our own would only replace it with a smaller one.
    for spec in cluster_specs():
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        for group in groups:
            pod = group["template"]["spec"]
            mounts = [m for c in pod["containers"] for m in c.get("volumeMounts", [])]
            assert "/dev/shm" not in [m["mountPath"] for m in mounts]
            assert "plasma-directory" not in group["rayStartParams"]


def test_the_podmonitor_scrapes_every_ray_pod_on_its_metrics_port():
    (monitor,) = by_kind("PodMonitor")
    wanted = monitor["spec"]["selector"]["matchLabels"]
    # KubeRay adds ray.io/is-ray-node: "yes" to every pod it makes.
    kuberay_labels = {"ray.io/is-ray-node": "yes"}
    for spec in cluster_specs():
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            labels = {**group["template"]["metadata"]["labels"], **kuberay_labels}
            assert wanted.items() <= labels.items(), (wanted, labels)
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    # KubeRay names the port "metrics" where it adds it (8080); where the
    # manifests declare it themselves, they must use the same name and port.
    assert endpoint["port"] == "metrics"
    for spec in cluster_specs():
        for container in containers(spec):
            for port in container.get("ports", []):
                if port["containerPort"] == 8080:
                    assert port["name"] == "metrics"


def test_the_rayjob_cluster_is_the_long_running_cluster():
    (cluster,) = by_kind("RayCluster")
    (job,) = by_kind("RayJob")
    assert job["spec"]["rayClusterSpec"] == cluster["spec"]


def test_token_auth_is_set_up_by_the_operator_and_the_cronjob_uses_its_secret():
    # A container that sets RAY_AUTH_* itself is left alone by the operator, and
    # its token would not be the one the operator sends to the dashboard.
    for spec in cluster_specs():
        assert spec["authOptions"] == {"mode": "token"}
        env = [*spec["autoscalerOptions"].get("env", [])]
        env += [var for container in containers(spec) for var in container.get("env", [])]
        assert not [var["name"] for var in env if var["name"].startswith("RAY_AUTH")]
        # envFrom could bring them in under names this test cannot see.
        assert not [c["name"] for c in containers(spec) if c.get("envFrom")]
        assert not spec["autoscalerOptions"].get("envFrom")
    (job,) = by_kind("RayJob")
    for container in job["spec"]["submitterPodTemplate"]["spec"]["containers"]:
        assert not [var for var in container.get("env", []) if var["name"].startswith("RAY_AUTH")]
    # KubeRay names the secret after the cluster, with the token under auth_token.
    (cluster,) = by_kind("RayCluster")
    (cron,) = by_kind("CronJob")
    (container,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    env = {var["name"]: var for var in container["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": cluster["metadata"]["name"],
        "key": "auth_token",
    }
    # The submit command reaches the head service KubeRay makes for that cluster.
    assert f"--address=http://{cluster['metadata']['name']}-head-svc:8265" in container["command"]
    # And the README's client reads the same secret.
    readme = (REPO_ROOT / "README.md").read_text()
    assert (
        f"kubectl get secret {cluster['metadata']['name']} -o jsonpath='{{.data.auth_token}}'"
        in readme
    )


def test_s3_access_comes_from_a_role_not_from_keys():
    for path in [*MANIFESTS, INFRA / "aws" / "cluster.yaml"]:
        text = path.read_text()
        assert "AWS_ACCESS_KEY_ID" not in text and "AWS_SECRET_ACCESS_KEY" not in text
    (account,) = by_kind("ServiceAccount")
    role = account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert role == VARIABLES["AWS_ROLE_ARN"]
    for spec in cluster_specs():
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        assert {g["template"]["spec"]["serviceAccountName"] for g in groups} == {"dpt-annotate"}


def test_versions_in_infra_match_pyproject():
    ray_version = pinned_ray_version()
    python = "py" + pyproject()["project"]["requires-python"].split(">=")[1].split(",")[0]
    python = python.replace(".", "")
    ray_image = f"rayproject/ray:{ray_version}-{python}-gpu"
    dockerfile = (INFRA / "docker" / "Dockerfile").read_text()
    assert re.findall(r"^FROM (\S+)", dockerfile, re.M) == [ray_image]
    launcher = yaml.safe_load((INFRA / "aws" / "cluster.yaml").read_text())
    assert launcher["docker"]["image"] == ray_image
    for spec in cluster_specs():
        assert spec["rayVersion"] == ray_version
    # The image users build is tagged with the project's version in every example.
    project_version = pyproject()["project"]["version"]
    for path in MANIFESTS:
        if "${IMAGE}" in path.read_text():
            assert re.findall(r"dpt-annotate:(\S+)", path.read_text()) == [project_version]


def test_containers_run_the_image_built_from_the_dockerfile():
    for spec in cluster_specs():
        assert {c["image"] for c in containers(spec)} == {VARIABLES["IMAGE"]}
    (cron,) = by_kind("CronJob")
    (container,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert container["image"] == VARIABLES["IMAGE"]


def entrypoints() -> list[list[str]]:
    (job,) = by_kind("RayJob")
    (cron,) = by_kind("CronJob")
    (container,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    command = container["command"]
    return [shlex.split(job["spec"]["entrypoint"]), command[command.index("--") + 1 :]]


@pytest.mark.parametrize("entrypoint", entrypoints(), ids=["rayjob", "cronjob"])
def test_entrypoints_name_the_job_module_and_a_config_that_validates(entrypoint):
    assert entrypoint[:3] == ["python", "-m", "jobs.run"]
    args = parse_args(entrypoint[3:])
    config_path = Path(args.config.replace(IMAGE_WORKDIR, str(REPO_ROOT), 1))
    assert config_path.is_file()
    config = load_config(config_path, args.overrides)
    assert config.input.uri == VARIABLES["INPUT_URI"]
    assert config.output.uri == VARIABLES["OUTPUT_URI"]


def test_the_dockerfile_puts_the_repository_where_entrypoints_expect_it():
    dockerfile = (INFRA / "docker" / "Dockerfile").read_text()
    assert f"WORKDIR {IMAGE_WORKDIR}" in dockerfile
    for folder in ("pipeline", "dpt_model", "jobs"):
        assert re.search(rf"^COPY .*\b{folder} {folder}$", dockerfile, re.M)


def launcher_config() -> dict[str, Any]:
    return yaml.safe_load((INFRA / "aws" / "cluster.yaml").read_text())


def test_the_aws_launcher_config_validates_against_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    # prepare_config merges Ray's AWS defaults from disk; nothing talks to AWS.
    validate_config(prepare_config(copy.deepcopy(launcher_config())))


DLAMI_PARAMETER = (
    "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"
)


def test_aws_nodes_boot_the_current_gpu_ami_which_ec2_looks_up_at_launch():
    from ray.autoscaler._private.aws.config import _check_ami

    config = copy.deepcopy(launcher_config())
    for node_type in config["available_node_types"].values():
        assert node_type["node_config"]["ImageId"] == "resolve:ssm:" + DLAMI_PARAMETER
    # Ray swaps only "" and latest_dlami (its Ubuntu 18.04, CUDA 11.2 DLAMI) for
    # an AMI id of its own; anything else reaches RunInstances as written.
    _check_ami(config)  # reads the config only; nothing talks to AWS
    assert config == launcher_config()


def test_the_head_runs_as_the_role_the_readme_makes_not_rays_default():
    from ray.autoscaler._private.aws.config import _configure_iam_role
    from ray.autoscaler._private.util import prepare_config

    config = prepare_config(copy.deepcopy(launcher_config()))
    # With a profile on the head's node_config Ray neither makes nor uses
    # ray-autoscaler-v1 (and so makes no AWS call here).
    assert _configure_iam_role(copy.deepcopy(config)) == config
    profiles = {
        node_type["node_config"]["IamInstanceProfile"]["Name"]
        for node_type in launcher_config()["available_node_types"].values()
    }
    head = launcher_config()["available_node_types"]["head"]["node_config"]
    assert head["IamInstanceProfile"]["Name"] == "dpt-annotate-head"
    readme = (REPO_ROOT / "README.md").read_text()
    aws = readme[readme.index("## Running on AWS") : readme.index("## Metrics")]
    # One loop makes a role and a same-named instance profile for each.
    (names,) = re.findall(r"^for NAME in ([\w -]+); do$", aws, re.M)
    assert set(names.split()) == profiles
    assert "aws iam create-instance-profile --instance-profile-name $NAME" in aws
    assert (
        "aws iam add-role-to-instance-profile --instance-profile-name $NAME --role-name $NAME"
        in aws
    )
    # The head hands the workers their role, and runs before Ray makes any role.
    assert '"iam:PassRole"' in aws and "role/dpt-annotate-worker" in aws
    assert "--role-name ray-autoscaler-v1" not in aws
    assert aws.index("create-instance-profile") < aws.index("ray up")


def test_the_aws_launcher_config_is_rejected_when_broken():
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = copy.deepcopy(launcher_config())
    broken["max_workerz"] = broken.pop("max_workers")
    with pytest.raises(Exception, match="max_workerz"):
        validate_config(prepare_config(broken))


def pool_request(config_name: str) -> PoolRequest:
    resources = load_config(
        REPO_ROOT / "jobs/configs" / config_name, ["input.uri=in", "output.uri=out"]
    ).resources
    return PoolRequest(
        resources.actors.max,
        resources.cpus_per_actor,
        resources.gpus_per_actor,
        resources.cpus_per_decode_task,
        (resources.memory_per_actor_gb or 0) * GIB,
    )


def test_the_gpu_node_job_config_fills_one_eight_gpu_node():
    node = ClusterCapacity((NodeShape(96, 8, memory_bytes=1152 * GIB),), "p4d.24xlarge")
    request = pool_request("gpu-node.yaml")
    assert request.actors_min == 8 and capacity_problem(request, node) is None


def test_the_cluster_job_config_fits_the_aws_cluster_at_its_largest():
    shapes, complete = launcher_shapes(launcher_config())
    assert complete
    capacity = ClusterCapacity((NodeShape(cpus=0, gpus=0), *shapes), "infra/aws/cluster.yaml")
    assert capacity_problem(pool_request("cluster.yaml"), capacity) is None


def test_the_cluster_job_config_fits_the_kuberay_cluster_at_its_largest():
    for spec in cluster_specs():
        shapes = []
        for group in spec["workerGroupSpecs"]:
            limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
            gpus = float(limits.get("nvidia.com/gpu", 0))
            memory = int(limits["memory"].removesuffix("Gi")) * GIB
            shapes.append(NodeShape(float(limits["cpu"]), gpus, group["maxReplicas"], memory))
        capacity = ClusterCapacity((NodeShape(cpus=0, gpus=0), *shapes), "infra/kuberay")
        assert capacity_problem(pool_request("cluster.yaml"), capacity) is None


def test_the_readme_commands_name_files_that_exist_and_the_variables_they_need():
    readme = (REPO_ROOT / "README.md").read_text()
    mentioned = re.findall(r"\b((?:infra|jobs)/[\w./-]+\.yaml|infra/docker/Dockerfile)", readme)
    assert len(set(mentioned)) >= 7
    for path in set(mentioned):
        assert (REPO_ROOT / path).exists(), path
    for manifest in MANIFESTS:
        header = envsubst_line(manifest) or f"kubectl apply -f infra/kuberay/{manifest.name}"
        assert header in readme, header
    for name in VARIABLES:
        assert f"export {name}=" in readme or f" {name}=" in readme, name


@pytest.mark.skipif(shutil.which("envsubst") is None, reason="envsubst (gettext-base) not found")
@pytest.mark.parametrize(
    "path", [m for m in MANIFESTS if envsubst_line(m) is not None], ids=lambda p: p.name
)
def test_the_readme_envsubst_command_fills_every_variable(path):
    (listed,) = re.findall(r"envsubst '([^']*)'", path.read_text())
    filled = subprocess.run(
        ["envsubst", listed],
        input=path.read_text(),
        env={**os.environ, **VARIABLES},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "${" not in filled
    # (envsubst also fills the unbraced names in the header comment; the objects are what count.)
    assert [doc for doc in yaml.safe_load_all(filled) if doc is not None] == documents(path)
