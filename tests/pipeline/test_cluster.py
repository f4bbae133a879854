"""The cluster check: can the actor pool ever be placed, counting what an autoscaler may add."""

from __future__ import annotations

import math

import pytest

from jobs.config import load_config
from jobs.sample_images import encoded, synthetic_photo
from pipeline.cluster import (
    GIB,
    ClusterCapacity,
    NodeShape,
    PoolRequest,
    autoscaler_can_launch,
    capacity_problem,
    head_takes_tasks,
    launcher_shapes,
)
from tests.corpus import write_files


def request(actors: int = 1, cpus: float = 1, gpus: float = 0, decode: float = 1) -> PoolRequest:
    return PoolRequest(actors, cpus, gpus, decode)


def cluster(*shapes: NodeShape) -> ClusterCapacity:
    return ClusterCapacity(shapes, "test cluster")


def test_gpu_actors_on_a_cpu_only_cluster_can_never_start():
    problem = capacity_problem(request(gpus=1), cluster(NodeShape(cpus=16, gpus=0)))
    assert problem is not None
    assert "resources.gpus_per_actor" in problem and "at most 0" in problem


def test_one_eight_gpu_node_hosts_eight_actors_not_nine():
    node = NodeShape(cpus=96, gpus=8)
    assert capacity_problem(request(actors=8, cpus=4, gpus=1), cluster(node)) is None
    assert "at most 8" in capacity_problem(request(actors=9, cpus=4, gpus=1), cluster(node))


def test_fractional_gpus_pack_several_actors_per_gpu():
    node = NodeShape(cpus=8, gpus=1)
    assert capacity_problem(request(actors=2, gpus=0.5), cluster(node)) is None
    assert capacity_problem(request(actors=3, gpus=0.5), cluster(node)) is not None


def test_an_actor_must_fit_on_one_node_not_across_nodes():
    # 16 CPUs and 2 GPUs in total, but no single node has 8 CPUs next to a GPU.
    nodes = cluster(NodeShape(cpus=4, gpus=1), NodeShape(cpus=4, gpus=1), NodeShape(cpus=8, gpus=0))
    problem = capacity_problem(request(cpus=8, gpus=1), nodes)
    assert problem is not None and "largest node has 8 CPUs, 1 GPU" in problem
    assert problem.startswith("the job needs 1 inference actor of 8 CPUs, 1 GPU each")


def test_actors_are_placed_by_the_memory_they_reserve():
    nodes = cluster(NodeShape(cpus=32, gpus=0, memory_bytes=16 * GIB))
    two = PoolRequest(2, 1, 0, 1, memory_per_actor_bytes=6 * GIB)
    three = PoolRequest(3, 1, 0, 1, memory_per_actor_bytes=6 * GIB)
    assert capacity_problem(two, nodes) is None
    problem = capacity_problem(three, nodes)
    assert "6 GiB of memory each" in problem and "16.0 GiB of memory" in problem
    assert "resources.memory_per_actor_gb" in problem


def test_cpus_left_for_decode_tasks_are_required_too():
    problem = capacity_problem(request(actors=1, cpus=2), cluster(NodeShape(cpus=2, gpus=0)))
    assert problem is not None and "resources.cpus_per_decode_task" in problem
    assert capacity_problem(request(actors=1, cpus=1), cluster(NodeShape(cpus=2, gpus=0))) is None


def test_autoscaling_groups_count_at_their_maximum():
    head = NodeShape(cpus=8, gpus=0)
    gpu_workers = NodeShape(cpus=16, gpus=1, count=4)
    assert capacity_problem(request(actors=4, cpus=4, gpus=1), cluster(head, gpu_workers)) is None
    unbounded = NodeShape(cpus=16, gpus=1, count=math.inf)
    assert capacity_problem(request(actors=100, cpus=4, gpus=1), cluster(head, unbounded)) is None


LAUNCHER_CONFIG = {
    "max_workers": 6,
    "head_node_type": "head",
    "available_node_types": {
        "head": {"resources": {"CPU": 0}, "max_workers": 0},
        "gpu": {"resources": {"CPU": 8, "GPU": 1}, "min_workers": 0, "max_workers": 10},
        "cpu": {"resources": {"CPU": 16}, "min_workers": 0, "max_workers": 2},
    },
}


