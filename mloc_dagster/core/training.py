"""The owned training loops: pre-training the tiny base model, and timeboxed LoRA adapter jobs.

An adapter job (``train_adapter``) is one slice of a training run. It is a plain peft loop —
``get_peft_model``, AdamW, a LambdaLR warm-up — with three things made explicit:

**Exact resume.** Everything the loop depends on lives in one ``TrainState``: step and sample
counters, the sample-level data position (epoch, permutation seed, index within the epoch), the
trainable (LoRA) weights, AdamW's moments and step, the scheduler step, and the RNG states
(python, numpy, torch CPU, every CUDA device). It is saved as ``train_state.safetensors`` (tensors)
+ ``train_state.json`` (everything else) — never pickle — so job k+1 continues bit-for-bit where
job k stopped: a chain of jobs reproduces the uninterrupted loss curve.

**Checkpoints, atomically.** A checkpoint directory is written in a hidden temp dir next to its
destination, fsynced, then renamed into place, so a reader sees a complete checkpoint or none::

    <out_dir>/                          the job's final checkpoint (what the next job resumes from)
        adapter_model.safetensors       LoRA A/B in peft format (mergeable, loadable by PeftModel)
        adapter_config.json             peft LoraConfig
        train_state.safetensors         trainable weights, optimizer moments, RNG tensors
        train_state.json                step, data position, scheduler, RNG, hparams, loss history,
                                        base model + dataset versions, node + throughput per job
        result.json                     the AdapterJobResult of the job that wrote it
    <out_dir>.partial/step-000000120/   intermediate checkpoint (same files minus result.json),
                                        every ``checkpoint_every_s``; only the newest is kept and
                                        the directory is removed once the final checkpoint exists

A job that starts looks in this order: ``<out_dir>/result.json`` exists → the job already
finished (a retry after a late failure): return the stored result without training; else the
newest ``<out_dir>.partial/step-*`` → the previous attempt of *this* job crashed: resume there
(losing at most ``checkpoint_every_s`` of work) and keep this job's original step budget; else
``resume_from`` (the previous job's final checkpoint of the same run); else start fresh from the
seed. Every checkpoint read is validated first (``core/checkpoints.py``).

**Timebox.** The loop checks before every step whether one more step, the final evaluation and
the final save still fit before ``timebox_s`` (counted from ``started_at``, default: function
entry), using the slowest recent step time, the measured last save time and an evaluation estimate
from the measured per-frame compute. It stops itself, leaving that margin, so the job returns
before the timebox; Dagster's ``dagster/max_runtime`` is only the backstop. A ``heartbeat``
callback that returns False (pause, cancel, a lost GPU lease) stops the loop the same clean way.

Determinism: the data order depends only on (seed, epoch); RNG states are restored; CPU jobs run
with a fixed intra-op thread count (1 for small models, see ``auto_cpu_threads``) and CUDA jobs
with ``torch.use_deterministic_algorithms``. Base-dialect *rehearsal* rows can be mixed into every
epoch (``rehearsal_dataset_path``) to limit forgetting of the base dialect.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import resource
import shutil
import socket
import tempfile
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.optim import AdamW
from torch.optim.lr_scheduler import LambdaLR

from mloc_dagster.core.checkpoints import (
    ADAPTER_WEIGHTS,
    RESULT_JSON,
    TRAIN_STATE_JSON,
    TRAIN_STATE_TENSORS,
    validate_checkpoint_dir,
)
from mloc_dagster.core.datasets import DatasetVersion
from mloc_dagster.core.evaluate import error_rates, transcribe
from mloc_dagster.core.features import FeatureSet, collate, concat_feature_sets, load_features
from mloc_dagster.core.model import (
    default_lora_targets,
    file_sha256,
    fsync_tree,
    load_base_model,
    model_dir_hash,
    new_tiny_model,
    save_base_model,
)

STATE_FORMAT = 1


class ResumeError(ValueError):
    """A checkpoint cannot continue this job (different run settings, dataset or base model)."""


# --------------------------------------------------------------------------- spec and result


@dataclass
class AdapterHParams:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.1
    target_modules: list[str] | None = None  # None: the base model's default (core.model.default_lora_targets)
    lr: float = 3e-3
    batch_size: int = 16
    warmup_steps: int = 20
    weight_decay: float = 0.0
    max_grad_norm: float = 5.0
    seed: int = 0
    rehearsal_fraction: float = 0.25  # share of each epoch drawn from the rehearsal dataset, if one is given


@dataclass
class Progress:
    step: int  # steps of the training run so far
    job_step: int  # steps of this job
    samples: int  # samples of this job
    loss: float  # last step's loss
    samples_per_s: float
    eta_s: float  # seconds until the loop stops (timebox or max_steps)
    elapsed_s: float
    epoch: int
    event: str = "step"  # step | checkpoint | done
    checkpoint: str | None = None


@dataclass
class AdapterJobSpec:
    base_model_dir: str | Path
    dataset_version_path: str | Path
    out_dir: str | Path  # this job's final checkpoint directory
    resume_from: str | Path | None = None  # previous job's final checkpoint of the same training run
    timebox_s: float = 3600.0
    checkpoint_every_s: float = 300.0
    hparams: AdapterHParams = field(default_factory=AdapterHParams)
    node_id: str | None = None  # default: MLOC_NODE_ID, else host (+ GPU UUID)
    device: str | None = None  # default: cuda when available, else cpu
    run_id: str | None = None
    job_index: int | None = None
    max_steps: int | None = None  # optional step budget of this job (tests, benchmarks, fixed-size jobs)
    cpu_threads: int | None = None  # None: auto_cpu_threads (1 for small models on CPU)
    deterministic: bool | None = None  # torch deterministic algorithms; None: on for CUDA, off for CPU
    checkpoint_every_steps: int | None = None  # optional, in addition to checkpoint_every_s
    feature_cache_dir: str | Path | None = None
    # The base dialect's dataset version: mixed into training (hparams.rehearsal_fraction) so the
    # adapter does not forget the base dialect (the gate limits base-dialect regression).
    rehearsal_dataset_path: str | Path | None = None
    eval_split: str = "dev"
    eval_batch_size: int = 32
    started_at: float | None = None  # time.time() the timebox counts from; default: function entry
    progress: Callable[[Progress], None] | None = None
    progress_every_s: float = 10.0
    heartbeat: Callable[[], bool | None] | None = None  # returning False stops the job cleanly
    heartbeat_every_s: float = 5.0
    log: Callable[[str], None] | None = None


@dataclass
class AdapterJobResult:
    path: str
    sha256: str  # of adapter_model.safetensors
    steps: int  # this job (a retried job counts the steps of its crashed attempt too)
    samples: int  # this job (likewise)
    total_steps: int  # the training run so far
    total_samples: int
    epoch: float  # data position of the run in epochs (epoch + fraction of the current one)
    train_loss: float  # mean loss of this job's steps
    dev_cer: float
    dev_wer: float
    samples_per_s: float  # samples trained by this attempt / train_seconds
    train_seconds: float  # first step start → last step end
    overhead_seconds: float  # start → first step, plus last step end → return
    wall_seconds: float
    timebox_s: float
    utilization: float  # train_seconds / timebox_s
    stop_reason: str  # timebox | max_steps | heartbeat
    peak_rss_mb: float
    peak_cuda_mb: float | None
    node_id: str
    device: str
    run_id: str | None
    job_index: int | None
    resumed_from: str | None  # checkpoint this job started from (a partial one after a crash)
    resumed_kind: str  # fresh | resume_from | partial | reused
    checkpoints_written: int
    last_save_seconds: float
    feature_cache_hit: bool
    dataset_version: str
    base_model_hash: str
    trainable_parameters: int
    loss_history: list[float]  # this job's per-step losses (all attempts)
    first_step_at: float | None = None  # wall-clock time (time.time()) of this attempt's first step

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> AdapterJobResult:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def metrics(self) -> dict[str, float | int | str | None]:
        """Scalar fields (everything but the loss history), e.g. for asset metadata."""
        return {k: v for k, v in self.to_json().items() if k != "loss_history"}


# --------------------------------------------------------------------------- helpers


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_node_id() -> str:
    if os.environ.get("MLOC_NODE_ID"):
        return os.environ["MLOC_NODE_ID"]
    node = socket.gethostname()
    if torch.cuda.is_available():
        uuid = getattr(torch.cuda.get_device_properties(0), "uuid", None)
        if uuid is not None:
            node += f"-GPU-{uuid}"
    return node


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


SMALL_MODEL_PARAMS = 20_000_000


def auto_cpu_threads(model: torch.nn.Module, device: str) -> int | None:
    """Intra-op CPU threads for a job: 1 for small models on CPU, else torch's default (None).

    The tiny GRU's per-timestep matmuls are far too small to split: OpenMP synchronisation costs
    more than a second core gains, and spinning OpenMP threads collapse when the cores are shared
    with other processes (measured on 2 shared cores: 1 thread ~90 samples/s, 2 threads 9–16)."""
    if device != "cpu":
        return None
    return 1 if sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMS else None


@contextlib.contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` intra-op threads (None: leave torch's setting), restored afterwards."""
    previous = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def deterministic(device: str, enabled: bool | None = None) -> Iterator[None]:
    """Deterministic kernels for the duration of a job (restored afterwards).

    ``enabled=None`` means on for CUDA (atomics make several kernels nondeterministic there) and off
    for CPU: the CPU kernels of these models are already deterministic at a fixed thread count (the
    exact-resume tests run without the flag), and the flag's sort-based fallbacks cost ~5 % of CPU
    throughput."""
    if enabled is None:
        enabled = device.startswith("cuda")
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    if enabled and device.startswith("cuda"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if enabled:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class SampleStream:
    """The data order, position exact to the sample.

    Epoch ``e`` visits every one of the ``n`` training rows once, plus ``extra_per_epoch`` rehearsal
    rows (indices ``n + j``) chosen by ``permutation(default_rng([seed, e, 1]))`` from ``extra_n``,
    all in the order ``permutation(default_rng([seed, e]))``. A batch takes the next ``batch_size``
    rows of this endless stream (crossing epoch boundaries). Depends on no global RNG, so
    (epoch, index, seed) is the whole position.
    """

    def __init__(self, n: int, seed: int, epoch: int = 0, index: int = 0, extra_n: int = 0,
                 extra_per_epoch: int = 0):
        if n <= 0:
            raise ValueError("no training rows")
        self.n, self.seed, self.epoch, self.index = n, seed, epoch, index
        self.extra_n, self.extra_per_epoch = extra_n, (extra_per_epoch if extra_n else 0)
        self._order = self._epoch_order(epoch)

    @classmethod
    def from_position(cls, d: dict) -> SampleStream:
        return cls(d["rows"], d["perm_seed"], d["epoch"], d["index"], d.get("extra_rows", 0),
                   d.get("extra_per_epoch", 0))

    def _epoch_order(self, epoch: int) -> np.ndarray:
        rows = np.arange(self.n)
        if self.extra_per_epoch:
            pick = np.random.default_rng([self.seed, epoch, 1]).permutation(self.extra_n)
            pick = np.resize(pick, self.extra_per_epoch)  # repeats only if asked for more than exist
            rows = np.concatenate([rows, self.n + pick])
        return rows[np.random.default_rng([self.seed, epoch]).permutation(len(rows))]

    def next_batch(self, batch_size: int) -> list[int]:
        out: list[int] = []
        while len(out) < batch_size:
            if self.index >= len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
            take = min(batch_size - len(out), len(self._order) - self.index)
            out.extend(int(i) for i in self._order[self.index:self.index + take])
            self.index += take
        return out

    def position(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "perm_seed": self.seed, "rows": self.n,
                "extra_rows": self.extra_n, "extra_per_epoch": self.extra_per_epoch}


def _batch(fs: FeatureSet, labels: list[list[int]], idx: list[int], device: str) -> tuple[dict, int]:
    b = collate([fs.item(i) for i in idx], [labels[i] for i in idx])
    frames = int(b["attention_mask"].sum())
    return {k: v.to(device, non_blocking=True) for k, v in b.items()}, frames


def _rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
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


def _set_rng_state(meta: dict, tensors: dict[str, torch.Tensor]) -> None:
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
    jobs: list[dict] = field(default_factory=list)  # per job: node, device, throughput, steps
    run: dict = field(default_factory=dict)  # run_id, job_index, job_start_step, resume_from

    def snapshot(self, model: torch.nn.Module, opt: AdamW, sched: LambdaLR, stream: SampleStream,
                 hparams: AdapterHParams, identity: dict) -> tuple[dict, dict[str, torch.Tensor]]:
        """(json, tensors) of the state right now, on CPU, detached from the live objects."""
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
        rng_meta, rng_tensors = _rng_state()
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

    def restore(self, meta: dict, tensors: dict[str, torch.Tensor], model: torch.nn.Module, opt: AdamW,
                sched: LambdaLR) -> SampleStream:
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
        _set_rng_state(meta["rng"], tensors)
        self.step, self.samples = meta["step"], meta["samples"]
        self.loss_history = list(meta["loss_history"])
        self.jobs = list(meta["jobs"])
        return SampleStream.from_position(meta["data"])


def _write_dir_atomically(dest: Path, write: Callable[[Path], None]) -> float:
    """Write into a hidden temp dir beside ``dest``, fsync, rename. Returns seconds taken."""
    t = time.perf_counter()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        write(tmp)
        fsync_tree(tmp)
        if dest.exists():  # only a stale copy of the same step can be here; replace it
            shutil.rmtree(dest)
        os.rename(tmp, dest)
        fd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except SafetensorError as exc:
        # safetensors reports ENOSPC/EFBIG as its own error type; callers handle OSError.
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(f"cannot write {dest}: {exc}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return time.perf_counter() - t


def _write_checkpoint(dest: Path, model, meta: dict, tensors: dict[str, torch.Tensor],
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
    return _write_dir_atomically(dest, write)


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


# --------------------------------------------------------------------------- adapter job


def _identity(spec: AdapterJobSpec, base_hash: str, dv: DatasetVersion, rehearsal: DatasetVersion | None) -> dict:
    return {"base_model_hash": base_hash, "base_model_dir": str(spec.base_model_dir),
            "dataset_version": dv.version, "dialect": dv.dialect,
            "rehearsal_version": rehearsal.version if rehearsal else None,
            "rehearsal_dialect": rehearsal.dialect if rehearsal else None}


def _check_resumable(meta: dict, source: Path, hparams: AdapterHParams, identity: dict) -> None:
    saved = meta["hparams"]
    mine = asdict(hparams)
    diff = {k for k in mine if saved.get(k) != mine[k]}
    if diff:
        raise ResumeError(f"{source}: hyper-parameters {sorted(diff)} differ from the run's checkpoint "
                          f"({ {k: saved.get(k) for k in sorted(diff)} } vs { {k: mine[k] for k in sorted(diff)} })")
    for key in ("base_model_hash", "dataset_version", "rehearsal_version"):
        if meta["identity"].get(key) != identity[key]:
            raise ResumeError(f"{source}: {key} {meta['identity'].get(key)!r} != this job's {identity[key]!r}; "
                              "a training run pins its base model and dataset version")


def train_adapter(spec: AdapterJobSpec) -> AdapterJobResult:
    """Run one timeboxed LoRA adapter job; see the module docstring for resume and timebox rules."""
    t0 = time.monotonic() - (max(0.0, time.time() - spec.started_at) if spec.started_at else 0.0)
    log = spec.log or (lambda _msg: None)
    out = Path(spec.out_dir)
    if (out / RESULT_JSON).is_file():
        validate_checkpoint_dir(out)
        result = AdapterJobResult.from_json(json.loads((out / RESULT_JSON).read_text()))
        result.resumed_kind = "reused"
        log(f"{out} already holds this job's finished checkpoint (step {result.total_steps}); not training again")
        return result

    device = spec.device or default_device()
    hp = spec.hparams
    node_id = spec.node_id or default_node_id()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with contextlib.ExitStack() as stack:
        stack.enter_context(deterministic(device, spec.deterministic))
        bm = load_base_model(spec.base_model_dir, device)
        stack.enter_context(cpu_threads(spec.cpu_threads or auto_cpu_threads(bm.model, device)))
        base_hash = model_dir_hash(spec.base_model_dir)
        dv = DatasetVersion(spec.dataset_version_path)
        train = load_features(dv, "train", bm.feature_extractor, spec.feature_cache_dir, log)
        dev = load_features(dv, spec.eval_split, bm.feature_extractor, spec.feature_cache_dir, log)
        rehearsal = DatasetVersion(spec.rehearsal_dataset_path) if spec.rehearsal_dataset_path else None
        n_rows, n_extra, extra_per_epoch = len(train), 0, 0
        if rehearsal is not None:
            extra = load_features(rehearsal, "train", bm.feature_extractor, spec.feature_cache_dir, log)
            n_extra = len(extra)
            f = min(max(hp.rehearsal_fraction, 0.0), 0.9)
            extra_per_epoch = round(n_rows * f / (1 - f))
            train = concat_feature_sets(train, extra)
        labels = [bm.tokenizer.encode(t) for t in train.texts]
        identity = _identity(spec, base_hash, dv, rehearsal)

        partial = latest_partial(out)
        source, kind = ((partial, "partial") if partial is not None
                        else (Path(spec.resume_from), "resume_from") if spec.resume_from else (None, "fresh"))
        meta = tensors = None
        if source is not None:
            validate_checkpoint_dir(source, base_model=bm.model)
            meta, tensors = TrainState.read(source)
            _check_resumable(meta, source, hp, identity)

        seed_everything(hp.seed)
        targets = list(hp.target_modules or default_lora_targets(bm.model))
        lora = LoraConfig(r=hp.r, lora_alpha=hp.alpha, lora_dropout=hp.dropout, target_modules=targets,
                          bias="none", init_lora_weights=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model = get_peft_model(bm.model, lora)
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = AdamW(trainable, lr=hp.lr, weight_decay=hp.weight_decay)
        warmup = max(1, hp.warmup_steps)
        sched = LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))

        ts = TrainState()
        if meta is not None:
            stream = ts.restore(meta, tensors, model, opt, sched)
            if (stream.n, stream.extra_n, stream.extra_per_epoch) != (n_rows, n_extra, extra_per_epoch):
                raise ResumeError(f"{source}: data position is over {stream.n}+{stream.extra_n} rows, "
                                  f"this job has {n_rows}+{n_extra}")
        else:
            stream = SampleStream(n_rows, hp.seed, extra_n=n_extra, extra_per_epoch=extra_per_epoch)
        if kind == "partial":
            ts.run = dict(meta["run"])  # same job: keep its start step (and step budget)
        else:
            ts.run = {"run_id": spec.run_id, "job_index": spec.job_index, "job_start_step": ts.step,
                      "job_start_samples": ts.samples, "resume_from": str(source) if source else None}
        job_start_step, job_start_samples = ts.run["job_start_step"], ts.run["job_start_samples"]
        log(f"adapter job: {kind}" + (f" from {source} (step {ts.step})" if source else "") +
            f", {len(train)} training rows, device {device} ({torch.get_num_threads()} CPU threads), node {node_id}")

        # ---- the loop
        step_times: deque[float] = deque(maxlen=20)
        pending: list[torch.Tensor] = []
        job_losses: list[float] = []
        eval_frames = dev.frames
        frame_times: deque[float] = deque(maxlen=20)  # training seconds per frame (forward + backward)
        # until the first save is measured: state ≈ 4 copies of the trainable weights, at 50 MB/s
        save_s = 0.2 + 16 * sum(p.numel() for p in trainable) / 50e6
        checkpoints = 0
        stop_reason = "timebox"
        job_samples = 0
        t_first = t_last = None
        last_ckpt_t = last_progress_t = last_heartbeat_t = time.monotonic()

        def flush_losses() -> None:
            if pending:
                values = torch.stack(pending).tolist()
                pending.clear()
                ts.loss_history.extend(values)
                job_losses.extend(values)

        def final_cost() -> float:
            # inference costs well under a third of a training step per frame (no backward, sorted
            # batches); budget a third, plus a constant for decoding and scoring
            eval_s = eval_frames * (max(frame_times) if frame_times else 0.0) / 3 + 0.3
            return 2.0 * save_s + eval_s

        def progress(event: str, checkpoint: str | None = None) -> None:
            nonlocal last_progress_t
            if spec.progress is None:
                return
            now = time.monotonic()
            last_progress_t = now
            flush_losses()
            train_s = (t_last - t_first) if t_first is not None and t_last is not None else 0.0
            eta = max(0.0, spec.timebox_s - (now - t0) - final_cost())
            if spec.max_steps is not None and step_times:
                eta = min(eta, (job_start_step + spec.max_steps - ts.step) * max(step_times))
            spec.progress(Progress(ts.step, ts.step - job_start_step, job_samples,
                                   job_losses[-1] if job_losses else float("nan"),
                                   job_samples / train_s if train_s > 0 else 0.0, eta, now - t0,
                                   stream.epoch, event, checkpoint))

        while True:
            if spec.max_steps is not None and ts.step - job_start_step >= spec.max_steps:
                stop_reason = "max_steps"
                break
            now = time.monotonic()
            step_est = 1.5 * max(step_times) if step_times else 0.0
            if now - t0 + step_est + final_cost() > spec.timebox_s:
                stop_reason = "timebox"
                break
            if spec.heartbeat is not None and now - last_heartbeat_t >= spec.heartbeat_every_s:
                last_heartbeat_t = now
                if spec.heartbeat() is False:
                    stop_reason = "heartbeat"
                    break

            t_step = time.monotonic()
            if t_first is None:
                t_first = t_step
            idx = stream.next_batch(hp.batch_size)
            batch, frames = _batch(train, labels, idx, device)
            loss = model(**batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if hp.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(trainable, hp.max_grad_norm)
            opt.step()
            sched.step()
            ts.step += 1
            ts.samples += len(idx)
            job_samples += len(idx)
            pending.append(loss.detach())
            if device == "cpu" or len(pending) >= 50:
                flush_losses()
            t_last = time.monotonic()
            step_times.append(t_last - t_step)
            frame_times.append((t_last - t_step) / max(1, frames))

            every_steps = spec.checkpoint_every_steps
            if (t_last - last_ckpt_t >= spec.checkpoint_every_s
                    or (every_steps and (ts.step - job_start_step) % every_steps == 0)):
                flush_losses()
                ckpt_meta, ckpt_tensors = ts.snapshot(model, opt, sched, stream, hp, identity)
                dest = partial_dir(out) / f"step-{ts.step:09d}"
                save_s = _write_checkpoint(dest, model, ckpt_meta, ckpt_tensors)
                for old in partial_dir(out).glob("step-*"):
                    if old != dest:
                        shutil.rmtree(old, ignore_errors=True)
                checkpoints += 1
                last_ckpt_t = time.monotonic()
                log(f"checkpoint step {ts.step} → {dest} ({save_s:.2f}s)")
                progress("checkpoint", str(dest))
            elif spec.progress is not None and t_last - last_progress_t >= spec.progress_every_s:
                progress("step")

        # ---- the end: snapshot, evaluate, save, return
        flush_losses()
        t_loop_end = t_last if t_last is not None else time.monotonic()
        train_seconds = (t_last - t_first) if t_first is not None and t_last is not None else 0.0
        job_record = {"node_id": node_id, "device": device, "run_id": spec.run_id, "job_index": spec.job_index,
                      "start_step": job_start_step, "end_step": ts.step, "samples": job_samples,
                      "train_seconds": round(train_seconds, 3),
                      "samples_per_s": round(job_samples / train_seconds, 3) if train_seconds > 0 else 0.0,
                      "finished_at": time.time()}
        ts.jobs.append(job_record)
        final_meta, final_tensors = ts.snapshot(model, opt, sched, stream, hp, identity)
        job_history = ts.loss_history[job_start_step:]
        rates = error_rates(transcribe(model, bm.tokenizer, dev, spec.eval_batch_size, device))
        peak_cuda = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None

        def result_json() -> dict:
            now = time.monotonic()
            startup = (t_first - t0) if t_first is not None else (t_loop_end - t0)
            r = AdapterJobResult(
                path=str(out), sha256="", steps=ts.step - job_start_step, samples=ts.samples - job_start_samples,
                total_steps=ts.step, total_samples=ts.samples, epoch=round(stream.epoch + stream.index /
                                                                           len(stream._order), 4),
                train_loss=float(np.mean(job_history)) if job_history else float("nan"),
                dev_cer=rates["cer"], dev_wer=rates["wer"],
                samples_per_s=job_samples / train_seconds if train_seconds > 0 else 0.0,
                train_seconds=train_seconds, overhead_seconds=startup + (now - t_loop_end),
                wall_seconds=now - t0, timebox_s=spec.timebox_s,
                utilization=train_seconds / spec.timebox_s if spec.timebox_s else 0.0,
                stop_reason=stop_reason, peak_rss_mb=peak_rss_mb(), peak_cuda_mb=peak_cuda, node_id=node_id,
                device=device, run_id=spec.run_id, job_index=spec.job_index,
                resumed_from=str(source) if source else None, resumed_kind=kind,
                checkpoints_written=checkpoints + 1, last_save_seconds=save_s,
                feature_cache_hit=train.cache_hit and dev.cache_hit, dataset_version=dv.version,
                base_model_hash=base_hash, trainable_parameters=sum(p.numel() for p in trainable),
                loss_history=job_history,
                first_step_at=time.time() - (now - t_first) if t_first is not None else None)
            return r.to_json()

        holder: dict = {}

        def final_result(tmp: Path, save_seconds: float) -> dict:
            holder["result"] = result_json() | {"sha256": file_sha256(tmp / ADAPTER_WEIGHTS),
                                                "last_save_seconds": save_seconds}
            return holder["result"]

        _write_checkpoint(out, model, final_meta, final_tensors, final_result)
        shutil.rmtree(partial_dir(out), ignore_errors=True)
        result = AdapterJobResult.from_json(holder["result"])
        result.wall_seconds = time.monotonic() - t0
        log(f"adapter job done: {result.steps} steps ({stop_reason}), loss {result.train_loss:.3f}, "
            f"dev CER {result.dev_cer:.3f}, {result.samples_per_s:.1f} samples/s, "
            f"{result.wall_seconds:.1f}s of {spec.timebox_s:.0f}s")
        if spec.progress is not None:
            progress("done", str(out))
        return result


# --------------------------------------------------------------------------- base pre-training


def pretrain_base(dataset_version_path: str | Path, out_dir: str | Path, train_seconds: float, seed: int = 0, *,
                  device: str | None = None, batch_size: int = 16, lr: float = 4e-3, warmup_steps: int = 50,
                  weight_decay: float = 0.01, max_grad_norm: float = 5.0, max_steps: int | None = None,
                  model_config: dict | None = None, cpu_threads_per_job: int | None = None,
                  feature_cache_dir: str | Path | None = None, eval_batch_size: int = 32,
                  log: Callable[[str], None] | None = None) -> dict:
    """Train the tiny CTC model from scratch on the train split of a dataset version for
    ``train_seconds`` of wall time, evaluate it on dev and test, and save it to ``out_dir``
    atomically (config.json + model.safetensors, vocab.json, preprocessor_config.json, and
    training.json with these metrics). Returns the metrics.

    The learning rate warms up, then follows a cosine over the budget. With ``max_steps`` the budget
    is whichever of time and steps runs out first; tests use steps so that the model they get does
    not depend on how busy the machine is.
    """
    log = log or (lambda _msg: None)
    device = device or default_device()
    t_start = time.monotonic()
    seed_everything(seed)
    bm = new_tiny_model(**(model_config or {}))
    model = bm.model.to(device)
    dv = DatasetVersion(dataset_version_path)
    train = load_features(dv, "train", bm.feature_extractor, feature_cache_dir, log)
    labels = [bm.tokenizer.encode(t) for t in train.texts]
    opt = AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    stream = SampleStream(len(train), seed)
    losses: list[float] = []
    steps = samples = 0
    with cpu_threads(cpu_threads_per_job or auto_cpu_threads(model, device)):
        model.train()
        t0 = last_log = time.monotonic()
        while (elapsed := time.monotonic() - t0) < train_seconds and (max_steps is None or steps < max_steps):
            frac = max(elapsed / train_seconds, steps / max_steps if max_steps else 0.0)
            scale = min(1.0, (steps + 1) / warmup_steps) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
            for g in opt.param_groups:
                g["lr"] = lr * scale
            idx = stream.next_batch(batch_size)
            batch, _ = _batch(train, labels, idx, device)
            loss = model(**batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            opt.step()
            steps += 1
            samples += len(idx)
            losses.append(loss.item())
            if time.monotonic() - last_log >= 15:
                last_log = time.monotonic()
                log(f"pretrain step {steps}, {elapsed:.0f}/{train_seconds:.0f}s, loss {np.mean(losses[-20:]):.3f}")
        train_s = time.monotonic() - t0
        model.eval()
        metrics: dict = {"dialect": dv.dialect, "dataset_version": dv.version, "device": device,
                         "parameters": bm.num_parameters, "steps": steps, "samples": samples,
                         "epochs": round(samples / len(train), 2), "train_seconds": round(train_s, 2),
                         "samples_per_s": round(samples / train_s, 2) if train_s > 0 else 0.0,
                         "train_loss": float(np.mean(losses[-50:])) if losses else float("nan"),
                         "feature_cache_hit": train.cache_hit, "seed": seed, "batch_size": batch_size, "lr": lr,
                         "cpu_threads": torch.get_num_threads()}
        for split in ("dev", "test"):
            fs = load_features(dv, split, bm.feature_extractor, feature_cache_dir, log)
            rates = error_rates(transcribe(model, bm.tokenizer, fs, eval_batch_size, device))
            metrics[f"{split}_cer"], metrics[f"{split}_wer"] = rates["cer"], rates["wer"]
    model.to("cpu")
    save_base_model(bm, out_dir, extra=metrics)
    metrics["path"] = str(out_dir)
    metrics["model_hash"] = model_dir_hash(out_dir)
    metrics["wall_seconds"] = round(time.monotonic() - t_start, 2)
    log(f"base model: {steps} steps, dev CER {metrics['dev_cer']:.3f}, test CER {metrics['test_cer']:.3f}")
    return metrics
