"""Timeboxed, exactly resumable LoRA adapter jobs on the TTS model (``train_tts_adapter``).

The contract is ``core.training.loops.train_adapter``'s, built from the same parts:

- ``SampleStream`` (``core/training/sample_stream.py``): the data order, exact to the sample;
- ``TrainState`` + ``write_checkpoint`` / ``write_partial`` / ``latest_partial`` / ``check_resumable``
  (``core/training/checkpoint.py``): weights, optimizer, scheduler, RNG and data position as safetensors +
  JSON, written atomically, checked before resuming (hyper-parameters, base model hash, dataset
  version; here also ``aligner_hash``, the ASR whose alignment gave the durations);
- ``train_step``, ``Timebox``, ``LossLog``, ``cpu_threads``, ``seed_everything`` (``core/training/runtime.py``).

**Where a job starts** (same rules as ASR; every checkpoint read is validated first):
``<out_dir>/result.json`` → the job already finished, return its result; else the newest
``<out_dir>.partial/step-*`` (a crashed attempt of this job); else ``resume_from`` (the previous
job's final checkpoint); else fresh from the seed.

**Timebox.** Before every step: one more step plus the final evaluation (dev frame L1, teacher
forced) and two saves must fit in ``timebox_s``; ``max_steps`` is an optional step budget; a
``heartbeat`` returning False stops the loop cleanly.

**The broken control.** ``hparams.shuffle_texts`` trains on recordings paired with other
utterances' texts (``data.shuffle_texts``): a deliberately broken adapter for the stop-loss tests.
It is an hparam, so a run cannot switch it between jobs.
"""

from __future__ import annotations

import contextlib
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
from peft import LoraConfig, get_peft_model
from torch.optim import AdamW
from torch.optim.lr_scheduler import LambdaLR

from mloc_dagster.core.adapters.format import ADAPTER_WEIGHTS, RESULT_JSON, read_adapter_dir
from mloc_dagster.core.data.datasets import DatasetVersion
from mloc_dagster.core.models.ctc import load_base_model
from mloc_dagster.core.publish import file_sha256, model_dir_hash
from mloc_dagster.core.training.checkpoint import (
    ResumeError,
    TrainState,
    check_resumable,
    latest_partial,
    partial_dir,
    write_checkpoint,
    write_partial,
)
from mloc_dagster.core.training.runtime import (
    LossLog,
    StopRule,
    Timebox,
    cpu_threads,
    default_device,
    default_node_id,
    seed_everything,
    train_step,
)
from mloc_dagster.core.training.sample_stream import SampleStream
from mloc_dagster.core.tts.data import load_rows, make_tts_batch, shuffle_texts
from mloc_dagster.core.tts.hparams import TtsAdapterHParams
from mloc_dagster.core.tts.model import DEFAULT_TTS_LORA_TARGETS, load_tts_model
from mloc_dagster.core.tts.pretrain import frame_l1


@dataclass
class TtsAdapterJobSpec:
    base_tts_dir: str | Path
    aligner_dir: str | Path  # the base ASR whose forced alignment gives the durations
    dataset_version_path: str | Path
    out_dir: str | Path
    resume_from: str | Path | None = None
    timebox_s: float = 3600.0
    checkpoint_every_s: float = 300.0
    checkpoint_every_steps: int | None = None
    hparams: TtsAdapterHParams = field(default_factory=TtsAdapterHParams)
    max_steps: int | None = None
    device: str | None = None
    node_id: str | None = None
    run_id: str | None = None
    job_index: int | None = None
    cpu_threads: int = 1
    eval_split: str = "dev"
    eval_limit: int = 32
    heartbeat: Callable[[], bool | None] | None = None
    heartbeat_every_s: float = 5.0
    log: Callable[[str], None] | None = None


