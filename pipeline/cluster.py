"""Can the Ray cluster ever host the job's actor pool? Checked before any actor starts.

Ray Data asked for GPUs a cluster does not have waits silently forever. So the
driver works out the largest the cluster can become: the nodes alive now, plus
what an autoscaler may still add where its limits can be read (the autoscaler's
cluster config in the GCS, or the cluster launcher's ``~/ray_bootstrap_config.yaml``
on the head node, where ``ray job submit`` runs drivers). Where an autoscaler
runs but its limits cannot be read (KubeRay's autoscaler keeps them in the
RayCluster resource), a request that does not fit today is a warning: nodes
may still come, and the stall watchdog ends the run if they never do.

The arithmetic is pure (``capacity_problem``) and tested without Ray.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)

LAUNCHER_CONFIG = Path.home() / "ray_bootstrap_config.yaml"
_EPSILON = 1e-9
GIB = 2**30
_READ_ONLY_NODE_TYPE = re.compile(r"node_[0-9a-f]{56}")  # "node_" + a Ray node id


@dataclass(frozen=True)
class NodeShape:
    """A kind of node and how many of it the cluster can have (``math.inf``: no limit)."""

    cpus: float
    gpus: float
    count: float = 1
    memory_bytes: float = math.inf  # unknown counts as no limit


@dataclass(frozen=True)
class ClusterCapacity:
    shapes: tuple[NodeShape, ...]
    source: str  # where the shapes came from, for messages
    may_grow: bool = False  # an autoscaler runs whose limits could not be read


@dataclass(frozen=True)
class PoolRequest:
    actors_min: int
    cpus_per_actor: float
    gpus_per_actor: float
    cpus_per_decode_task: float
    memory_per_actor_bytes: float = 0


def actors_per_node(shape: NodeShape, request: PoolRequest) -> int:
    fits = [shape.cpus / request.cpus_per_actor]
    if request.gpus_per_actor > 0:
        fits.append(shape.gpus / request.gpus_per_actor)
    if request.memory_per_actor_bytes > 0:
        fits.append(shape.memory_bytes / request.memory_per_actor_bytes)
    return math.floor(min(fits) + _EPSILON)


def _counted(number: float, noun: str) -> str:
    """``1 GPU``, ``2 GPUs``, ``0.5 GPUs``."""
    return f"{number:g} {noun}" + ("" if number == 1 else "s")


def capacity_problem(request: PoolRequest, capacity: ClusterCapacity) -> str | None:
    """Why the cluster can never run ``request``, or None when it can."""
    actors = sum(
        shape.count * per_node
        for shape in capacity.shapes
        if (per_node := actors_per_node(shape, request)) > 0
    )
    wanted = (
        f"{_counted(request.actors_min, 'inference actor')} of "
        f"{_counted(request.cpus_per_actor, 'CPU')}"
        + (f", {_counted(request.gpus_per_actor, 'GPU')}" if request.gpus_per_actor else "")
        + (
            f", {request.memory_per_actor_bytes / GIB:g} GiB of memory"
            if request.memory_per_actor_bytes
            else ""
        )
        + " each (resources.actors.min, resources.cpus_per_actor, resources.gpus_per_actor, "
        "resources.memory_per_actor_gb)"
    )
    if actors < request.actors_min:
        largest = [
            _counted(max((shape.cpus for shape in capacity.shapes), default=0), "CPU"),
            _counted(max((shape.gpus for shape in capacity.shapes), default=0), "GPU"),
        ]
        memory = max((shape.memory_bytes for shape in capacity.shapes), default=0)
        if request.memory_per_actor_bytes and memory < math.inf:
            largest.append(f"{memory / GIB:.1f} GiB of memory")
        return (
            f"the job needs {wanted}, but the Ray cluster can host at most {actors:g} "
            f"({capacity.source}; its largest node has {', '.join(largest)}); lower "
            "those settings or use a larger cluster"
        )
    cpus = sum(shape.count * shape.cpus for shape in capacity.shapes if shape.cpus)
    spare_cpus = cpus - request.actors_min * request.cpus_per_actor
    if spare_cpus + _EPSILON < request.cpus_per_decode_task:
        return (
            f"the job needs {wanted} plus {request.cpus_per_decode_task:g} CPUs for read, "
            f"decode and encode tasks (resources.cpus_per_decode_task), but the Ray cluster "
            f"has at most {cpus:g} CPUs ({capacity.source}); lower resources.cpus_per_actor "
            "or resources.actors.min, or add CPU nodes"
        )
    return None


def launcher_shapes(launcher_config: dict[str, Any]) -> tuple[list[NodeShape], bool]:
    """Worker node types of a cluster launcher config at their max_workers.

    Returns the shapes and whether every worker type's resources were stated
    (the launcher can also detect them from the instance type at launch).
    """
    node_types = launcher_config.get("available_node_types") or {}
    head_type = launcher_config.get("head_node_type")
    cluster_max = launcher_config.get("max_workers", math.inf)
    shapes, complete = [], True
    for name, node_type in node_types.items():
        if name == head_type:
            continue  # alive already
        count = min(node_type.get("max_workers", cluster_max), cluster_max)
        resources = node_type.get("resources")
        if resources is None:
            complete = False
            continue
        if count:
            shapes.append(_shape(resources, count))
    return shapes, complete


def read_cluster_capacity() -> ClusterCapacity:
    """The largest the connected Ray cluster can become, as far as the driver can tell."""
    import ray

    nodes = [node for node in ray.nodes() if node.get("Alive")]
    alive = [_shape(node["Resources"], 1) for node in nodes]
    # Autoscaler limits count the workers already up, so with them only the head
    # is added: alive workers plus the limits would count those workers twice.
    head = [
        _shape(node["Resources"], 1)
        for node in nodes
        if "node:__internal_head__" in node["Resources"]
    ]
    group_shapes = _autoscaler_groups()
    if group_shapes:
        return ClusterCapacity((*head, *group_shapes), "head + autoscaler limits")
    if LAUNCHER_CONFIG.is_file():
        try:
            shapes, complete = launcher_shapes(yaml.safe_load(LAUNCHER_CONFIG.read_text()))
        except (OSError, yaml.YAMLError, AttributeError, TypeError) as error:
            logger.warning("could not read %s: %s", LAUNCHER_CONFIG, error)
        else:
            return ClusterCapacity(
                (*head, *shapes),
                "head + cluster launcher's max_workers",
                may_grow=not complete,
            )
    return ClusterCapacity(tuple(alive), "nodes alive now", may_grow=_autoscaler_runs())


def head_takes_tasks(nodes: list[dict[str, Any]]) -> bool:
    """Whether the head among ``nodes`` (``ray.nodes()``) has CPUs for tasks.

    The clusters in infra/ give it none: it holds the driver, and its memory
    is sized for that alone.
    """
    for node in nodes:
        if node.get("Alive") and "node:__internal_head__" in node["Resources"]:
            return node["Resources"].get("CPU", 0) > 0
    return True


def _autoscaler_groups() -> list[NodeShape]:
    """Node groups from the autoscaler's cluster config in the GCS, where one reported it."""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # a private API: absent or changed means unknown, not an error
        return []
    if config is None:
        return []
    return [
        _shape(dict(group.resources), math.inf if group.max_count < 0 else group.max_count)
        for group in config.node_group_configs
        if group.max_count != 0
    ]


