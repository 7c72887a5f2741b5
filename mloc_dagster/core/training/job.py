"""The adapter job, written once for every track: a timeboxed, exactly resumable peft loop
(``get_peft_model``, AdamW, a LambdaLR warm-up). What a track trains on — its model, data, batch,
loss and evaluation — is a ``Workload`` (the ASR track's in ``core/training/asr.py``, the TTS
track's in ``core/tts/training.py``); everything else is here, once:

- ``core/training/sample_stream.py``: the data order, exact to the sample (``SampleStream``);
- ``core/training/checkpoint.py``: the ``TrainState`` (weights, optimizer, scheduler, RNG, data
  position) and its checkpoint I/O (safetensors + JSON, atomic), the checks before resuming;
- ``core/training/runtime.py``: the optimizer step, the ``Timebox``, the loss log, seeds and threads;
- ``core/training/spec.py``: the job's spec (``JobSpec``), its progress and its result (``JobResult``).

**Exact resume.** Job k+1 continues bit-for-bit where job k stopped: a chain of jobs reproduces
the uninterrupted loss curve (see ``core/training/checkpoint.py`` for what is saved).

**Where a job starts.** ``<out_dir>/result.json`` exists → the job already finished (a retry after
a late failure): return the stored result without training; else the newest
``<out_dir>.partial/step-*`` → the previous attempt of *this* job crashed: resume there (losing at
most ``checkpoint_every_s`` of work) and keep this job's original step budget; else ``resume_from``
(the previous job's final checkpoint of the same run); else the warm start (``init_adapter``, a
run's first job); else start fresh from the seed. Every checkpoint read is validated first
(``core/adapters/format.py``) and must match the workload's identity (base model, data, ...).

**Timebox.** The loop checks before every step whether one more step, the final evaluation and
the final save still fit before ``timebox_s`` (counted from ``started_at``, default: function
entry), using the slowest recent step time, the measured last save time and an evaluation estimate
from the measured per-frame compute. It stops itself, leaving that margin, so the job returns
before the timebox; Dagster's ``dagster/max_runtime`` is only the backstop. A ``heartbeat``
callback that returns False (pause, cancel, a lost GPU lease) stops the loop the same clean way.

Determinism: the data order depends only on (seed, epoch); RNG states are restored; CPU jobs run
with a fixed intra-op thread count (1 for small models, see ``auto_cpu_threads``) and CUDA jobs
with ``torch.use_deterministic_algorithms``.
"""

from __future__ import annotations

import contextlib
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from torch.optim import AdamW
from torch.optim.lr_scheduler import LambdaLR

from mloc_dagster.core.adapters.format import ADAPTER_WEIGHTS, RESULT_JSON, InvalidAdapter, read_adapter_dir
from mloc_dagster.core.publish import file_sha256
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
    auto_cpu_threads,
    autocast,
    cpu_threads,
    default_device,
    default_node_id,
    deterministic,
    enable_gradient_checkpointing,
    peak_rss_mb,
    seed_everything,
    train_step,
)
from mloc_dagster.core.training.sample_stream import SampleStream, check_segments, segment_cursor
from mloc_dagster.core.training.spec import JobResult, JobSpec, Progress


class Workload(Protocol):
    """What one track's adapter job trains on, opened from its spec (model and data loaded)."""

    model: torch.nn.Module  # the base model; the job wraps it in a peft model
    identity: dict  # what a checkpoint must match to resume here (``check_resumable``)
    rows: int  # training rows of the dialect
    extra_rows: int  # rehearsal rows appended after them (0: none)
    extra_per_epoch: int  # rehearsal rows drawn per epoch
    default_targets: Sequence[str]  # LoRA target modules when the hparams name none
    dev_frames: int  # frames of the evaluation split (the timebox's evaluation estimate)

    def batch(self, idx: list[int], device: str) -> tuple[dict, int]:
        """The training batch of stream positions ``idx`` on ``device``, and its frame count."""

    def loss(self, model: torch.nn.Module, batch: dict, idx: list[int]) -> torch.Tensor: ...

    def evaluate(self, model: torch.nn.Module) -> dict:
        """The job's evaluation on its dev split (reads no RNG, changes no state)."""

    def result(self, job: AdapterJob, common: dict, metrics: dict) -> JobResult:
        """The track's result from the fields every job reports and its evaluation."""


