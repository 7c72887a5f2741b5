"""Model families: what the adapter job run through Dagster costs against a bare peft loop, and
what evaluation decoding costs, per base model family, on the tiny checkpoints.

    PYTHONPATH=$PWD .venv/bin/python bench/families.py [--steps 20] [--repeats 3] [--families whisper,hubert]

For every family of ``core/models/families.py: FAMILIES`` that has a tiny checkpoint (the built-in
tiny CTC model; the tiny Hub-style checkpoints of ``tests/core/models/families.py``), on one small
espeak-ng dataset version (``bench/learning.py: dataset``):

1. training throughput: samples/s of a bare peft loop (``get_peft_model`` with the job's
   ``LoraConfig``, AdamW, the LambdaLR warm-up, batches of the job's sample stream, the family's
   loss, backward, clip, step) against the same number of steps of ``train_adapter`` run through
   Dagster (``bench/train_dagster.py``: an op that leases the device from the ``GpuArbiter`` and
   runs the job, ``execute_in_process`` on a real instance). Only the steps are timed on both sides
   (the job's own ``train_seconds``); same batch size, data order, seed and CPU threads; the sides
   alternate ``--repeats`` times and each side's median is taken. Goal: ratio Dagster / bare ≥ 0.98;
2. evaluation decoding: ms per utterance of ``transcribe`` over the dev split (the job's
   evaluation: the family's decoding of the base model with a fresh LoRA adapter attached), the
   median of ``--repeats`` runs after one warm-up.

Prints a table and writes ``bench/results/families.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
warnings.filterwarnings("ignore", category=FutureWarning)  # peft calls a deprecated transformers API
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from torch.optim import AdamW  # noqa: E402
from torch.optim.lr_scheduler import LambdaLR  # noqa: E402

from bench.learning import dataset  # noqa: E402
from bench.train_dagster import run_through_dagster  # noqa: E402
from mloc_dagster.core.data.datasets import DatasetVersion  # noqa: E402
from mloc_dagster.core.data.features import load_features  # noqa: E402
from mloc_dagster.core.models.base import default_lora_targets, quiet_progress_bars  # noqa: E402
from mloc_dagster.core.models.ctc import MODEL_TYPE, new_tiny_model  # noqa: E402
from mloc_dagster.core.models.evaluate import transcribe  # noqa: E402
from mloc_dagster.core.models.families import FAMILIES, load_base_model, save_base_model  # noqa: E402
from mloc_dagster.core.training.runtime import auto_cpu_threads, cpu_threads, seed_everything  # noqa: E402
from mloc_dagster.core.training.sample_stream import SampleStream, make_batch  # noqa: E402
from mloc_dagster.core.training.spec import AdapterHParams, AdapterJobSpec  # noqa: E402
from tests.core.models.families import save_tiny_checkpoint  # noqa: E402

DIALECT = "en-gb-scotland"
UTTERANCES = 240  # ~126 train, 60 dev rows
GOAL = 0.98


def tiny_checkpoint(family: str, out: Path) -> Path | None:
    """A freshly initialized tiny checkpoint of ``family`` at ``out``; None where there is none."""
    with quiet_progress_bars():
        if family == MODEL_TYPE:
            torch.manual_seed(0)
            return save_base_model(new_tiny_model(), out)
        try:
            return save_tiny_checkpoint(family, out)
        except ValueError:  # no tiny checkpoint of this family (yet)
            return None


def lora_config(model: torch.nn.Module, hp: AdapterHParams) -> LoraConfig:
    """The job's LoRA (``core/training/job.py``)."""
    return LoraConfig(r=hp.r, lora_alpha=hp.alpha, lora_dropout=hp.dropout, bias="none", init_lora_weights=True,
                      target_modules=list(hp.target_modules or default_lora_targets(model)))


def bare_peft_loop(base_dir: Path, version: Path, cache: Path, hp: AdapterHParams, steps: int) -> dict:
    """peft's example loop over the family's loss: same model, rows, order, seed and threads as the job."""
    bm = load_base_model(base_dir)
    train = load_features(version, "train", bm.feature_extractor, cache)
    dialect = DatasetVersion(version).dialect
    labels = [bm.family.labels(t, dialect) for t in train.texts]
    with cpu_threads(auto_cpu_threads(bm.model, "cpu")):
        seed_everything(hp.seed)
        model = get_peft_model(bm.model, lora_config(bm.model, hp))
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
        sched = LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, hp.warmup_steps)))
        stream = SampleStream(len(train), hp.seed)
        t0 = time.monotonic()
        for _ in range(steps):
            batch, _frames = make_batch(train, labels, stream.next_batch(hp.batch_size), "cpu")
            loss = bm.family.forward(model, batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, hp.max_grad_norm)
            opt.step()
            sched.step()
        seconds = time.monotonic() - t0
    return {"samples_per_s": steps * hp.batch_size / seconds, "seconds": seconds, "final_loss": loss.item()}


def decode_ms(base_dir: Path, version: Path, cache: Path, hp: AdapterHParams, repeats: int,
              batch_size: int) -> dict:
    """ms per dev utterance of the job's evaluation: ``transcribe`` of base + a fresh LoRA adapter."""
    bm = load_base_model(base_dir)
    dev = load_features(version, "dev", bm.feature_extractor, cache)
    seed_everything(hp.seed)
    model = get_peft_model(bm.model, lora_config(bm.model, hp))
    runs = []
    with cpu_threads(auto_cpu_threads(model, "cpu")):
        records = transcribe(model, bm.family, dev, batch_size)  # warm-up
        for _ in range(repeats):
            t0 = time.monotonic()
            transcribe(model, bm.family, dev, batch_size)
            runs.append((time.monotonic() - t0) * 1000 / len(dev))
    return {"ms_per_utt": statistics.median(runs), "runs": runs, "utterances": len(dev),
            "audio_s_per_utt": dev.frames / len(dev) / frame_rate(bm.feature_extractor),
            "hyp_chars_per_utt": statistics.mean(len(r["hyp"]) for r in records),
            "ref_chars_per_utt": statistics.mean(len(r["ref"]) for r in records)}