@dataclass
class TtsAdapterJobResult:
    path: str
    sha256: str
    steps: int
    samples: int
    total_steps: int
    total_samples: int
    epoch: float
    train_loss: float
    dev_frame_l1: float
    samples_per_s: float
    train_seconds: float
    wall_seconds: float
    timebox_s: float
    stop_reason: str  # timebox | max_steps | heartbeat
    node_id: str
    device: str
    run_id: str | None
    job_index: int | None
    resumed_from: str | None
    resumed_kind: str  # fresh | resume_from | partial | reused
    checkpoints_written: int
    dataset_version: str
    base_model_hash: str
    aligner_hash: str
    trainable_parameters: int
    loss_history: list[float]
    track: str = "tts"

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> TtsAdapterJobResult:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class _TtsAdapterJob:
    """``open`` (rows, model, resume) → ``loop`` → ``finish`` (evaluate, save, result)."""

    def __init__(self, spec: TtsAdapterJobSpec, t0: float):
        self.spec, self.hp, self.t0 = spec, spec.hparams, t0
        self.log = spec.log or (lambda _msg: None)
        self.out = Path(spec.out_dir)
        self.device = spec.device or default_device()
        self.node_id = spec.node_id or default_node_id()
        self.checkpoints, self.job_samples, self.stop_reason = 0, 0, "timebox"

    def open(self, stack: contextlib.ExitStack) -> None:
        spec, hp = self.spec, self.hp
        stack.enter_context(cpu_threads(spec.cpu_threads if self.device == "cpu" else None))
        self.tm = load_tts_model(spec.base_tts_dir, self.device)
        aligner = load_base_model(spec.aligner_dir)
        self.dv = DatasetVersion(spec.dataset_version_path)
        self.train = load_rows(self.dv, "train", aligner, hp.train_limit)
        if hp.shuffle_texts:
            self.train = shuffle_texts(self.train, hp.seed)
        self.dev = load_rows(self.dv, spec.eval_split, aligner, spec.eval_limit)
        self.identity = {"base_model_hash": model_dir_hash(spec.base_tts_dir), "dataset_version": self.dv.version,
                         "dialect": self.dv.dialect, "rehearsal_version": None,
                         "aligner_hash": model_dir_hash(spec.aligner_dir), "track": "tts"}
        self._resume_source()
        seed_everything(hp.seed)
        lora = LoraConfig(r=hp.r, lora_alpha=hp.alpha, lora_dropout=hp.dropout, bias="none",
                          target_modules=list(hp.target_modules or DEFAULT_TTS_LORA_TARGETS))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model = get_peft_model(self.tm.model, lora)
        self.model.train()
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = AdamW(self.trainable, lr=hp.lr, weight_decay=hp.weight_decay)
        warmup = max(1, hp.warmup_steps)
        self.sched = LambdaLR(self.opt, lambda s: min(1.0, (s + 1) / warmup))
        self._restore()
        self.losses = LossLog(self.device, self.ts.loss_history)
        self.save_s = 0.2 + 16 * sum(p.numel() for p in self.trainable) / 50e6
        self.timebox = Timebox(spec.timebox_s, self.t0, self.final_cost)
        self.log(f"tts adapter job: {self.kind}, {len(self.train)} rows, step {self.ts.step}")

    def _resume_source(self) -> None:
        partial = latest_partial(self.out)
        self.source, self.kind = ((partial, "partial") if partial is not None
                                  else (Path(self.spec.resume_from), "resume_from") if self.spec.resume_from
                                  else (None, "fresh"))
        self.meta = self.tensors = None
        if self.source is not None:
            read_adapter_dir(self.source, base_model=self.tm.model)  # may come from another node
            self.meta, self.tensors = TrainState.read(self.source)
            check_resumable(self.meta, self.source, self.hp, self.identity)
            if self.meta["identity"].get("aligner_hash") != self.identity["aligner_hash"]:
                raise ResumeError(f"{self.source}: durations came from another aligner ASR")

    def _restore(self) -> None:
        self.ts = ts = TrainState()
        if self.meta is not None:
            self.stream = ts.restore(self.meta, self.tensors, self.model, self.opt, self.sched)
            if self.stream.n != len(self.train):
                raise ResumeError(f"{self.source}: data position is over {self.stream.n} rows, this job has "
                                  f"{len(self.train)}")
        else:
            self.stream = SampleStream(len(self.train), self.hp.seed)
        if self.kind == "partial":
            ts.run = dict(self.meta["run"])
        else:
            ts.run = {"run_id": self.spec.run_id, "job_index": self.spec.job_index, "job_start_step": ts.step,
                      "job_start_samples": ts.samples, "resume_from": str(self.source) if self.source else None,
                      "track": "tts"}
        self.job_start_step, self.job_start_samples = ts.run["job_start_step"], ts.run["job_start_samples"]

    def final_cost(self) -> float:
        """Two saves and the dev evaluation (a forward pass costs about a third of a step per frame)."""
        dev_frames = sum(len(f) for f in self.dev.frames)
        return 2.0 * self.save_s + dev_frames * self.timebox.slowest_frame_s / 3 + 0.3

    def step(self) -> None:
        t_step = time.monotonic()
        idx = self.stream.next_batch(self.hp.batch_size)
        batch, frames = make_tts_batch(self.train, self.tm.stats, idx, self.device)
        loss = train_step(lambda: self.model(**batch, return_dict=True).loss, self.opt, self.trainable,
                          self.hp.max_grad_norm, self.sched)
        self.ts.step += 1
        self.ts.samples += len(idx)
        self.job_samples += len(idx)
        self.losses.add(loss)
        self.timebox.record(t_step, frames)

    def should_stop(self, now: float) -> str | None:
        return self.stop_rule.reason(now, self.ts.step - self.job_start_step)

    def loop(self) -> None:
        spec = self.spec
        self.stop_rule = StopRule(self.timebox, spec.max_steps, spec.heartbeat, spec.heartbeat_every_s)
        self.last_ckpt_t = time.monotonic()
        while (reason := self.should_stop(time.monotonic())) is None:
            self.step()
            every = spec.checkpoint_every_steps
            if (self.timebox.last_step_end - self.last_ckpt_t >= spec.checkpoint_every_s
                    or (every and (self.ts.step - self.job_start_step) % every == 0)):
                self.losses.flush()
                meta, tensors = self.ts.snapshot(self.model, self.opt, self.sched, self.stream, self.hp, self.identity)
                dest, self.save_s = write_partial(self.out, self.model, meta, tensors, self.ts.step)
                self.checkpoints += 1
                self.last_ckpt_t = time.monotonic()
                self.log(f"tts checkpoint step {self.ts.step} → {dest}")
        self.stop_reason = reason

    def finish(self) -> TtsAdapterJobResult:
        ts, tb, spec = self.ts, self.timebox, self.spec
        self.losses.flush()
        # frame_l1 reads no RNG (dropout off), so the snapshot after it equals one before.
        dev_l1 = frame_l1(self.tm, self.dev, device=self.device)
        ts.jobs.append({"node_id": self.node_id, "device": self.device, "run_id": spec.run_id,
                        "job_index": spec.job_index, "start_step": self.job_start_step, "end_step": ts.step,
                        "samples": self.job_samples, "dev_frame_l1": dev_l1, "finished_at": time.time()})
        meta, tensors = ts.snapshot(self.model, self.opt, self.sched, self.stream, self.hp, self.identity)
        history = ts.loss_history[self.job_start_step:]
        train_s = tb.train_seconds
        result = TtsAdapterJobResult(
            path=str(self.out), sha256="", steps=ts.step - self.job_start_step,
            samples=ts.samples - self.job_start_samples, total_steps=ts.step, total_samples=ts.samples,
            epoch=round(self.stream.epoch_progress, 4),
            train_loss=float(np.mean(history)) if history else float("nan"), dev_frame_l1=dev_l1,
            samples_per_s=self.job_samples / train_s if train_s > 0 else 0.0, train_seconds=train_s,
            wall_seconds=0.0, timebox_s=spec.timebox_s, stop_reason=self.stop_reason, node_id=self.node_id,
            device=self.device, run_id=spec.run_id, job_index=spec.job_index,
            resumed_from=str(self.source) if self.source else None, resumed_kind=self.kind,
            checkpoints_written=self.checkpoints + 1, dataset_version=self.dv.version,
            base_model_hash=self.identity["base_model_hash"], aligner_hash=self.identity["aligner_hash"],
            trainable_parameters=sum(p.numel() for p in self.trainable), loss_history=history)

        def result_json(tmp: Path, _save_s: float) -> dict:
            result.sha256 = file_sha256(tmp / ADAPTER_WEIGHTS)
            result.wall_seconds = time.monotonic() - self.t0
            return result.to_json()

        write_checkpoint(self.out, self.model, meta, tensors, result_json)
        shutil.rmtree(partial_dir(self.out), ignore_errors=True)
        self.log(f"tts adapter job done: {result.steps} steps ({self.stop_reason}), dev frame L1 {dev_l1:.3f}")
        return result


