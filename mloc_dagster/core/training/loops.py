"""The owned training loops: pre-training the tiny base model, and timeboxed LoRA adapter jobs.

An adapter job (``train_adapter``) is one slice of a training run. It is a plain peft loop —
``get_peft_model``, AdamW, a LambdaLR warm-up — built from parts that each read alone:

- ``core/training/sample_stream.py``: the data order, exact to the sample (``SampleStream``), and batches;
- ``core/training/checkpoint.py``: the ``TrainState`` (weights, optimizer, scheduler, RNG, data position)
  and its checkpoint I/O (safetensors + JSON, atomic), the checks before resuming;
- ``core/training/runtime.py``: the optimizer step, the ``Timebox``, the loss log, seeds and threads;
- ``core/training/spec.py``: the job's spec and hyper-parameters, its progress and its result.

Base pre-training (``core/models/pretrain.py``) uses the same stream, step and timebox.

**Exact resume.** Job k+1 continues bit-for-bit where job k stopped: a chain of jobs reproduces
the uninterrupted loss curve (see ``core/training/checkpoint.py`` for what is saved).

**Where a job starts.** ``<out_dir>/result.json`` exists → the job already finished (a retry after
a late failure): return the stored result without training; else the newest
``<out_dir>.partial/step-*`` → the previous attempt of *this* job crashed: resume there (losing at
most ``checkpoint_every_s`` of work) and keep this job's original step budget; else ``resume_from``
(the previous job's final checkpoint of the same run); else start fresh from the seed. Every
checkpoint read is validated first (``core/adapters/format.py``).

**Timebox.** The loop checks before every step whether one more step, the final evaluation and
the final save still fit before ``timebox_s`` (counted from ``started_at``, default: function
entry), using the slowest recent step time, the measured last save time and an evaluation estimate
from the measured per-frame compute. It stops itself, leaving that margin, so the job returns
before the timebox; Dagster's ``dagster/max_runtime`` is only the backstop. A ``heartbeat``
callback that returns False (pause, cancel, a lost GPU lease) stops the loop the same clean way.

**Keeping the base.** An adapter must improve its dialect without forgetting the base dialect (the
gate allows ≤ 5 % relative regression). Two mechanisms, both on base-dialect *rehearsal* rows
(``rehearsal_dataset_path``) mixed into every epoch (``rehearsal_fraction`` of it): the CTC loss
on them, and ``distill_weight`` × a distillation loss (KL divergence of the adapted model's
per-frame output distribution from the frozen base model's, i.e. the model with the adapter
disabled) that keeps the base dialect's outputs where they were.

Determinism: the data order depends only on (seed, epoch); RNG states are restored; CPU jobs run
with a fixed intra-op thread count (1 for small models, see ``auto_cpu_threads``) and CUDA jobs
with ``torch.use_deterministic_algorithms``.
"""

from __future__ import annotations

import contextlib
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch.optim import AdamW
from torch.optim.lr_scheduler import LambdaLR

from mloc_dagster.core.adapters.format import ADAPTER_WEIGHTS, RESULT_JSON, InvalidAdapter, read_adapter_dir
from mloc_dagster.core.data.datasets import DatasetVersion
from mloc_dagster.core.data.features import concat_feature_sets, load_features
from mloc_dagster.core.models.ctc import default_lora_targets, load_base_model, output_lengths
from mloc_dagster.core.models.evaluate import error_rates, transcribe
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
    auto_cpu_threads,
    cpu_threads,
    default_device,
    default_node_id,
    deterministic,
    peak_rss_mb,
    seed_everything,
    train_step,
)
from mloc_dagster.core.training.sample_stream import (
    SampleStream,
    check_segments,
    make_batch,
    rehearsal_rows_per_epoch,
    segment_cursor,
)
from mloc_dagster.core.training.spec import AdapterJobResult, AdapterJobSpec, Progress


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


def _identity(spec: AdapterJobSpec, base_hash: str, dv: DatasetVersion, rehearsal: DatasetVersion | None) -> dict:
    return {"base_model_hash": base_hash, "base_model_dir": str(spec.base_model_dir),
            "dataset_version": dv.version, "dialect": dv.dialect,
            "rehearsal_version": rehearsal.version if rehearsal else None,
            "rehearsal_dialect": rehearsal.dialect if rehearsal else None}


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, frame_mask: torch.Tensor
                      ) -> torch.Tensor:
    """Mean over the masked frames of KL(teacher ‖ student) of the per-frame output distributions."""
    s = F.log_softmax(student_logits, dim=-1, dtype=torch.float32)
    t = F.log_softmax(teacher_logits, dim=-1, dtype=torch.float32)
    kl = (t.exp() * (t - s)).sum(-1)
    mask = frame_mask.to(kl.dtype)
    return (kl * mask).sum() / mask.sum().clamp(min=1.0)


