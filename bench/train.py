"""Training benchmark: loop overhead, timebox utilization and what one CPU-minute of LoRA learns.

    .venv/bin/python bench/train.py [--out bench/results/train.json] [--work DIR] [--pretrain-s 180]

1. throughput: samples/s of our adapter job vs a bare peft loop (get_peft_model, AdamW, LambdaLR,
   nothing else) on the same base model, data order, batch size, CPU threads and step count,
   alternated ``--reps`` times (the median of each side); goal ratio >= 0.99 (issue 22; 0.97 before);
2. timebox: one fresh job with ``timebox_s=60``: fixed overhead (start → first step, last step →
   return), utilization, and both projected to a 3600 s job (the same fixed costs, plus one
   intermediate checkpoint every 300 s);
3. learning: CER of the base model and of base + that 60 s adapter on the test splits of en-us and
   the dialect.

The job under test is a callable ``AdapterJobSpec -> AdapterJobResult`` (``run_bench(...,
run_job=...)``): ``train_adapter`` here; a variant that runs the same spec through Dagster plugs in
without touching the rest.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
warnings.filterwarnings("ignore", category=FutureWarning)  # peft calls a deprecated transformers API
sys.path.insert(0, str(REPO))

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from rich.console import Console
from rich.table import Table
from torch.optim import AdamW
from torch.optim.lr_scheduler import LambdaLR

from mloc_dagster.core.adapters.format import read_adapter_dir
from mloc_dagster.core.data.batches import find_batches
from mloc_dagster.core.data.corpus import synth_dialect
from mloc_dagster.core.data.datasets import build_version
from mloc_dagster.core.data.features import collate, load_features
from mloc_dagster.core.models.base import default_lora_targets
from mloc_dagster.core.models.evaluate import error_rates, transcribe
from mloc_dagster.core.models.families import load_base_model
from mloc_dagster.core.models.pretrain import pretrain_base
from mloc_dagster.core.training.asr import train_adapter
from mloc_dagster.core.training.runtime import auto_cpu_threads, cpu_threads, seed_everything
from mloc_dagster.core.training.sample_stream import SampleStream
from mloc_dagster.core.training.spec import AdapterHParams, AdapterJobResult, AdapterJobSpec

RunJob = Callable[[AdapterJobSpec], AdapterJobResult]
BASE_DIALECT = "en-us"


@dataclass
class BenchConfig:
    work: Path
    dialect: str = "en-gb-scotland"
    base_utts: int = 2000  # en-us: ~1170 train rows, 7 train speakers
    dialect_utts: int = 360  # ~180 train rows
    pretrain_s: float = 180.0
    steps: int = 150  # throughput comparison
    reps: int = 3
    rehearsal: bool = True  # also train the adapter with base-dialect rehearsal
    timebox_s: float = 60.0
    project_to_s: float = 3600.0
    checkpoint_every_s: float = 300.0
    hparams: AdapterHParams = field(default_factory=AdapterHParams)


def prepare(cfg: BenchConfig, log: Callable[[str], None]) -> dict[str, Path]:
    """Dataset versions for en-us and the dialect, and the pre-trained base (reused when present)."""
    paths = {}
    for dialect, n in ((BASE_DIALECT, cfg.base_utts), (cfg.dialect, cfg.dialect_utts)):
        incoming = cfg.work / "incoming"
        if not (incoming / dialect / f"synth-s0-n{n}" / "manifest.jsonl").is_file():
            log(f"synthesizing {n} {dialect} utterances with espeak-ng ...")
            synth_dialect(dialect, n, incoming, seed=0)
        paths[dialect] = build_version(dialect, find_batches(incoming, dialect), cfg.work / "datasets" / dialect).path
    base = cfg.work / f"base-{int(cfg.pretrain_s)}s"
    if not (base / "training.json").is_file():
        log(f"pre-training the tiny base model on {BASE_DIALECT} for {cfg.pretrain_s:.0f} s ...")
        pretrain_base(paths[BASE_DIALECT], base, cfg.pretrain_s, seed=0, feature_cache_dir=cfg.work / "features",
                      log=log)
    paths["base"] = base
    return paths


def bare_peft_loop(base_dir: Path, dataset: Path, cache: Path, hp: AdapterHParams, steps: int) -> dict:
    """What a researcher writes from peft's examples; same model, data order, threads and steps."""
    bm = load_base_model(base_dir)
    train = load_features(dataset, "train", bm.feature_extractor, cache)
    labels = [bm.tokenizer.encode(t) for t in train.texts]
    seed_everything(hp.seed)
    model = get_peft_model(bm.model, LoraConfig(r=hp.r, lora_alpha=hp.alpha, lora_dropout=hp.dropout, bias="none",
                                                target_modules=hp.target_modules or default_lora_targets(bm.model)))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
    sched = LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, hp.warmup_steps)))
    stream = SampleStream(len(train), hp.seed)
    with cpu_threads(auto_cpu_threads(model, "cpu")):
        t0 = time.monotonic()
        for _ in range(steps):
            idx = stream.next_batch(hp.batch_size)
            batch = collate([train.item(i) for i in idx], [labels[i] for i in idx])
            loss = model(**batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, hp.max_grad_norm)
            opt.step()
            sched.step()
        seconds = time.monotonic() - t0
    return {"samples_per_s": steps * hp.batch_size / seconds, "seconds": seconds, "final_loss": loss.item()}


