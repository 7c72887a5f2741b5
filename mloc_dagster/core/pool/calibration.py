"""What this machine is and how fast it trains: the node registry's first figures for a new node.

``calibrate`` runs a short, real adapter job (``core.training.asr.train_adapter`` with a small step
budget: same model, features, LoRA and loop as a training job, so the figure is what placement
will see) on a local base model and dataset version, and returns its samples/s. The job's
checkpoint is thrown away. ``local_device`` describes the GPU (name, UUID, memory) or the CPU;
``local_node_id`` is the id training jobs on this machine report (``MLOC_NODE_ID``, else the host
name), in the registry's ``[a-z0-9-]`` form. No Dagster imports.
"""

from __future__ import annotations

import os
import socket
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from mloc_dagster.core.state.nodes import DeviceInfo, canonical_node_id

DEFAULT_CALIBRATION_STEPS = 30


def local_node_id() -> str:
    return canonical_node_id(os.environ.get("MLOC_NODE_ID") or socket.gethostname())


def local_device(device: str | None = None) -> DeviceInfo:
    """The device jobs here train on: the first CUDA GPU (name, UUID, memory), else the CPU."""
    import torch

    wanted = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not wanted.startswith("cuda") or not torch.cuda.is_available():
        return DeviceInfo("cpu")
    index = torch.device(wanted).index or 0
    props = torch.cuda.get_device_properties(index)
    uuid = getattr(props, "uuid", None)
    return DeviceInfo("cuda", props.name, f"GPU-{uuid}" if uuid is not None else None,
                      int(props.total_memory // (1024 * 1024)))


@dataclass(frozen=True)
class Calibration:
    node_id: str
    base_model: str  # hash of the base model directory (the registry's key)
    samples_per_s: float
    steps: int
    samples: int
    train_seconds: float
    wall_seconds: float
    device: str

    def to_json(self) -> dict:
        return asdict(self)


def calibrate(base_model_dir: str | Path, dataset_version_path: str | Path, *, node_id: str | None = None,
              steps: int = DEFAULT_CALIBRATION_STEPS, device: str | None = None,
              feature_cache_dir: str | Path | None = None, timebox_s: float = 600.0) -> Calibration:
    """Train ``steps`` LoRA steps on the dataset version's train split and measure samples/s."""
    from mloc_dagster.core.training.asr import train_adapter
    from mloc_dagster.core.training.spec import AdapterJobSpec

    if steps < 2:
        raise ValueError("calibration needs at least 2 steps (the first one warms up)")
    node_id = node_id or local_node_id()
    with tempfile.TemporaryDirectory(prefix="mloc-calibrate-") as tmp:
        result = train_adapter(AdapterJobSpec(
            base_model_dir=base_model_dir, dataset_version_path=dataset_version_path, out_dir=Path(tmp) / "adapter",
            timebox_s=timebox_s, max_steps=steps, node_id=node_id, device=device,
            feature_cache_dir=feature_cache_dir, run_id="calibration", job_index=0))
    if not result.samples_per_s > 0:
        raise RuntimeError(f"calibration trained {result.steps} steps in {result.train_seconds:.2f} s: no throughput")
    return Calibration(node_id, result.base_model_hash, float(result.samples_per_s), result.steps, result.samples,
                       result.train_seconds, result.wall_seconds, result.device)
