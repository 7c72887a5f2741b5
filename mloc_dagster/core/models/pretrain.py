"""Base pre-training: the tiny CTC model from scratch on the base dialect, within a time budget.

Uses the same parts as the adapter job (``core/training/job.py``): the ``SampleStream`` data order,
``train_step`` and the ``Timebox``. The learning rate warms up, then follows a cosine over the
budget (time or steps, whichever runs out first).
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
from mloc_dagster.core.data.features import load_features
from mloc_dagster.core.models.ctc import new_tiny_model
from mloc_dagster.core.models.evaluate import error_rates, transcribe
from mloc_dagster.core.models.families import save_base_model
from mloc_dagster.core.publish import model_dir_hash
from mloc_dagster.core.training.runtime import (
    LossLog,
    Timebox,
    auto_cpu_threads,
    cpu_threads,
    default_device,
    seed_everything,
    train_step,
)
from mloc_dagster.core.training.sample_stream import LengthGroupedBatches, SampleStream, make_batch


def pretrain_base(dataset_version_path: str | Path, out_dir: str | Path, train_seconds: float, seed: int = 0, *,
                  device: str | None = None, batch_size: int = 16, lr: float = 4e-3, warmup_steps: int = 50,
                  weight_decay: float = 0.01, max_grad_norm: float = 5.0, max_steps: int | None = None,
                  model_config: dict | None = None, cpu_threads_per_job: int | None = None,
                  feature_cache_dir: str | Path | None = None, eval_batch_size: int = 32,
                  length_groups: int = 0,
                  log: Callable[[str], None] | None = None) -> dict:
    """Train the tiny CTC model from scratch on the train split of a dataset version for
    ``train_seconds`` of wall time, evaluate it on dev and test, and save it to ``out_dir``
    atomically (config.json + model.safetensors, vocab.json, preprocessor_config.json, and
    training.json with these metrics). Returns the metrics.

    The learning rate warms up, then follows a cosine over the budget. With ``max_steps`` the budget
    is whichever of time and steps runs out first; tests use steps so that the model they get does
    not depend on how busy the machine is. With ``length_groups`` > 0 the batches hold utterances of
    similar length (``LengthGroupedBatches``: sorted within groups of that many batches): the same
    rows per epoch, much less padding.
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
    params = list(model.parameters())
    stream = SampleStream(len(train), seed)
    grouped = LengthGroupedBatches(stream, train.lengths.numpy(), batch_size, length_groups) if length_groups else None
    with cpu_threads(cpu_threads_per_job or auto_cpu_threads(model, device)):
        model.train()
        timebox = Timebox(train_seconds)
        losses = LossLog(device)
        steps = samples = 0
        last_log = time.monotonic()
        while timebox.elapsed() < train_seconds and (max_steps is None or steps < max_steps):
            frac = max(timebox.elapsed() / train_seconds, steps / max_steps if max_steps else 0.0)
            scale = min(1.0, (steps + 1) / warmup_steps) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
            for g in opt.param_groups:
                g["lr"] = lr * scale
            t_step = time.monotonic()
            idx = grouped.next_batch() if grouped else stream.next_batch(batch_size)
            batch, frames = make_batch(train, labels, idx, device)
            losses.add(train_step(lambda b=batch: model(**b).loss, opt, params, max_grad_norm))
            timebox.record(t_step, frames)
            steps += 1
            samples += len(idx)
            if time.monotonic() - last_log >= 15:
                last_log = time.monotonic()
                losses.flush()
                log(f"pretrain step {steps}, {timebox.elapsed():.0f}/{train_seconds:.0f}s, "
                    f"loss {np.mean(losses.history[-20:]):.3f}")
        losses.flush()
        train_s = timebox.elapsed()
        model.eval()
        metrics: dict = {"dialect": dv.dialect, "dataset_version": dv.version, "device": device,
                         "parameters": bm.num_parameters, "steps": steps, "samples": samples,
                         "epochs": round(samples / len(train), 2), "train_seconds": round(train_s, 2),
                         "samples_per_s": round(samples / train_s, 2) if train_s > 0 else 0.0,
                         "train_loss": float(np.mean(losses.history[-50:])) if losses.history else float("nan"),
                         "feature_cache_hit": train.cache_hit, "seed": seed, "batch_size": batch_size, "lr": lr,
                         "length_groups": length_groups,
                         "cpu_threads": torch.get_num_threads(), "model_config": model_config or {}}
        for split in ("dev", "test"):
            fs = load_features(dv, split, bm.feature_extractor, feature_cache_dir, log)
            rates = error_rates(transcribe(model, bm.family, fs, eval_batch_size, device))
            metrics[f"{split}_cer"], metrics[f"{split}_wer"] = rates["cer"], rates["wer"]
            metrics[f"{split}_speakers"] = len(set(fs.speakers))
    model.to("cpu")
    save_base_model(bm, out_dir, extra=metrics)
    metrics["path"] = str(out_dir)
    metrics["model_hash"] = model_dir_hash(out_dir)
    metrics["wall_seconds"] = round(time.monotonic() - t_start, 2)
    log(f"base model: {steps} steps, dev CER {metrics['dev_cer']:.3f}, test CER {metrics['test_cer']:.3f}")
    return metrics