def load_warm_start(model: torch.nn.Module, adapter_dir: str | Path) -> None:
    """Put a promoted/candidate adapter's LoRA weights into a fresh peft model. The directory is
    validated like anything a node hands in (``core/adapters/format.py``, against this base model)
    and its weights are what that read; every LoRA weight of the model must be covered (same
    targets, same rank), else ``ResumeError`` says what differs."""
    from peft import set_peft_model_state_dict

    try:
        files = read_adapter_dir(adapter_dir, base_model=model)
    except InvalidAdapter as exc:
        raise ResumeError(f"warm start from {adapter_dir}: {exc}") from exc
    weights = {f"base_model.model.{m}.lora_{ab}.weight": t for ab, factors in (("A", files.lora_a), ("B", files.lora_b))
               for m, t in factors.items()}
    try:
        result = set_peft_model_state_dict(model, weights)
    except RuntimeError as exc:  # shape mismatch: another rank or base model
        raise ResumeError(f"warm start from {adapter_dir}: {str(exc).splitlines()[0]}") from exc
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise ResumeError(f"warm start from {adapter_dir}: LoRA weights missing {missing[:3]} / unexpected "
                          f"{list(result.unexpected_keys)[:3]}; use the adapter's own r, alpha and target_modules")


class AdapterJob:
    """One adapter job, from opening its inputs to its final checkpoint: ``open`` (workload,
    model, resume), ``loop`` (steps until the timebox, budget, slice or heartbeat stops it),
    ``finish`` (evaluate, save, result)."""

    def __init__(self, spec: JobSpec, open_workload: Callable[[JobSpec, str, Callable], Workload], t0: float):
        self.spec, self.hp, self.t0 = spec, spec.hparams, t0
        self.open_workload = open_workload
        self.log = spec.log or (lambda _msg: None)
        self.out = Path(spec.out_dir)
        self.device = spec.device or default_device()
        self.node_id = spec.node_id or default_node_id()
        self.checkpoints, self.job_samples, self.stop_reason = 0, 0, "timebox"

    # ---- open: inputs, model, where to start

    def open(self, stack: contextlib.ExitStack) -> None:
        spec, hp = self.spec, self.hp
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        stack.enter_context(deterministic(self.device, spec.deterministic))
        self.work = work = self.open_workload(spec, self.device, self.log)
        stack.enter_context(cpu_threads(spec.cpu_threads or auto_cpu_threads(work.model, self.device)))
        meta, tensors = self._resume_source()
        seed_everything(hp.seed)
        lora = LoraConfig(r=hp.r, lora_alpha=hp.alpha, lora_dropout=hp.dropout, bias="none", init_lora_weights=True,
                          target_modules=list(hp.target_modules or work.default_targets))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            self.model = get_peft_model(work.model, lora)
        if meta is None and spec.init_adapter:
            load_warm_start(self.model, spec.init_adapter)
            self.source, self.kind = Path(spec.init_adapter), "warm_start"
        if hp.gradient_checkpointing:
            enable_gradient_checkpointing(work.model, self.log)
        self.model.train()
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.scaler = torch.amp.GradScaler("cuda", enabled=hp.precision == "fp16" and self.device.startswith("cuda"))
        self.opt = AdamW(self.trainable, lr=hp.lr, weight_decay=hp.weight_decay)
        warmup = max(1, hp.warmup_steps)
        self.sched = LambdaLR(self.opt, lambda s: min(1.0, (s + 1) / warmup))
        self._restore(meta, tensors)
        self.slice_samples = check_segments(spec.segments) if spec.segments is not None else None
        self.losses = LossLog(self.device, self.ts.loss_history)
        # until the first save is measured: state ≈ 4 copies of the trainable weights, at 50 MB/s
        self.save_s = 0.2 + 16 * sum(p.numel() for p in self.trainable) / 50e6
        self.timebox = Timebox(spec.timebox_s, self.t0, self.final_cost)
        self.log(f"adapter job: {self.kind}" + (f" from {self.source} (step {self.ts.step})" if self.source else "") +
                 f", {work.rows + work.extra_rows} training rows, device {self.device} "
                 f"({torch.get_num_threads()} CPU threads), node {self.node_id}")

    def _resume_source(self) -> tuple[dict | None, dict | None]:
        """The checkpoint this job continues (a crashed attempt's partial, else the previous job's
        final one), read and checked; (None, None) for a fresh start."""
        partial = latest_partial(self.out)
        self.source, self.kind = ((partial, "partial") if partial is not None
                                  else (Path(self.spec.resume_from), "resume_from") if self.spec.resume_from
                                  else (None, "fresh"))
        if self.source is None:
            return None, None
        read_adapter_dir(self.source, base_model=self.work.model)  # may come from another node
        meta, tensors = TrainState.read(self.source)
        check_resumable(meta, self.source, self.hp, self.work.identity)
        return meta, tensors

    def _restore(self, meta: dict | None, tensors: dict | None) -> None:
        work, spec = self.work, self.spec
        self.ts = ts = TrainState()
        if meta is not None:
            self.stream = s = ts.restore(meta, tensors, self.model, self.opt, self.sched)
            if (s.n, s.extra_n, s.extra_per_epoch) != (work.rows, work.extra_rows, work.extra_per_epoch):
                raise ResumeError(f"{self.source}: data position is over {s.n}+{s.extra_n} rows, "
                                  f"this job has {work.rows}+{work.extra_rows}")
        else:
            self.stream = SampleStream(work.rows, self.hp.seed, extra_n=work.extra_rows,
                                       extra_per_epoch=work.extra_per_epoch)
        if self.kind == "partial":
            ts.run = dict(meta["run"])  # same job: keep its start step (and step budget)
        else:
            ts.run = {"run_id": spec.run_id, "job_index": spec.job_index, "job_start_step": ts.step,
                      "job_start_samples": ts.samples, "resume_from": str(self.source) if self.source else None}
        self.job_start_step, self.job_start_samples = ts.run["job_start_step"], ts.run["job_start_samples"]

    # ---- the loop

    def final_cost(self) -> float:
        """Seconds the end of the job needs: two saves, and the evaluation — inference costs well
        under a third of a training step per frame (no backward, sorted batches); budget a third,
        plus a constant for decoding and scoring."""
        return 2.0 * self.save_s + self.work.dev_frames * self.timebox.slowest_frame_s / 3 + 0.3

    def next_rows(self) -> list[int]:
        if self.spec.segments is None:
            return self.stream.next_batch(self.hp.batch_size)
        position, left = segment_cursor(self.spec.segments, self.ts.samples - self.job_start_samples)
        self.stream.seek(position)
        return self.stream.next_batch(min(self.hp.batch_size, left))

    def step(self) -> None:
        t_step = time.monotonic()
        idx = self.next_rows()
        batch, frames = self.work.batch(idx, self.device)
        loss = train_step(lambda: self.loss(batch, idx), self.opt, self.trainable, self.hp.max_grad_norm,
                          self.sched, self.scaler)
        self.ts.step += 1
        self.ts.samples += len(idx)
        self.job_samples += len(idx)
        self.losses.add(loss)
        if self.spec.throttle > 1 and self.ts.step - self.job_start_step > 1:
            # a simulated slow node is slower per step; a job's first step (one-time warm-up) is not its speed
            time.sleep((self.spec.throttle - 1) * (time.monotonic() - t_step))
        self.timebox.record(t_step, frames)

    def loss(self, batch: dict, idx: list[int]) -> torch.Tensor:
        with autocast(self.device, self.hp.precision):
            return self.work.loss(self.model, batch, idx)

    def should_stop(self, now: float) -> str | None:
        if self.slice_samples is not None and self.ts.samples - self.job_start_samples >= self.slice_samples:
            return "slice_done"
        return self.stop_rule.reason(now, self.ts.step - self.job_start_step)

    def loop(self) -> None:
        spec = self.spec
        if spec.on_train_start is not None:
            spec.on_train_start()
        self.stop_rule = StopRule(self.timebox, spec.max_steps, spec.heartbeat, spec.heartbeat_every_s)
        self.last_ckpt_t = self.last_progress_t = time.monotonic()
        while (reason := self.should_stop(time.monotonic())) is None:
            self.step()
            now = self.timebox.last_step_end
            every = spec.checkpoint_every_steps
            if (now - self.last_ckpt_t >= spec.checkpoint_every_s
                    or (every and (self.ts.step - self.job_start_step) % every == 0)):
                self.checkpoint()
            elif spec.progress is not None and now - self.last_progress_t >= spec.progress_every_s:
                self.progress("step")
        self.stop_reason = reason
        if spec.on_train_end is not None:
            spec.on_train_end()

    def checkpoint(self) -> None:
        self.losses.flush()
        meta, tensors = self.ts.snapshot(self.model, self.opt, self.sched, self.stream, self.hp, self.work.identity)
        dest, self.save_s = write_partial(self.out, self.model, meta, tensors, self.ts.step)
        self.checkpoints += 1
        self.last_ckpt_t = time.monotonic()
        self.log(f"checkpoint step {self.ts.step} → {dest} ({self.save_s:.2f}s)")
        self.progress("checkpoint", str(dest))

    def progress(self, event: str, checkpoint: str | None = None) -> None:
        spec = self.spec
        if spec.progress is None:
            return
        now = time.monotonic()
        self.last_progress_t = now
        train_s = self.timebox.train_seconds
        eta = self.timebox.remaining_s(now)
        if spec.max_steps is not None and self.timebox.step_times:
            eta = min(eta, (self.job_start_step + spec.max_steps - self.ts.step) * self.timebox.slowest_step_s)
        spec.progress(Progress(self.ts.step, self.ts.step - self.job_start_step, self.job_samples, self.losses.last,
                               self.job_samples / train_s if train_s > 0 else 0.0, eta, now - self.t0,
                               self.stream.epoch, event, checkpoint))

    # ---- the end: evaluate, snapshot, save, return

    def finish(self) -> JobResult:
        ts, tb = self.ts, self.timebox
        self.losses.flush()
        t_loop_end = tb.last_step_end if tb.last_step_end is not None else time.monotonic()
        train_s = tb.train_seconds
        # Evaluation reads no RNG and changes no state, so the snapshot after it equals one before.
        metrics = self.work.evaluate(self.model)
        ts.jobs.append({"node_id": self.node_id, "device": self.device, "run_id": self.spec.run_id,
                        "job_index": self.spec.job_index, "start_step": self.job_start_step, "end_step": ts.step,
                        "samples": self.job_samples, "total_samples": ts.samples,
                        "train_seconds": round(train_s, 3),
                        "samples_per_s": round(self.job_samples / train_s, 3) if train_s > 0 else 0.0,
                        **metrics, "finished_at": time.time()})
        meta, tensors = ts.snapshot(self.model, self.opt, self.sched, self.stream, self.hp, self.work.identity)
        holder: dict = {}

        def result_json(tmp: Path, save_seconds: float) -> dict:
            holder["result"] = self.work.result(self, self._common(t_loop_end, save_seconds) | {
                "sha256": file_sha256(tmp / ADAPTER_WEIGHTS)}, metrics)
            return holder["result"].to_json()

        write_checkpoint(self.out, self.model, meta, tensors, result_json)
        shutil.rmtree(partial_dir(self.out), ignore_errors=True)
        result = holder["result"]
        result.wall_seconds = time.monotonic() - self.t0
        self.log(f"adapter job done: {result.steps} steps ({self.stop_reason}), loss {result.train_loss:.3f}, "
                 f"{', '.join(f'{k} {v:.3f}' for k, v in metrics.items())}, {result.samples_per_s:.1f} samples/s, "
                 f"{result.wall_seconds:.1f}s of {self.spec.timebox_s:.0f}s")
        self.progress("done", str(self.out))
        return result

    def _common(self, t_loop_end: float, save_seconds: float) -> dict:
        """The result fields every track reports."""
        ts, tb, spec = self.ts, self.timebox, self.spec
        now, train_s = time.monotonic(), tb.train_seconds
        history = ts.loss_history[self.job_start_step:]
        startup = (tb.first_step - self.t0) if tb.first_step is not None else (t_loop_end - self.t0)
        return dict(
            path=str(self.out), steps=ts.step - self.job_start_step, samples=ts.samples - self.job_start_samples,
            total_steps=ts.step, total_samples=ts.samples, epoch=round(self.stream.epoch_progress, 4),
            train_loss=float(np.mean(history)) if history else float("nan"),
            samples_per_s=self.job_samples / train_s if train_s > 0 else 0.0, train_seconds=train_s,
            overhead_seconds=startup + (now - t_loop_end), wall_seconds=now - self.t0, timebox_s=spec.timebox_s,
            utilization=train_s / spec.timebox_s if spec.timebox_s else 0.0, stop_reason=self.stop_reason,
            peak_rss_mb=peak_rss_mb(),
            peak_cuda_mb=torch.cuda.max_memory_allocated() / 2**20 if self.device.startswith("cuda") else None,
            node_id=self.node_id, device=self.device, run_id=spec.run_id, job_index=spec.job_index,
            resumed_from=str(self.source) if self.source else None, resumed_kind=self.kind,
            checkpoints_written=self.checkpoints + 1, last_save_seconds=save_seconds,
            dataset_version=self.work.identity["dataset_version"],
            base_model_hash=self.work.identity["base_model_hash"],
            trainable_parameters=sum(p.numel() for p in self.trainable), loss_history=history,
            first_step_at=time.time() - (now - tb.first_step) if tb.first_step is not None else None)


def run_adapter_job(spec: JobSpec, open_workload: Callable[[JobSpec, str, Callable], Workload],
                    result_type: type[JobResult]) -> JobResult:
    """Run one timeboxed LoRA adapter job of any track; see the module docstring for the rules."""
    t0 = time.monotonic() - (max(0.0, time.time() - spec.started_at) if spec.started_at else 0.0)
    out = Path(spec.out_dir)
    if (out / RESULT_JSON).is_file():
        result = result_type.from_json(read_adapter_dir(out).result)
        result.resumed_kind = "reused"
        (spec.log or (lambda _msg: None))(
            f"{out} already holds this job's finished checkpoint (step {result.total_steps}); not training again")
        return result
    job = AdapterJob(spec, open_workload, t0)
    with contextlib.ExitStack() as stack:
        job.open(stack)
        job.loop()
        return job.finish()
