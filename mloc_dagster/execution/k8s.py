"""Kubernetes placement of GPU steps: the ``dagster-k8s/config`` tag value for a training job.

dagster-k8s reads this tag when it builds the Kubernetes Job of a run (``K8sRunLauncher``, from the
run's tags) or of a step (``k8s_job_executor``, from the op's tags). The pod then

- requests and is limited to one GPU (``nvidia.com/gpu``: the NVIDIA device plugin's resource), so
  the scheduler only places it on a node with a free GPU and the container sees exactly that one;
- lands on the GPU node pool (node selector) and tolerates the taint that keeps other pods off it;
- learns which node it is on: ``MLOC_NODE_ID`` comes from the pod's ``spec.nodeName`` (downward
  API). The pod's hostname is the pod name, new for every job; the node name is stable, so
  reputation, quotas and throughput stay attached to the machine that did the work.

Node selector and tolerations differ per cluster (GKE, EKS, on-prem with GPU feature discovery),
so the user-code deployment can set them as JSON in ``MLOC_K8S_GPU_NODE_SELECTOR`` and
``MLOC_K8S_GPU_TOLERATIONS``; ``{}`` / ``[]`` switch them off. Outside Kubernetes the tag is inert.
"""

from __future__ import annotations

import json
import os
from typing import Any

K8S_CONFIG_TAG = "dagster-k8s/config"
GPU_RESOURCE = "nvidia.com/gpu"
NODE_SELECTOR_ENV = "MLOC_K8S_GPU_NODE_SELECTOR"
TOLERATIONS_ENV = "MLOC_K8S_GPU_TOLERATIONS"

# The label NVIDIA's GPU feature discovery / GPU operator puts on every GPU node.
DEFAULT_GPU_NODE_SELECTOR: dict[str, str] = {"nvidia.com/gpu.present": "true"}
# GKE and most managed node pools taint GPU nodes `nvidia.com/gpu=present:NoSchedule`.
DEFAULT_GPU_TOLERATIONS: list[dict[str, str]] = [
    {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"},
]


def gpu_k8s_config(node_selector: dict | None = None, tolerations: list | None = None) -> dict:
    """The ``dagster-k8s/config`` tag value for a step that needs one GPU.

    Arguments win over the environment (``MLOC_K8S_GPU_NODE_SELECTOR`` /
    ``MLOC_K8S_GPU_TOLERATIONS``, JSON), which wins over the defaults. Keys are snake_case, as
    dagster-k8s documents them (camelCase is accepted too).
    """
    if node_selector is None:
        node_selector = _json_env(NODE_SELECTOR_ENV, dict, DEFAULT_GPU_NODE_SELECTOR)
    if tolerations is None:
        tolerations = _json_env(TOLERATIONS_ENV, list, DEFAULT_GPU_TOLERATIONS)
    pod_spec: dict[str, Any] = {}
    if node_selector:
        pod_spec["node_selector"] = dict(node_selector)
    if tolerations:
        pod_spec["tolerations"] = [dict(t) for t in tolerations]
    config: dict[str, Any] = {
        "container_config": {
            # Extended resources must have requests == limits; both spelled out for readers.
            "resources": {"requests": {GPU_RESOURCE: "1"}, "limits": {GPU_RESOURCE: "1"}},
            "env": [{"name": "MLOC_NODE_ID", "value_from": {"field_ref": {"field_path": "spec.nodeName"}}}],
        },
    }
    if pod_spec:
        config["pod_spec_config"] = pod_spec
    return config


NODE_LABEL = "kubernetes.io/hostname"  # set by the kubelet on every node: its node name


def node_k8s_config(node_id: str) -> dict:
    """A slice placed on pool node ``node_id``: the GPU config, pinned to that node. Pool node ids
    on Kubernetes are node names (``MLOC_NODE_ID`` comes from ``spec.nodeName``), and the kubelet
    labels every node with its name, so the selector lands the pod on the node it was placed on."""
    config = gpu_k8s_config()
    pod_spec = config.setdefault("pod_spec_config", {})
    pod_spec["node_selector"] = {**pod_spec.get("node_selector", {}), NODE_LABEL: node_id}
    return config


def _json_env(name: str, kind: type, default: Any) -> Any:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{name} is not valid JSON ({exc.msg}): {raw!r}") from exc
    if isinstance(value, kind):
        return value
    raise ValueError(f"{name} must be a JSON {'object' if kind is dict else 'array'}, got {raw!r}")
