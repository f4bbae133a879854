"""JSON schemas for KubeRay's ray.io/v1 RayCluster and RayJob, and the Prometheus
Operator's PodMonitor, for offline validation.

No package registry ships KubeRay's CRDs, so the Ray-specific fields are
written out here from KubeRay v1.5.1's API types (ray-operator/apis/ray/v1), with
unknown keys rejected, while pod templates and object metadata point at the
Kubernetes definitions that kubernetes-validate bundles, so everything inside a
pod is checked against Kubernetes' own schema. The PodMonitor schema is the part
of prometheus-operator's monitoring.coreos.com/v1 PodMonitorSpec and
PodMetricsEndpoint (pkg/apis/monitoring/v1/podmonitor_types.go) the manifests
may use, closed the same way.
"""

from __future__ import annotations

import json
from importlib.resources import files
from typing import Any

from jsonschema import Draft202012Validator
from referencing import Registry, Resource

KUBERNETES_VERSION = "1.30"  # the oldest Kubernetes the manifests are meant for
_DEFINITIONS = "/api/_definitions.json#/$defs/"


def _kubernetes(name: str) -> dict[str, Any]:
    return {"$ref": _DEFINITIONS + name}


def _closed(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(required),
        "additionalProperties": False,
    }


POD_TEMPLATE = _kubernetes("io.k8s.api.core.v1.PodTemplateSpec")
OBJECT_META = _kubernetes("io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta")
RESOURCES = _kubernetes("io.k8s.api.core.v1.ResourceRequirements")
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
COUNT = {"type": "integer", "minimum": 0}

AUTOSCALER_OPTIONS = _closed(
    {
        "resources": RESOURCES,
        "image": {"type": "string"},
        "imagePullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
        "securityContext": _kubernetes("io.k8s.api.core.v1.SecurityContext"),
        "idleTimeoutSeconds": COUNT,
        "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
        "version": {"enum": ["v1", "v2"]},
        "env": {"type": "array", "items": _kubernetes("io.k8s.api.core.v1.EnvVar")},
        "envFrom": {"type": "array", "items": _kubernetes("io.k8s.api.core.v1.EnvFromSource")},
        "volumeMounts": {
            "type": "array",
            "items": _kubernetes("io.k8s.api.core.v1.VolumeMount"),
        },
    }
)
HEAD_GROUP = _closed(
    {
        # rayStartParams values are strings in KubeRay's API: num-cpus: "0", not 0.
        "rayStartParams": STRING_MAP,
        "template": POD_TEMPLATE,
        "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
        "headService": {"type": "object"},
        "enableIngress": {"type": "boolean"},
    },
    required=("template",),
)
WORKER_GROUP = _closed(
    {
        "groupName": {"type": "string", "minLength": 1},
        "replicas": COUNT,
        "minReplicas": COUNT,
        "maxReplicas": COUNT,
        "numOfHosts": {"type": "integer", "minimum": 1},
        "idleTimeoutSeconds": COUNT,
        "rayStartParams": STRING_MAP,
        "template": POD_TEMPLATE,
        "scaleStrategy": {"type": "object"},
        "suspend": {"type": "boolean"},
    },
    required=("groupName", "template"),
)
RAY_CLUSTER_SPEC = _closed(
    {
        "rayVersion": {"type": "string", "pattern": r"^\d+\.\d+\.\d+$"},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "autoscalerOptions": AUTOSCALER_OPTIONS,
        "headGroupSpec": HEAD_GROUP,
        "workerGroupSpecs": {"type": "array", "items": WORKER_GROUP},
        "headServiceAnnotations": STRING_MAP,
        "suspend": {"type": "boolean"},
        "managedBy": {"type": "string"},
        "gcsFaultToleranceOptions": {"type": "object"},
        # From v1.5.1: the operator makes the token secret and hands it out.
        "authOptions": _closed({"mode": {"enum": ["disabled", "token"]}}),
    },
    required=("headGroupSpec",),
)
RAY_JOB_SPEC = _closed(
    {
        "entrypoint": {"type": "string", "minLength": 1},
        "runtimeEnvYAML": {"type": "string"},
        "rayClusterSpec": RAY_CLUSTER_SPEC,
        "clusterSelector": STRING_MAP,
        "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
        "submitterPodTemplate": POD_TEMPLATE,
        "submitterConfig": _closed({"backoffLimit": COUNT}),
        "shutdownAfterJobFinishes": {"type": "boolean"},
        "ttlSecondsAfterFinished": COUNT,
        "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
        "backoffLimit": COUNT,
        "jobId": {"type": "string"},
        "entrypointNumCpus": {"type": "number", "minimum": 0},
        "entrypointNumGpus": {"type": "number", "minimum": 0},
        "entrypointResources": {"type": "string"},
        "metadata": STRING_MAP,
        "suspend": {"type": "boolean"},
        "managedBy": {"type": "string"},
        "deletionStrategy": {"type": "object"},
    },
)