def _shape(resources: dict[str, float], count: float) -> NodeShape:
    """A node from Ray's resource names; memory in bytes, unknown where not stated."""
    return NodeShape(
        resources.get("CPU", 0),
        resources.get("GPU", 0),
        count,
        resources.get("memory") or math.inf,
    )


def _autoscaler_runs() -> bool:
    """Whether an autoscaler (v1 or v2) that can launch nodes runs on this cluster."""
    try:
        from ray.autoscaler.v2.utils import is_autoscaler_v2
        from ray.experimental.internal_kv import _internal_kv_get

        if is_autoscaler_v2(fetch_from_server=True):
            return True
        status = _internal_kv_get("__autoscaling_status")
    except Exception:  # private APIs: unknown means we cannot tell, so assume static
        return False
    return bool(status) and autoscaler_can_launch(json.loads(status))


def autoscaler_can_launch(autoscaling_status: dict[str, Any]) -> bool:
    """From the v1 monitor's status record: does it manage named node types?

    Every cluster runs the monitor; on one nobody autoscales (``ray start`` by
    hand, ``ray.init()``) it uses a read-only provider whose node types are
    named after node ids, ``node_<56 hex digits>``. The launcher and KubeRay name them
    after their configs' node types or worker groups.
    """
    report = autoscaling_status.get("autoscaler_report") or {}
    node_types = (report.get("node_type_mapping") or {}).values()
    return any(not _READ_ONLY_NODE_TYPE.fullmatch(node_type) for node_type in node_types)
