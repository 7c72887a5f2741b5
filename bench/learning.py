"""Learning that compounds: does every chained job make the dialect better, without forgetting?

    .venv/bin/python bench/learning.py [--dialects en-gb-scotland,en-029] [--jobs 6] [--timebox-s 30]
                                       [--base-s 180 | --base DIR] [--out bench/results/learning.json]

1. corpus: espeak-ng, ``--base-utts`` en-us utterances and ``--dialect-utts`` per dialect, 40
   speakers each (the defaults of ``mloc corpus synth``), built into dataset versions;
2. base: the tiny CTC model pre-trained ``--base-s`` seconds on en-us (or ``--base DIR``, reused);
   its test CER/WER on en-us and on every dialect;
3. per dialect, one training run of ``--jobs`` chained ``train_adapter`` jobs of ``--timebox-s``
   each, every job resumed exactly from the previous one, with en-us rehearsal as in production;
   after every job: dev CER (the job's own evaluation), test CER/WER of the job's adapter on the
   dialect, en-us test CER of the same adapter (base-dialect regression), samples seen.

Prints a table per dialect, and the summary through ``bench/report.py`` (table + JSON). Goals
(issue 14): dialect test CER ≤ 0.6 × the base model's, en-us regression ≤ 5 % relative, dev CER
lower after job 6 than after job 1. en-gb-scotland is the demo's dialect; en-029 (Caribbean) is
not used by the demo.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
warnings.filterwarnings("ignore", category=FutureWarning)  # peft calls a deprecated transformers API
sys.path.insert(0, str(REPO))

from peft import PeftModel  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from bench.report import report  # noqa: E402
from mloc_dagster.core.data.batches import find_batches  # noqa: E402
from mloc_dagster.core.data.corpus import synth_dialect  # noqa: E402
from mloc_dagster.core.data.datasets import DatasetVersion, build_version
from mloc_dagster.core.data.features import load_features  # noqa: E402
from mloc_dagster.core.models.evaluate import error_rates, transcribe  # noqa: E402
from mloc_dagster.core.models.families import load_base_model  # noqa: E402
from mloc_dagster.core.models.pretrain import pretrain_base
from mloc_dagster.core.training.asr import train_adapter  # noqa: E402
from mloc_dagster.core.training.runtime import cpu_threads  # noqa: E402
from mloc_dagster.core.training.spec import AdapterHParams, AdapterJobSpec

BASE_DIALECT = "en-us"
console = Console()


def dataset(work: Path, dialect: str, utterances: int) -> Path:
    incoming = work / "incoming"
    if not (incoming / dialect / f"synth-s0-n{utterances}" / "manifest.jsonl").exists():
        synth_dialect(dialect, utterances, incoming, seed=0)
    return build_version(dialect, find_batches(incoming, dialect), work / "datasets" / dialect).path


def test_rates(base_dir: Path, adapter: Path | None, version: Path, cache: Path) -> dict:
    bm = load_base_model(base_dir)
    model = PeftModel.from_pretrained(bm.model, str(adapter)) if adapter is not None else bm.model
    fs = load_features(version, "test", bm.feature_extractor, cache)
    with cpu_threads(1):
        r = error_rates(transcribe(model.eval(), bm.family, fs))
    return {"cer": r["cer"], "wer": r["wer"], "utterances": len(fs), "speakers": len(set(fs.speakers))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=REPO / ".mloc" / "bench-learning")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "learning.json")
    ap.add_argument("--dialects", default="en-gb-scotland,en-029")
    ap.add_argument("--base-utts", type=int, default=2400)
    ap.add_argument("--dialect-utts", type=int, default=1200)
    ap.add_argument("--base-s", type=float, default=180.0, help="base pre-training budget (seconds)")
    ap.add_argument("--base-steps", type=int, default=None,
                    help="also cap base pre-training at this many steps (a base that does not depend on load)")
    ap.add_argument("--base", type=Path, default=None, help="reuse this base model directory")
    ap.add_argument("--jobs", type=int, default=6)
    ap.add_argument("--timebox-s", type=float, default=30.0, help="timebox of each chained job")
    ap.add_argument("--max-steps", type=int, default=None,
                    help="also cap each job at this many steps (comparable runs on a busy machine)")
    ap.add_argument("--hparams", default="{}", help="AdapterHParams overrides as JSON")
    args = ap.parse_args()

    t_start = time.time()
    work, cache = args.work, args.work / "features"
    versions = {d: dataset(work, d, args.base_utts if d == BASE_DIALECT else args.dialect_utts)
                for d in [BASE_DIALECT, *args.dialects.split(",")]}
    for d, v in versions.items():
        m = DatasetVersion(v).manifest
        console.print(f"[green]dataset[/] {d}: " + ", ".join(
            f"{s} {p['rows']} rows / {p['speakers']} speakers" for s, p in m["per_split"].items()))

    if args.base is not None:
        base_dir = args.base
        base_metrics = json.loads((base_dir / "training.json").read_text())
    else:
        base_dir = work / "base"
        console.print(f"pre-training the base model on {BASE_DIALECT} for {args.base_s:.0f} s ...")
        base_metrics = pretrain_base(versions[BASE_DIALECT], base_dir, args.base_s, seed=0, feature_cache_dir=cache,
                                     max_steps=args.base_steps)
    base_rates = {d: test_rates(base_dir, None, v, cache) for d, v in versions.items()}
    results: dict = {"base_train_seconds": base_metrics.get("train_seconds"), "base_steps": base_metrics.get("steps"),
                     "base_parameters": base_metrics.get("parameters")}
    for d, r in base_rates.items():
        results[f"base {d} test_cer"], results[f"base {d} test_wer"] = r["cer"], r["wer"]
        results[f"{d} test speakers / utterances"] = f"{r['speakers']} / {r['utterances']}"
    console.print(f"[green]base[/] {base_dir}: " + ", ".join(f"{d} CER {r['cer']:.3f} WER {r['wer']:.3f}"
                                                            for d, r in base_rates.items()))

    hparams = AdapterHParams(**json.loads(args.hparams))
    for v in versions.values():  # warm the feature cache: job 1 of a run should train, not extract
        for split in ("train", "dev", "test"):
            load_features(v, split, cache_dir=cache)
    curves: dict[str, list[dict]] = {}
    for dialect in args.dialects.split(","):
        run_dir = work / "runs" / dialect / f"{int(t_start)}"
        rows, previous = [], None
        table = Table(title=f"{dialect}: {args.jobs} chained jobs × {args.timebox_s:.0f} s "
                            f"(base test CER {base_rates[dialect]['cer']:.3f}, en-us {base_rates[BASE_DIALECT]['cer']:.3f})")
        for col in ("job", "steps", "samples seen", "train loss", "dev CER", "test CER", "test WER", "× base CER",
                    "en-us test CER", "en-us regression"):
            table.add_column(col, justify="right")
        for job in range(args.jobs):
            out = run_dir / f"job-{job:04d}"
            res = train_adapter(AdapterJobSpec(base_dir, versions[dialect], out, resume_from=previous,
                                               timebox_s=args.timebox_s, checkpoint_every_s=1e9, hparams=hparams,
                                               rehearsal_dataset_path=versions[BASE_DIALECT], run_id="bench",
                                               job_index=job, feature_cache_dir=cache, max_steps=args.max_steps))
            previous = out
            test = test_rates(base_dir, out, versions[dialect], cache)
            base_test = test_rates(base_dir, out, versions[BASE_DIALECT], cache)
            regression = base_test["cer"] / base_rates[BASE_DIALECT]["cer"] - 1
            row = {"job": job + 1, "steps": res.steps, "samples_seen": res.total_samples, "train_loss": res.train_loss,
                   "dev_cer": res.dev_cer, "test_cer": test["cer"], "test_wer": test["wer"],
                   "ratio_to_base": test["cer"] / base_rates[dialect]["cer"],
                   "en_us_test_cer": base_test["cer"], "en_us_regression": regression}
            rows.append(row)
            table.add_row(str(job + 1), str(res.steps), str(res.total_samples), f"{res.train_loss:.3f}", f"{res.dev_cer:.3f}",
                          f"{test['cer']:.3f}", f"{test['wer']:.3f}", f"{row['ratio_to_base']:.2f}",
                          f"{base_test['cer']:.3f}", f"{regression:+.1%}")
            console.print(f"{dialect} job {job + 1}: dev CER {res.dev_cer:.3f}, test CER {test['cer']:.3f}, "
                          f"en-us {base_test['cer']:.3f} ({regression:+.1%})")
        console.print(table)
        curves[dialect] = rows
        for row in rows:
            for k in ("samples_seen", "dev_cer", "test_cer", "en_us_regression"):
                results[f"{dialect} job {row['job']} {k}"] = row[k]
        last = rows[-1]
        results[f"{dialect} goal test CER <= 0.6 x base"] = last["ratio_to_base"] <= 0.6
        results[f"{dialect} goal regression <= 5 %"] = last["en_us_regression"] <= 0.05
        results[f"{dialect} goal dev CER job {len(rows)} < job 1"] = last["dev_cer"] < rows[0]["dev_cer"]
    results["timebox_s per job"] = args.timebox_s
    results["hparams"] = json.dumps(json.loads(args.hparams) or "defaults")
    results["wall_seconds"] = round(time.time() - t_start, 1)
    report("Learning over chained jobs (bench/learning.py)", results, args.out, console)
    args.out.with_name(args.out.stem + "-curves.json").write_text(json.dumps(curves, indent=2))


if __name__ == "__main__":
    main()