# --------------------------------------------------------------------------- the adapter job


class _AdapterJob:
    """One adapter job, from opening its inputs to its final checkpoint. ``train_adapter`` runs it:
    ``open`` (data, model, resume), ``loop`` (steps until the timebox, budget or heartbeat stops
    it), ``finish`` (evaluate, save, result)."""

    def __init__(self, spec: AdapterJobSpec, t0: float):
        self.spec, self.hp, self.t0 = spec, spec.hparams, t0
        self.log = spec.log or (lambda _msg: None)
        self.out = Path(spec.out_dir)
        self.device = spec.device or default_device()
        self.node_id = spec.node_id or default_node_id()
        self.checkpoints = 0
        self.stop_reason = "timebox"
        self.job_samples = 0

    # ---- open: inputs, model, where to start

    def open(self, stack: contextlib.ExitStack) -> None:
        spec, hp, log = self.spec, self.hp, self.log
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        stack.enter_context(deterministic(self.device, spec.deterministic))
        self.bm = bm = load_base_model(spec.base_model_dir, self.device)
        stack.enter_context(cpu_threads(spec.cpu_threads or auto_cpu_threads(bm.model, self.device)))
        self.base_hash = model_dir_hash(spec.base_model_dir)
        self.dv = DatasetVersion(spec.dataset_version_path)
        self.train = load_features(self.dv, "train", bm.feature_extractor, spec.feature_cache_dir, log)
        self.dev = load_features(self.dv, spec.eval_split, bm.feature_extractor, spec.feature_cache_dir, log)
        rehearsal = DatasetVersion(spec.rehearsal_dataset_path) if spec.rehearsal_dataset_path else None
        self.n_rows, n_extra, extra_per_epoch = len(self.train), 0, 0
        if rehearsal is not None:
            extra = load_features(rehearsal, "train", bm.feature_extractor, spec.feature_cache_dir, log)
            n_extra = len(extra)
            extra_per_epoch = rehearsal_rows_per_epoch(self.n_rows, hp.rehearsal_fraction)
            self.train = concat_feature_sets(self.train, extra)
        self.labels = [bm.tokenizer.encode(t) for t in self.train.texts]
        self.identity = _identity(spec, self.base_hash, self.dv, rehearsal)

        partial = latest_partial(self.out)
        self.source, self.kind = ((partial, "partial") if partial is not None
                                  else (Path(spec.resume_from), "resume_from") if spec.resume_from
                                  else (None, "fresh"))
        meta = tensors = None
        if self.source is not None:
            read_adapter_dir(self.source, base_model=bm.model)  # may come from another node
            meta, tensors = TrainState.read(self.source)
            check_resumable(meta, self.source, hp, self.identity)

        seed_everything(hp.seed)
        targets = list(hp.target_modules or default_lora_targets(bm.model))
        lora = LoraConfig(r=hp.r, lora_alpha=hp.alpha, lora_dropout=hp.dropout, target_modules=targets,
                          bias="none", init_lora_weights=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            self.model = get_peft_model(bm.model, lora)
        if meta is None and spec.init_adapter:
            load_warm_start(self.model, spec.init_adapter)
            self.source, self.kind = Path(spec.init_adapter), "warm_start"
        self.model.train()
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = AdamW(self.trainable, lr=hp.lr, weight_decay=hp.weight_decay)
        warmup = max(1, hp.warmup_steps)
        self.sched = LambdaLR(self.opt, lambda s: min(1.0, (s + 1) / warmup))

        self.ts = ts = TrainState()
        if meta is not None:
            self.stream = ts.restore(meta, tensors, self.model, self.opt, self.sched)
            s = self.stream
            if (s.n, s.extra_n, s.extra_per_epoch) != (self.n_rows, n_extra, extra_per_epoch):
                raise ResumeError(f"{self.source}: data position is over {s.n}+{s.extra_n} rows, "
                                  f"this job has {self.n_rows}+{n_extra}")
        else:
            self.stream = SampleStream(self.n_rows, hp.seed, extra_n=n_extra, extra_per_epoch=extra_per_epoch)
        if self.kind == "partial":
            ts.run = dict(meta["run"])  # same job: keep its start step (and step budget)
        else:
            ts.run = {"run_id": spec.run_id, "job_index": spec.job_index, "job_start_step": ts.step,
                      "job_start_samples": ts.samples, "resume_from": str(self.source) if self.source else None}
        self.job_start_step, self.job_start_samples = ts.run["job_start_step"], ts.run["job_start_samples"]
        self.slice_samples = check_segments(spec.segments) if spec.segments is not None else None
        self.losses = LossLog(self.device, ts.loss_history)
        # until the first save is measured: state ≈ 4 copies of the trainable weights, at 50 MB/s
        self.save_s = 0.2 + 16 * sum(p.numel() for p in self.trainable) / 50e6
        self.timebox = Timebox(spec.timebox_s, self.t0, self.final_cost)
        log(f"adapter job: {self.kind}" + (f" from {self.source} (step {ts.step})" if self.source else "") +
            f", {len(self.train)} training rows, device {self.device} ({torch.get_num_threads()} CPU threads), "
            f"node {self.node_id}")

    # ---- the loop

    def final_cost(self) -> float:
        """Seconds the end of the job needs: two saves, and the evaluation — inference costs well
        under a third of a training step per frame (no backward, sorted batches); budget a third,
        plus a constant for decoding and scoring."""
        eval_s = self.dev.frames * self.timebox.slowest_frame_s / 3 + 0.3
        return 2.0 * self.save_s + eval_s

    def loss(self, batch: dict, idx: list[int]) -> torch.Tensor:
        out = self.model(**batch)
        if not self.hp.distill_weight:
            return out.loss
        rows = [k for k, i in enumerate(idx) if i >= self.n_rows]  # rehearsal rows of this batch
        if not rows:
            return out.loss
        sel = torch.tensor(rows, device=out.logits.device)
        features, mask = batch["input_features"][sel], batch["attention_mask"][sel]
        with torch.no_grad(), self.model.disable_adapter():
            self.model.eval()  # the teacher is the base model as deployed: no dropout, no masking
            teacher = self.model(input_features=features, attention_mask=mask).logits
            self.model.train()
        n_out = output_lengths(self.model, mask)
        frames = torch.arange(teacher.shape[1], device=teacher.device)[None, :] < n_out[:, None]
        return out.loss + self.hp.distill_weight * distillation_loss(out.logits[sel], teacher, frames)

    def next_rows(self) -> list[int]:
        if self.spec.segments is None:
            return self.stream.next_batch(self.hp.batch_size)
        position, left = segment_cursor(self.spec.segments, self.ts.samples - self.job_start_samples)
        self.stream.seek(position)
        return self.stream.next_batch(min(self.hp.batch_size, left))

    def step(self) -> None:
        t_step = time.monotonic()
        idx = self.next_rows()
        batch, frames = make_batch(self.train, self.labels, idx, self.device)
        loss = train_step(lambda: self.loss(batch, idx), self.opt, self.trainable, self.hp.max_grad_norm, self.sched)
        self.ts.step += 1
        self.ts.samples += len(idx)
        self.job_samples += len(idx)
        self.losses.add(loss)
        if self.spec.throttle > 1:
            time.sleep((self.spec.throttle - 1) * (time.monotonic() - t_step))
        self.timebox.record(t_step, frames)

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
        meta, tensors = self.ts.snapshot(self.model, self.opt, self.sched, self.stream, self.hp, self.identity)
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

    def finish(self) -> AdapterJobResult:
        spec, ts, tb = self.spec, self.ts, self.timebox
        self.losses.flush()
        t_loop_end = tb.last_step_end if tb.last_step_end is not None else time.monotonic()
        train_seconds = tb.train_seconds
        # Evaluation reads no RNG and changes no state, so the snapshot after it equals one before.
        rates = error_rates(transcribe(self.model, self.bm.tokenizer, self.dev, spec.eval_batch_size, self.device))
        previous_cer = next((j["dev_cer"] for j in reversed(ts.jobs) if j.get("dev_cer") is not None), None)
        ts.jobs.append({"node_id": self.node_id, "device": self.device, "run_id": spec.run_id,
                        "job_index": spec.job_index, "start_step": self.job_start_step, "end_step": ts.step,
                        "samples": self.job_samples, "total_samples": ts.samples,
                        "train_seconds": round(train_seconds, 3),
                        "samples_per_s": round(self.job_samples / train_seconds, 3) if train_seconds > 0 else 0.0,
                        "dev_cer": rates["cer"], "dev_wer": rates["wer"], "finished_at": time.time()})
        final_meta, final_tensors = ts.snapshot(self.model, self.opt, self.sched, self.stream, self.hp, self.identity)
        job_history = ts.loss_history[self.job_start_step:]
        peak_cuda = torch.cuda.max_memory_allocated() / 2**20 if self.device.startswith("cuda") else None
        curve = [{"job_index": j.get("job_index"), "total_samples": j.get("total_samples"), "dev_cer": j.get("dev_cer")}
                 for j in ts.jobs]

        def result_json() -> dict:
            now = time.monotonic()
            startup = (tb.first_step - self.t0) if tb.first_step is not None else (t_loop_end - self.t0)
            r = AdapterJobResult(
                path=str(self.out), sha256="", steps=ts.step - self.job_start_step,
                samples=ts.samples - self.job_start_samples, total_steps=ts.step, total_samples=ts.samples,
                epoch=round(self.stream.epoch_progress, 4),
                train_loss=float(np.mean(job_history)) if job_history else float("nan"),
                dev_cer=rates["cer"], dev_wer=rates["wer"],
                samples_per_s=self.job_samples / train_seconds if train_seconds > 0 else 0.0,
                train_seconds=train_seconds, overhead_seconds=startup + (now - t_loop_end),
                wall_seconds=now - self.t0, timebox_s=spec.timebox_s,
                utilization=train_seconds / spec.timebox_s if spec.timebox_s else 0.0,
                stop_reason=self.stop_reason, peak_rss_mb=peak_rss_mb(), peak_cuda_mb=peak_cuda,
                node_id=self.node_id, device=self.device, run_id=spec.run_id, job_index=spec.job_index,
                resumed_from=str(self.source) if self.source else None, resumed_kind=self.kind,
                checkpoints_written=self.checkpoints + 1, last_save_seconds=self.save_s,
                feature_cache_hit=self.train.cache_hit and self.dev.cache_hit, dataset_version=self.dv.version,
                base_model_hash=self.base_hash, trainable_parameters=sum(p.numel() for p in self.trainable),
                loss_history=job_history,
                first_step_at=time.time() - (now - tb.first_step) if tb.first_step is not None else None,
                dev_speakers=len(set(self.dev.speakers)), dev_utterances=len(self.dev),
                dev_cer_delta=rates["cer"] - previous_cer if previous_cer is not None else None,
                learning_curve=curve)
            return r.to_json()

        holder: dict = {}

        def final_result(tmp: Path, save_seconds: float) -> dict:
            holder["result"] = result_json() | {"sha256": file_sha256(tmp / ADAPTER_WEIGHTS),
                                                "last_save_seconds": save_seconds}
            return holder["result"]

        write_checkpoint(self.out, self.model, final_meta, final_tensors, final_result)
        shutil.rmtree(partial_dir(self.out), ignore_errors=True)
        result = AdapterJobResult.from_json(holder["result"])
        result.wall_seconds = time.monotonic() - self.t0
        self.log(f"adapter job done: {result.steps} steps ({self.stop_reason}), loss {result.train_loss:.3f}, "
                 f"dev CER {result.dev_cer:.3f}, {result.samples_per_s:.1f} samples/s, "
                 f"{result.wall_seconds:.1f}s of {spec.timebox_s:.0f}s")
        self.progress("done", str(self.out))
        return result


def train_adapter(spec: AdapterJobSpec) -> AdapterJobResult:
    """Run one timeboxed LoRA adapter job; see the module docstring for resume and timebox rules."""
    t0 = time.monotonic() - (max(0.0, time.time() - spec.started_at) if spec.started_at else 0.0)
    out = Path(spec.out_dir)
    if (out / RESULT_JSON).is_file():
        result = AdapterJobResult.from_json(read_adapter_dir(out).result)
        result.resumed_kind = "reused"
        (spec.log or (lambda _msg: None))(
            f"{out} already holds this job's finished checkpoint (step {result.total_steps}); not training again")
        return result
    job = _AdapterJob(spec, t0)
    with contextlib.ExitStack() as stack:
        job.open(stack)
        job.loop()
        return job.finish()