def test_launcher_worker_types_count_at_max_workers_capped_by_the_cluster_maximum():
    shapes, complete = launcher_shapes(LAUNCHER_CONFIG)
    assert complete
    assert shapes == [NodeShape(cpus=8, gpus=1, count=6), NodeShape(cpus=16, gpus=0, count=2)]


def test_a_launcher_type_without_stated_resources_makes_the_limits_unknown():
    config = {**LAUNCHER_CONFIG, "available_node_types": {"gpu": {"max_workers": 2}}}
    assert launcher_shapes(config) == ([], False)


def test_only_an_autoscaler_with_named_node_types_can_launch_nodes():
    # What Ray's monitor records on a cluster started by hand, and under KubeRay.
    node_id = "ab703912a98ba2f37114ef68bfee7c3abcf3f97a42b1578f871ddb2f"
    by_hand = {"autoscaler_report": {"node_type_mapping": {node_id: f"node_{node_id}"}}}
    kuberay = {"autoscaler_report": {"node_type_mapping": {"10.0.3.7": "headgroup"}}}
    assert not autoscaler_can_launch(by_hand)
    assert autoscaler_can_launch(kuberay)
    assert not autoscaler_can_launch({"load_metrics_report": {}})


def one_image_job(tmp_path, checkpoints, *overrides: str):
    write_files(tmp_path / "images", {"a.jpg": encoded(synthetic_photo(64, 48, seed=1), "JPEG")})
    return load_config(
        None,
        [
            f"input.uri={tmp_path / 'images'}",
            f"output.uri={tmp_path / 'output'}",
            f"models.depth={checkpoints['depth-vit']}",
            *overrides,
        ],
    )


@pytest.mark.slow
def test_a_job_asking_for_gpus_on_a_cluster_without_fails_before_any_actor(
    ray_cluster, checkpoints, tmp_path
):
    from pipeline.run import ClusterTooSmallError, run_annotation

    config = one_image_job(tmp_path, checkpoints, "resources.gpus_per_actor=1")
    with pytest.raises(ClusterTooSmallError, match=r"can host at most 0 \(nodes alive now"):
        run_annotation(config)
    assert not (tmp_path / "output" / "predictions").exists()
    # Memory too: more than the machine has is refused, whatever the GPUs.
    too_much = config.model_copy(
        update={
            "resources": config.resources.model_copy(
                update={"gpus_per_actor": 0, "memory_per_actor_gb": 100_000}
            )
        }
    )
    with pytest.raises(ClusterTooSmallError, match="100000 GiB of memory each"):
        run_annotation(too_much)


@pytest.mark.slow
def test_a_memory_reservation_that_fits_runs(ray_cluster, checkpoints, tmp_path):
    from pipeline.run import run_annotation

    config = one_image_job(tmp_path, checkpoints, "resources.memory_per_actor_gb=0.5")
    assert run_annotation(config).images_ok == 1


@pytest.mark.slow
def test_on_a_launcher_head_the_worker_types_count_at_their_limits(
    ray_cluster, monkeypatch, tmp_path
):
    import yaml

    from pipeline import cluster as cluster_module

    launcher = tmp_path / "ray_bootstrap_config.yaml"
    launcher.write_text(yaml.safe_dump(LAUNCHER_CONFIG))
    monkeypatch.setattr(cluster_module, "LAUNCHER_CONFIG", launcher)
    capacity = cluster_module.read_cluster_capacity()
    # The head once (this machine's one node), then each worker type at its limit:
    # workers already up are inside those limits, never added to them.
    head, *workers = capacity.shapes
    assert head.cpus == 2 and head.count == 1
    expected = [NodeShape(cpus=8, gpus=1, count=6), NodeShape(cpus=16, gpus=0, count=2)]
    assert sorted(workers, key=lambda shape: shape.cpus) == expected
    assert capacity.source == "head + cluster launcher's max_workers" and not capacity.may_grow


def test_a_head_without_cpus_takes_no_tasks():
    head = {"Alive": True, "Resources": {"node:__internal_head__": 1.0, "memory": 1e10}}
    worker = {"Alive": True, "Resources": {"CPU": 8.0, "GPU": 1.0}}
    assert not head_takes_tasks([head, worker])
    head["Resources"]["CPU"] = 2.0
    assert head_takes_tasks([head, worker])
    assert head_takes_tasks([])  # nothing known: as on one machine