# prometheus-operator's Duration: "30s", "1m", "1h30m".
DURATION = {"type": "string", "pattern": r"^(0|([0-9]+(ms|s|m|h|d|w|y))+)$"}
POD_MONITOR_SPEC = _closed(
    {
        "jobLabel": {"type": "string"},
        "podTargetLabels": {"type": "array", "items": {"type": "string"}},
        "podMetricsEndpoints": {
            "type": "array",
            "minItems": 1,
            "items": _closed(
                {
                    "port": {"type": "string", "minLength": 1},
                    "portNumber": {"type": "integer", "minimum": 1, "maximum": 65535},
                    "path": {"type": "string"},
                    "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                    "interval": DURATION,
                    "scrapeTimeout": DURATION,
                    "honorLabels": {"type": "boolean"},
                    "honorTimestamps": {"type": "boolean"},
                    "relabelings": {"type": "array", "items": {"type": "object"}},
                    "metricRelabelings": {"type": "array", "items": {"type": "object"}},
                }
            ),
        },
        "selector": _kubernetes("io.k8s.apimachinery.pkg.apis.meta.v1.LabelSelector"),
        "namespaceSelector": _closed(
            {
                "any": {"type": "boolean"},
                "matchNames": {"type": "array", "items": {"type": "string"}},
            }
        ),
        "sampleLimit": COUNT,
        "targetLimit": COUNT,
    },
    required=("selector",),
)
API_VERSIONS = {
    "RayCluster": "ray.io/v1",
    "RayJob": "ray.io/v1",
    "PodMonitor": "monitoring.coreos.com/v1",
}


def _resource(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        # Relative $refs resolve against kubernetes-validate's definitions by this base.
        "$id": f"https://kubernetes.io/api/{kind.lower()}-crd.json",
        **_closed(
            {
                "apiVersion": {"const": API_VERSIONS[kind]},
                "kind": {"const": kind},
                "metadata": OBJECT_META,
                "spec": spec,
                "status": {"type": "object"},
            },
            required=("apiVersion", "kind", "metadata", "spec"),
        ),
    }


def validator(kind: str) -> Draft202012Validator:
    """A validator for ``RayCluster``, ``RayJob`` or ``PodMonitor`` (strict Kubernetes
    definitions inside)."""
    folder = files("kubernetes_validate") / "kubernetes-json-schema"
    definitions = folder / f"v{KUBERNETES_VERSION}.0-local-strict" / "_definitions.json"
    registry = Resource.from_contents(json.loads(definitions.read_text())) @ Registry()
    spec = {"RayCluster": RAY_CLUSTER_SPEC, "RayJob": RAY_JOB_SPEC, "PodMonitor": POD_MONITOR_SPEC}[
        kind
    ]
    return Draft202012Validator(_resource(kind, spec), registry=registry)
