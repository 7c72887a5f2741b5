"""TTS base pre-training: the tiny FastSpeech2Conformer from scratch on the base dialect.

The same parts as ASR pre-training (``core/models/pretrain.py``): the ``SampleStream`` data order,
``train_step`` and the ``Timebox``; warm-up then cosine over the budget (time or steps, whichever
runs out first). Durations come from the base ASR (``aligner_dir``), whose content hash is
written into ``tts.json`` so adapters are trained on durations from the same aligner.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.optim import AdamW

from mloc_dagster.core.data.datasets import DatasetVersion
from mloc_dagster.core.publish import model_dir_hash
from mloc_dagster.core.training.runtime import LossLog, Timebox, cpu_threads, default_device, seed_everything, train_step
from mloc_dagster.core.training.sample_stream import SampleStream
from mloc_dagster.core.tts.align import load_frame_asr
from mloc_dagster.core.tts.data import TtsRows, fit_stats, load_rows, make_tts_batch
from mloc_dagster.core.tts.model import TtsModel, new_tiny_tts, save_tts_model


@torch.inference_mode()
def frame_l1(tm: TtsModel, rows: TtsRows, batch_size: int = 16, device: str = "cpu") -> float:
    """Mean absolute error of the standardized frames with the true durations (teacher-forced
    length regulator): how well the model predicts the dialect's spectra, free of duration errors."""
    model = tm.model
    was_training = model.training
    model.train()  # the training path uses the given durations; dropout off below
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.eval()
    total = count = 0.0
    try:
        for start in range(0, len(rows), batch_size):
            idx = list(range(start, min(len(rows), start + batch_size)))
            batch, _ = make_tts_batch(rows, tm.stats, idx, device)
            model_out = model(**batch, return_dict=True)
            spec = model_out.spectrogram
            labels = batch["spectrogram_labels"][:, :spec.shape[1]]
            mask = (labels != -100).any(-1)
            total += float((spec - labels).abs().mean(-1)[mask].sum())
            count += int(mask.sum())
    finally:
        model.train(was_training)
    return total / max(count, 1)


def pretrain_tts_base(dataset_version_path: str | Path, aligner_dir: str | Path, out_dir: str | Path,
                      train_seconds: float, seed: int = 0, *, device: str | None = None, batch_size: int = 16,
                      lr: float = 2e-3, warmup_steps: int = 50, max_grad_norm: float = 1.0,
                      max_steps: int | None = None, train_limit: int | None = None, dev_limit: int = 64,
                      model_config: dict | None = None, threads: int = 1, schedule: str = "cosine",
                      log: Callable[[str], None] | None = None) -> dict:
    """Train the tiny TTS from scratch on the train split for ``train_seconds`` (or ``max_steps``),
    measure the dev frame L1, save the model directory to ``out_dir`` atomically and return the
    metrics (also in ``tts.json``). ``train_limit`` caps the training rows (tests); ``schedule``
    is ``cosine`` (warm-up, then cosine to 5 %) or ``constant`` (warm-up, then flat: memorising a
    few utterances, as the stop-loss tests do, goes faster without the decay)."""
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', not {schedule!r}")
    log = log or (lambda _msg: None)
    device = device or default_device()
    t_start = time.monotonic()
    seed_everything(seed)
    dv = DatasetVersion(dataset_version_path)
    aligner = load_frame_asr(aligner_dir)
    with cpu_threads(threads if device == "cpu" else None):
        train = load_rows(dv, "train", aligner, train_limit)
        dev = load_rows(dv, "dev", aligner, dev_limit)
        prep_s = time.monotonic() - t_start
        log(f"tts rows: {len(train)} train, {len(dev)} dev in {prep_s:.1f}s ({train.align_fallbacks} fallbacks)")
        tm = new_tiny_tts(aligner.tokenizer, fit_stats(train), **(model_config or {}))
        model = tm.model.to(device)
        params = list(model.parameters())
        opt = AdamW(params, lr=lr, weight_decay=0.0)
        stream = SampleStream(len(train), seed)
        model.train()
        timebox, losses = Timebox(train_seconds), LossLog(device)
        steps = samples = 0
        while timebox.elapsed() < train_seconds and (max_steps is None or steps < max_steps):
            frac = max(timebox.elapsed() / train_seconds, steps / max_steps if max_steps else 0.0)
            decay = 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)) if schedule == "cosine" else 1.0
            scale = min(1.0, (steps + 1) / warmup_steps) * decay
            for g in opt.param_groups:
                g["lr"] = lr * scale
            t_step = time.monotonic()
            idx = stream.next_batch(batch_size)
            batch, frames = make_tts_batch(train, tm.stats, idx, device)
            losses.add(train_step(lambda b=batch: model(**b, return_dict=True).loss, opt, params, max_grad_norm))
            timebox.record(t_step, frames)
            steps, samples = steps + 1, samples + len(idx)
        losses.flush()
        train_s = timebox.train_seconds
        metrics = {"dialect": dv.dialect, "dataset_version": dv.version, "device": device,
                   "parameters": tm.num_parameters, "steps": steps, "samples": samples,
                   "epochs": round(samples / len(train), 2), "train_seconds": round(train_s, 2),
                   "samples_per_s": round(samples / train_s, 2) if train_s > 0 else 0.0,
                   "prep_seconds": round(prep_s, 2), "train_rows": len(train),
                   "train_loss": float(np.mean(losses.history[-20:])) if losses.history else float("nan"),
                   "dev_frame_l1": frame_l1(tm, dev, device=device), "seed": seed, "batch_size": batch_size,
                   "lr": lr, "schedule": schedule, "align_fallbacks": train.align_fallbacks}
    model.to("cpu").eval()
    save_tts_model(tm, out_dir, {"aligner_hash": model_dir_hash(aligner_dir), "aligner_dir": str(Path(aligner_dir).absolute()),
                                  "training": metrics})
    metrics["path"] = str(out_dir)
    metrics["model_hash"] = model_dir_hash(out_dir)
    metrics["wall_seconds"] = round(time.monotonic() - t_start, 2)
    log(f"tts base: {steps} steps, {metrics['samples_per_s']} samples/s, dev frame L1 {metrics['dev_frame_l1']:.3f}")
    return metrics