def test_cer(base_dir: Path, adapter: Path | None, dataset: Path, cache: Path) -> dict:
    bm = load_base_model(base_dir)
    model = bm.model
    if adapter is not None:
        read_adapter_dir(adapter, base_model=model)
        model = PeftModel.from_pretrained(model, adapter).eval()
    with cpu_threads(auto_cpu_threads(model, "cpu")):
        rates = error_rates(transcribe(model, bm.family, load_features(dataset, "test", bm.feature_extractor, cache)))
    return {"cer": rates["cer"], "wer": rates["wer"], "utterances": rates["utterances"]}


def run_bench(cfg: BenchConfig, run_job: RunJob = train_adapter, label: str = "core",
              log: Callable[[str], None] = print) -> dict:
    cfg.work.mkdir(parents=True, exist_ok=True)
    paths = prepare(cfg, log)
    base, data, cache = paths["base"], paths[cfg.dialect], cfg.work / "features"
    jobs = cfg.work / "jobs" / label
    shutil.rmtree(jobs, ignore_errors=True)
    spec = AdapterJobSpec(base_model_dir=base, dataset_version_path=data, out_dir=jobs / "x", device="cpu",
                          hparams=cfg.hparams, feature_cache_dir=cache, checkpoint_every_s=cfg.checkpoint_every_s)

    # 1. throughput, alternating sides so that machine noise hits both
    log(f"throughput: {cfg.reps} x {cfg.steps} steps each, bare peft loop vs {label} job ...")
    load_features(data, "train", cache_dir=cache)  # warm the cache for both sides
    bare, ours = [], []
    for rep in range(cfg.reps):
        bare.append(bare_peft_loop(base, data, cache, cfg.hparams, cfg.steps))
        r = run_job(replace(spec, out_dir=jobs / f"throughput-{rep}", max_steps=cfg.steps, timebox_s=1e6))
        ours.append(r)
        log(f"  rep {rep}: bare {bare[-1]['samples_per_s']:.1f} samples/s, ours {r.samples_per_s:.1f}")
    bare_sps = statistics.median(b["samples_per_s"] for b in bare)
    ours_sps = statistics.median(r.samples_per_s for r in ours)
    same_loss = abs(ours[0].loss_history[-1] - bare[0]["final_loss"]) < 1e-4

    # 2. timebox (fresh job; its adapter is also the learning result)
    log(f"timebox: one fresh {cfg.timebox_s:.0f} s job ...")
    t0 = time.monotonic()
    tb = run_job(replace(spec, out_dir=jobs / "timebox", timebox_s=cfg.timebox_s))
    wall = time.monotonic() - t0
    fixed = cfg.timebox_s - tb.train_seconds  # startup + end + the unused safety margin
    n_ckpt = max(0, int(cfg.project_to_s // cfg.checkpoint_every_s) - 1)
    projected_train = cfg.project_to_s - fixed - n_ckpt * tb.last_save_seconds

    # 3. learning; plus the same job with en-us rehearsal rows mixed in (base-dialect regression)
    rh = None
    if cfg.rehearsal:
        log(f"learning: one more {cfg.timebox_s:.0f} s job with {BASE_DIALECT} rehearsal ...")
        rh = run_job(replace(spec, out_dir=jobs / "rehearsal", timebox_s=cfg.timebox_s,
                             rehearsal_dataset_path=paths[BASE_DIALECT]))
    log("learning: base vs base + adapter on the test splits ...")
    learning = {}
    for name, dataset in ((BASE_DIALECT, paths[BASE_DIALECT]), (cfg.dialect, data)):
        learning[name] = {"base": test_cer(base, None, dataset, cache),
                          "adapter": test_cer(base, jobs / "timebox", dataset, cache)}
        if rh is not None:
            learning[name]["adapter_rehearsal"] = test_cer(base, jobs / "rehearsal", dataset, cache)
    base_metrics = json.loads((base / "training.json").read_text())

    return {
        "label": label,
        "machine": {"platform": platform.platform(), "cpu_threads_used": auto_cpu_threads(torch.nn.Linear(1, 1), "cpu"),
                    "torch": torch.__version__},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "base_model": {k: base_metrics.get(k) for k in ("parameters", "steps", "train_seconds", "samples_per_s",
                                                        "dev_cer", "test_cer", "dev_wer", "test_wer")},
        "throughput": {"steps": cfg.steps, "batch_size": cfg.hparams.batch_size,
                       "bare_samples_per_s": bare_sps, "job_samples_per_s": ours_sps,
                       "ratio": ours_sps / bare_sps, "goal": 0.99, "same_final_loss": same_loss,
                       "bare_runs": bare, "job_runs": [r.samples_per_s for r in ours]},
        "timebox": {"timebox_s": cfg.timebox_s, "wall_s": wall, "returned_before_timebox": wall < cfg.timebox_s,
                    "train_seconds": tb.train_seconds, "overhead_seconds": tb.overhead_seconds,
                    "unused_margin_s": cfg.timebox_s - tb.wall_seconds, "utilization": tb.utilization,
                    "steps": tb.steps, "samples_per_s": tb.samples_per_s, "last_save_seconds": tb.last_save_seconds,
                    "peak_rss_mb": tb.peak_rss_mb, "dev_cer": tb.dev_cer,
                    "projected": {"timebox_s": cfg.project_to_s, "intermediate_checkpoints": n_ckpt,
                                  "fixed_seconds": fixed + n_ckpt * tb.last_save_seconds,
                                  "utilization": projected_train / cfg.project_to_s}},
        "learning": {"adapter_train_seconds": tb.train_seconds, "adapter_steps": tb.steps,
                     "rehearsal_fraction": cfg.hparams.rehearsal_fraction if rh else None, **learning},
    }


def print_report(res: dict, console: Console) -> None:
    t = Table(title=f"bench/train.py ({res['label']})")
    t.add_column("measure")
    t.add_column("value", justify="right")
    t.add_column("note")
    b, th, tb, ln = res["base_model"], res["throughput"], res["timebox"], res["learning"]
    dialect = next(k for k in ln if isinstance(ln[k], dict) and k != BASE_DIALECT)
    t.add_row("base model", f"{b['parameters'] / 1e6:.2f} M params",
              f"{b['train_seconds']:.0f} s pre-training on {BASE_DIALECT}, {b['steps']} steps")
    t.add_row("bare peft loop", f"{th['bare_samples_per_s']:.1f} samples/s", f"{th['steps']} steps x bs {th['batch_size']}")
    t.add_row("adapter job", f"{th['job_samples_per_s']:.1f} samples/s", "same model, data, steps")
    t.add_row("ratio job / bare", f"{th['ratio']:.3f}", "goal >= 0.99" + ("" if th["same_final_loss"] else " (losses differ!)"))
    t.add_row(f"timebox {tb['timebox_s']:.0f} s: wall", f"{tb['wall_s']:.2f} s",
              "returned in time" if tb["returned_before_timebox"] else "OVERRAN")
    t.add_row("fixed overhead", f"{tb['overhead_seconds']:.2f} s",
              f"+ {tb['unused_margin_s']:.2f} s unused margin; save {tb['last_save_seconds'] * 1000:.0f} ms")
    t.add_row(f"utilization at {tb['timebox_s']:.0f} s", f"{tb['utilization']:.1%}", "train seconds / timebox")
    p = tb["projected"]
    t.add_row(f"utilization at {p['timebox_s']:.0f} s", f"{p['utilization']:.2%}",
              f"projected: {p['fixed_seconds']:.1f} s fixed incl. {p['intermediate_checkpoints']} checkpoints")
    for name in (BASE_DIALECT, dialect):
        t.add_row(f"CER {name} test", f"{ln[name]['base']['cer']:.3f} → {ln[name]['adapter']['cer']:.3f}",
                  f"base → base + {dialect} adapter ({ln['adapter_train_seconds']:.0f} s, {ln['adapter_steps']} steps)")
        if "adapter_rehearsal" in ln[name]:
            t.add_row("", f"→ {ln[name]['adapter_rehearsal']['cer']:.3f}",
                      f"adapter trained with {ln['rehearsal_fraction']:.0%} {BASE_DIALECT} rehearsal")
    console.print(t)


def main(argv: list[str] | None = None, run_job: RunJob = train_adapter, label: str = "core") -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "train.json")
    ap.add_argument("--work", type=Path, default=REPO / ".mloc" / "bench-train",
                    help="corpus, base model and jobs; the corpus and base model are reused between runs")
    ap.add_argument("--dialect", default="en-gb-scotland")
    ap.add_argument("--pretrain-s", type=float, default=180.0)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-rehearsal", action="store_true", help="skip the adapter job with en-us rehearsal")
    ap.add_argument("--timebox-s", type=float, default=60.0)
    args = ap.parse_args(argv)
    console = Console()
    cfg = BenchConfig(work=args.work, dialect=args.dialect, pretrain_s=args.pretrain_s, steps=args.steps,
                      reps=args.reps, timebox_s=args.timebox_s, rehearsal=not args.no_rehearsal)
    res = run_bench(cfg, run_job=run_job, label=label, log=lambda m: console.print(f"[dim]{m}[/dim]"))
    print_report(res, console)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1, default=str) + "\n")
    console.print(f"wrote {args.out}")
    return res


if __name__ == "__main__":
    main()
