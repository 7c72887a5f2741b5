"""Ray placement of training runs: the ``dagster-ray/config`` tag of a run pinned to a pool node.

With the Ray deployment (``deploy/ray/dagster.yaml``: dagster-ray's ``RayRunLauncher``) every run is
a Ray job; the launcher reads this tag and asks Ray for the node's custom resource
(``core/pool/ray_cluster.py: node_resource``, advertised by `mloc node join`) and one GPU, so the
whole run executes on that node, as a node selector does on Kubernetes (``execution/k8s.py``). The
GPUs a run asks for come from ``MLOC_RAY_GPUS_PER_RUN`` (default 1; 0 on a CPU-only pool). Outside
Ray the tag is inert.
The deployment's run launcher is ``execution/ray_launcher.py``.
"""

from __future__ import annotations

import json
import os

from mloc_dagster.core.pool.ray_cluster import node_resource

RAY_CONFIG_TAG = "dagster-ray/config"
GPUS_ENV = "MLOC_RAY_GPUS_PER_RUN"


def node_ray_config(node_id: str) -> str:
    """The tag value (JSON) that pins a run to pool node ``node_id``."""
    gpus = float(os.environ.get(GPUS_ENV, "1") or 0)
    return json.dumps({"resources": {node_resource(node_id): 1}, **({"num_gpus": gpus} if gpus else {})})