def train_tts_adapter(spec: TtsAdapterJobSpec) -> TtsAdapterJobResult:
    """Run one timeboxed TTS LoRA job; see the module docstring for resume and timebox rules."""
    t0 = time.monotonic()
    out = Path(spec.out_dir)
    if (out / RESULT_JSON).is_file():
        result = TtsAdapterJobResult.from_json(read_adapter_dir(out).result)
        result.resumed_kind = "reused"
        return result
    job = _TtsAdapterJob(spec, t0)
    with contextlib.ExitStack() as stack:
        job.open(stack)
        job.loop()
        return job.finish()


def load_tts_adapter(base_tts_dir: str | Path, adapter_dir: str | Path, device: str = "cpu"):
    """The base TTS with an adapter checkpoint's LoRA merged in (a ``TtsModel``, eval mode): what
    a candidate synthesizes with. The checkpoint is validated first (``core/adapters/format.py``: no
    pickle or code, LoRA A/B pairs only, shapes of this base model)."""
    from peft import PeftModel

    tm = load_tts_model(base_tts_dir, device)
    read_adapter_dir(adapter_dir, base_model=tm.model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(tm.model, str(adapter_dir), is_trainable=False)
    tm.model = peft_model.merge_and_unload().eval()
    tm.path = Path(adapter_dir)
    return tm