def frame_rate(fe) -> float:
    """Feature rows per second of audio: samples for a waveform extractor, else 10 ms frames
    (stacked by the w2v-BERT front end)."""
    if getattr(fe, "feature_size", None) == 1:
        return float(fe.sampling_rate)
    return 100.0 / getattr(fe, "stride", 1)


def bench_family(family: str, base: Path, version: Path, cache: Path, work: Path, hp: AdapterHParams, steps: int,
                 repeats: int, log) -> dict:
    bm = load_base_model(base)
    load_features(version, "train", bm.feature_extractor, cache)  # warm the cache for both sides
    load_features(version, "dev", bm.feature_extractor, cache)
    shutil.rmtree(work, ignore_errors=True)  # a job directory holding a result would be reused, not trained
    spec = AdapterJobSpec(base_model_dir=base, dataset_version_path=version, out_dir=work, device="cpu",
                          hparams=hp, feature_cache_dir=cache, max_steps=steps, timebox_s=1e6)
    bare_peft_loop(base, version, cache, hp, 2)  # warm-up: the process's first steps pay one-time costs
    bare, jobs = [], []
    for rep in range(repeats):  # alternate, so that machine noise hits both sides
        bare.append(bare_peft_loop(base, version, cache, hp, steps))
        jobs.append(run_through_dagster(replace(spec, out_dir=work / f"job-{rep}")))
        log(f"  {family} rep {rep}: bare {bare[-1]['samples_per_s']:.1f} samples/s, "
            f"Dagster job {jobs[-1].samples_per_s:.1f}")
    bare_sps = statistics.median(b["samples_per_s"] for b in bare)
    job_sps = statistics.median(j.samples_per_s for j in jobs)
    decoding = decode_ms(base, version, cache, hp, repeats, spec.eval_batch_size)
    log(f"  {family} decoding: {decoding['ms_per_utt']:.2f} ms/utt")
    return {
        "family": family, "parameters": bm.num_parameters, "trainable_parameters": jobs[0].trainable_parameters,
        "lora_targets": list(hp.target_modules or default_lora_targets(bm.model)),
        "bare_samples_per_s": bare_sps, "job_samples_per_s": job_sps, "ratio": job_sps / bare_sps,
        "same_final_loss": abs(jobs[0].loss_history[-1] - bare[0]["final_loss"]) < 1e-4,
        "bare_runs": bare, "job_runs": [{"samples_per_s": j.samples_per_s, "train_seconds": j.train_seconds,
                                         "overhead_seconds": j.overhead_seconds, "wall_seconds": j.wall_seconds,
                                         "final_loss": j.loss_history[-1]} for j in jobs],
        "decoding": decoding,
    }


def print_report(res: dict, console: Console) -> None:
    t = Table(title=f"bench/families.py: {res['steps']} steps × bs {res['batch_size']}, "
                    f"median of {res['repeats']}, goal ratio ≥ {GOAL}")
    for col in ("family", "params", "LoRA params", "bare samples/s", "Dagster job samples/s", "ratio",
                "same loss", "decode ms/utt"):
        t.add_column(col, justify="left" if col == "family" else "right")
    for r in res["families"]:
        t.add_row(r["family"], f"{r['parameters']:,}", f"{r['trainable_parameters']:,}",
                  f"{r['bare_samples_per_s']:.1f}", f"{r['job_samples_per_s']:.1f}", f"{r['ratio']:.3f}",
                  "yes" if r["same_final_loss"] else "NO", f"{r['decoding']['ms_per_utt']:.2f}")
    console.print(t)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="training steps per run (each side)")
    ap.add_argument("--repeats", type=int, default=3, help="alternated runs per side; decoding repeats")
    ap.add_argument("--families", default=",".join(FAMILIES), help="comma-separated model_types")
    args = ap.parse_args(argv)
    console = Console(width=120)

    def log(msg: str) -> None:
        console.print(f"[dim]{msg}[/dim]")

    work = REPO / ".mloc" / "bench-families"
    cache, hp = work / "features", AdapterHParams()
    load_start, t_start = os.getloadavg(), time.monotonic()
    version = dataset(work, DIALECT, UTTERANCES)
    dv = DatasetVersion(version)
    log(f"dataset {DIALECT} {dv.version}: {dv.num_rows('train')} train, {dv.num_rows('dev')} dev rows")
    results = []
    for family in args.families.split(","):
        base = tiny_checkpoint(family, work / "models" / family)
        if base is None:
            log(f"{family}: no tiny checkpoint; skipped")
            continue
        log(f"{family}: {args.repeats} × {args.steps} steps per side, then decoding ...")
        results.append(bench_family(family, base, version, cache, work / "jobs" / family, hp, args.steps,
                                    args.repeats, log))
    res = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
                    "wall_s": time.monotonic() - t_start},
        "dataset": {"dialect": DIALECT, "version": dv.version, "train_rows": dv.num_rows("train"),
                    "dev_rows": dv.num_rows("dev")},
        "steps": args.steps, "repeats": args.repeats, "batch_size": hp.batch_size, "goal": GOAL,
        "families": results,
    }
    print_report(res, console)
    out = REPO / "bench" / "results" / "families.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=str) + "\n")
    console.print(f"wrote {out} ({res['machine']['wall_s']:.0f} s)")
    return res


if __name__ == "__main__":
    main()
