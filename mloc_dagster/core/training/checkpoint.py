"""The train state of an adapter run and its checkpoint I/O: safetensors + JSON, atomically.

Everything the adapter loop depends on lives in one ``TrainState``: step and sample counters, the
sample-level data position (``SampleStream.position()``), the trainable (LoRA) weights, AdamW's
moments and step, the scheduler step, and the RNG states (python, numpy, torch CPU, every CUDA
device). It is saved as ``train_state.safetensors`` (tensors) + ``train_state.json`` (everything
else) — never pickle — so job k+1 continues bit-for-bit where job k stopped.

A checkpoint directory is written in a hidden temp dir next to its destination, fsynced, then
renamed into place, so a reader sees a complete checkpoint or none::

    <out_dir>/                          the job's final checkpoint (what the next job resumes from)
        adapter_model.safetensors       LoRA A/B in peft format (mergeable, loadable by PeftModel)
        adapter_config.json             peft LoraConfig
        train_state.safetensors         trainable weights, optimizer moments, RNG tensors
        train_state.json                step, data position, scheduler, RNG, hparams, loss history,
                                        base model + dataset versions, node + throughput per job
        result.json                     the AdapterJobResult of the job that wrote it
    <out_dir>.partial/step-000000120/   intermediate checkpoint (same files minus result.json)
"""

from __future__ import annotations

import json
import random
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from mloc_dagster.core.adapters.format import RESULT_JSON, TRAIN_STATE_JSON, TRAIN_STATE_TENSORS
from mloc_dagster.core.publish import publish_dir
from mloc_dagster.core.training.sample_stream import SampleStream

STATE_FORMAT = 1


class ResumeError(ValueError):
    """A checkpoint cannot continue this job (different run settings, dataset or base model)."""


# --------------------------------------------------------------------------- RNG


def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """(json, tensors) of every global RNG the loop may draw from."""
    py = random.getstate()
    np_state = np.random.get_state()
    meta = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {"kind": np_state[0], "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "cached_gaussian": float(np_state[4])},
        "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
    }
    tensors = {"rng.torch_cpu": torch.get_rng_state().clone(),
               "rng.numpy_keys": torch.from_numpy(np_state[1].astype(np.int64))}
    for i in range(meta["cuda_devices"]):
        tensors[f"rng.cuda.{i}"] = torch.cuda.get_rng_state(i).clone()
    return meta, tensors


def set_rng_state(meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    n = meta["numpy"]
    np.random.set_state((n["kind"], tensors["rng.numpy_keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(tensors["rng.torch_cpu"])
    if torch.cuda.is_available():
        for i in range(min(meta["cuda_devices"], torch.cuda.device_count())):
            torch.cuda.set_rng_state(tensors[f"rng.cuda.{i}"], i)


# --------------------------------------------------------------------------- the state object


@dataclass
class TrainState:
    """Everything an adapter run's loop depends on, besides code and inputs."""

    step: int = 0
    samples: int = 0
    loss_history: list[float] = field(default_factory=list)
    jobs: list[dict] = field(default_factory=list)  # per job: node, device, throughput, steps, dev CER
    run: dict = field(default_factory=dict)  # run_id, job_index, job_start_step, resume_from

    def snapshot(self, model: torch.nn.Module, opt: Optimizer, sched: LRScheduler, stream: SampleStream,
                 hparams, identity: dict) -> tuple[dict, dict[str, torch.Tensor]]:
        """(json, tensors) of the state right now, on CPU, detached from the live objects.
        ``hparams`` is a dataclass (``AdapterHParams``)."""
        tensors: dict[str, torch.Tensor] = {}
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        for n, p in model.named_parameters():
            if p.requires_grad:
                tensors[f"param.{n}"] = p.detach().to("cpu", copy=True).contiguous()
        osd = opt.state_dict()
        for idx, st in osd["state"].items():
            for k, v in st.items():
                if torch.is_tensor(v):
                    tensors[f"optim.{idx}.{k}"] = v.detach().to("cpu", copy=True).reshape(v.shape).contiguous()
        groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in osd["param_groups"]]
        ssd = {k: v for k, v in sched.state_dict().items() if k != "lr_lambdas"}
        rng_meta, rng_tensors = rng_state()
        tensors.update(rng_tensors)
        meta = {
            "format": STATE_FORMAT, "kind": "mloc-adapter-train-state",
            "step": self.step, "samples": self.samples, "data": stream.position(),
            "trainable": names, "optimizer": {"param_groups": groups, "state_ids": sorted(osd["state"])},
            "scheduler": ssd, "rng": rng_meta, "hparams": asdict(hparams), "identity": identity,
            "run": self.run, "jobs": self.jobs, "loss_history": self.loss_history,
        }
        return meta, tensors

    @classmethod
    def read(cls, directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
        meta = json.loads((directory / TRAIN_STATE_JSON).read_text())
        if meta.get("format") != STATE_FORMAT or meta.get("kind") != "mloc-adapter-train-state":
            raise ResumeError(f"{directory}: not an mloc adapter train state (format {meta.get('format')!r})")
        return meta, load_file(str(directory / TRAIN_STATE_TENSORS))

    def restore(self, meta: dict, tensors: dict[str, torch.Tensor], model: torch.nn.Module, opt: Optimizer,
                sched: LRScheduler) -> SampleStream:
        params = dict(model.named_parameters())
        trainable = [n for n, p in params.items() if p.requires_grad]
        if trainable != meta["trainable"]:
            raise ResumeError(f"trainable parameters differ from the checkpoint's "
                              f"({len(trainable)} here vs {len(meta['trainable'])}); same target modules?")
        with torch.no_grad():
            for n in trainable:
                src = tensors[f"param.{n}"]
                if src.shape != params[n].shape:
                    raise ResumeError(f"{n}: shape {tuple(src.shape)} != {tuple(params[n].shape)}")
                params[n].copy_(src)
        state = {}
        for idx in meta["optimizer"]["state_ids"]:
            prefix = f"optim.{idx}."
            state[int(idx)] = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in meta["optimizer"]["param_groups"]]
        opt.load_state_dict({"state": state, "param_groups": groups})
        sched.load_state_dict(dict(meta["scheduler"], lr_lambdas=[None] * len(opt.param_groups)))
        set_rng_state(meta["rng"], tensors)
        self.step, self.samples = meta["step"], meta["samples"]
        self.loss_history = list(meta["loss_history"])
        self.jobs = list(meta["jobs"])
        return SampleStream.from_position(meta["data"])


def check_resumable(meta: dict, source: Path, hparams, identity: dict) -> None:
    """Raise ``ResumeError`` unless a checkpoint was written by the same run settings: hparams,
    base model, dataset version, rehearsal version (and, for TTS, the aligner ASR)."""
    saved = meta["hparams"]
    mine = asdict(hparams)
    diff = {k for k in mine if saved.get(k, _default(hparams, k)) != mine[k]}
    if diff:
        raise ResumeError(f"{source}: hyper-parameters {sorted(diff)} differ from the run's checkpoint "
                          f"({ {k: saved.get(k) for k in sorted(diff)} } vs { {k: mine[k] for k in sorted(diff)} })")
    for key in PINNED_IDENTITY:
        if key in identity and meta["identity"].get(key) != identity[key]:
            raise ResumeError(f"{source}: {key} {meta['identity'].get(key)!r} != this job's {identity[key]!r}; "
                              "a training run pins its base model, dataset version (and aligner)")


# What a checkpoint must share with the job that resumes it (those a track's identity names;
# the rest of an identity — paths, dialect names — is informational: paths differ between nodes).
PINNED_IDENTITY = ("base_model_hash", "dataset_version", "rehearsal_version", "aligner_hash")


# Hyper-parameters added after checkpoints existed: the value that reproduces what those
# checkpoints were trained with (a run resumes only with the same settings).
LEGACY_HPARAMS = {"distill_weight": 0.0}


def _default(hparams, name: str):
    return LEGACY_HPARAMS.get(name, getattr(type(hparams)(), name))


# --------------------------------------------------------------------------- checkpoint I/O


def write_dir_atomically(dest: Path, write: Callable[[Path], None]) -> float:
    """Publish what ``write`` writes as ``dest`` (``core/publish.py``: temp dir, fsync, rename);
    only a stale copy of the same step can be there, and it is replaced. Returns seconds taken."""
    t = time.perf_counter()
    try:
        publish_dir(dest, write, replace=True)
    except SafetensorError as exc:
        # safetensors reports ENOSPC/EFBIG as its own error type; callers handle OSError.
        raise OSError(f"cannot write {dest}: {exc}") from exc
    return time.perf_counter() - t


def write_checkpoint(dest: Path, model, meta: dict, tensors: dict[str, torch.Tensor],
                     result: Callable[[Path, float], dict] | None = None) -> float:
    """Adapter (peft format) + train state [+ result.json, written last, told the seconds the rest
    took] into ``dest``, atomically. Returns the seconds taken."""
    def write(tmp: Path) -> None:
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.save_pretrained(tmp)  # peft format: adapter_model.safetensors + adapter_config.json
        (tmp / "README.md").unlink(missing_ok=True)  # peft's model card template; not needed
        save_file(tensors, str(tmp / TRAIN_STATE_TENSORS), metadata={"format": str(STATE_FORMAT)})
        (tmp / TRAIN_STATE_JSON).write_text(json.dumps(meta, indent=1) + "\n")
        if result is not None:
            (tmp / RESULT_JSON).write_text(json.dumps(result(tmp, time.perf_counter() - t), indent=1) + "\n")
    return write_dir_atomically(dest, write)


def partial_dir(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    return out.parent / f"{out.name}.partial"


def latest_partial(out_dir: str | Path) -> Path | None:
    """Newest complete intermediate checkpoint of this job, if a previous attempt left one."""
    root = partial_dir(out_dir)
    if not root.is_dir():
        return None
    steps = sorted((p for p in root.iterdir() if p.name.startswith("step-") and (p / TRAIN_STATE_JSON).is_file()),
                   key=lambda p: int(p.name.split("-", 1)[1]))
    return steps[-1] if steps else None


def write_partial(out_dir: Path, model, meta: dict, tensors: dict[str, torch.Tensor], step: int) -> tuple[Path, float]:
    """An intermediate checkpoint ``<out_dir>.partial/step-N``; older ones are removed after it is
    in place. Returns (path, seconds)."""
    dest = partial_dir(out_dir) / f"step-{step:09d}"
    seconds = write_checkpoint(dest, model, meta, tensors)
    for old in partial_dir(out_dir).glob("step-*"):
        if old != dest:
            shutil.rmtree(old, ignore_errors=True)
    return dest, seconds
