"""TTS track: judge CER and MCD of the base TTS against TTS adapters trained for several timeboxes.

    .venv/bin/python bench/tts.py [--home DIR] [--datasets DIR] [--asr-base DIR] [--tts-base DIR]
                                  [--dialect en-gb-scotland] [--timeboxes 60,120,240] [--n-test 20]
                                  [--out bench/results/tts.json]

Inputs (issue 11), all under ``--home`` (default ``$MLOC_HOME`` or ``.mloc``, as ``make demo``
leaves it) unless named one by one:

- ``--datasets``: the dataset root, ``<root>/<dialect>/LATEST`` → ``versions/<id>`` (``make demo``
  builds en-us and en-gb-scotland there); default ``<home>/datasets``;
- ``--asr-base``: the frozen base ASR, used as the judge (pinned by content hash) *and* as the
  aligner that gives the TTS its character durations; default the newest directory under
  ``<home>/models/base``;
- ``--tts-base``: the TTS base (``core.tts.pretrain_tts_base`` on the base dialect); default the
  ``tts_base_model`` asset's newest (``<home>/models/tts/<hash>``, e.g. after ``make demo``), else
  ``<home>/models/tts_base``, pre-trained there for ``--tts-base-s`` seconds on en-us if missing.

Then, from that one TTS base, one fresh ``train_tts_adapter`` job per timebox on ``--dialect``
(same seed, same hyper-parameters), and on the first ``--n-test`` test sentences of the dialect:

- the judge's CER/WER and collapse share (utterance CER > 0.5) on the real recordings (the floor),
  on the Griffin-Lim resynthesis of the real log-mel (the vocoder's floor), on the base TTS's audio
  and on every candidate's audio (model frames → Griffin-Lim, ``core.tts.synthesize``);
- MCD after DTW (``core.tts.mean_mcd``) of each voice against the real recordings, and of each
  candidate against the base TTS (how far the adapter moved the voice);
- per adapter: steps, samples, samples/s, training seconds, wall seconds (row preparation: the
  forced alignment, included), dev frame L1 (standardized, teacher-forced; the base TTS's on the
  same dev rows for comparison).

Prints one table and writes everything (per-utterance CER, a few transcripts) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
warnings.filterwarnings("ignore", category=FutureWarning)  # peft calls a deprecated transformers API
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from mloc_dagster.core.data.datasets import DatasetVersion  # noqa: E402
from mloc_dagster.core.models.families import load_base_model  # noqa: E402
from mloc_dagster.core.publish import model_dir_hash  # noqa: E402
from mloc_dagster.core.training.runtime import cpu_threads  # noqa: E402
from mloc_dagster.core.tts.acoustics import griffin_lim, mean_mcd, tts_frames  # noqa: E402
from mloc_dagster.core.tts.data import load_rows  # noqa: E402
from mloc_dagster.core.tts.hparams import TtsAdapterHParams  # noqa: E402
from mloc_dagster.core.tts.judge import JudgeSpec, back_recognize, collapse_share, load_judge, synthesize  # noqa: E402
from mloc_dagster.core.tts.model import load_tts_model  # noqa: E402
from mloc_dagster.core.tts.pretrain import frame_l1, pretrain_tts_base  # noqa: E402
from mloc_dagster.core.tts.training import TtsAdapterJobSpec, load_tts_adapter, train_tts_adapter  # noqa: E402

BASE_DIALECT = "en-us"
console = Console(width=180)


def latest_version(datasets: Path, dialect: str) -> Path:
    root = datasets / dialect
    latest = root / "LATEST"
    if latest.exists():
        return root / "versions" / latest.read_text().strip()
    versions = sorted((root / "versions").iterdir(), key=lambda p: p.stat().st_mtime)
    if not versions:
        raise SystemExit(f"no dataset version under {root}; run `make demo` (or `mloc corpus synth` + build)")
    return versions[-1]


def newest_dir(root: Path) -> Path:
    dirs = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    if not dirs:
        raise SystemExit(f"no model under {root}; run `make demo` first or pass --asr-base")
    return dirs[-1]


def score(judge, waves, texts) -> dict:
    r = back_recognize(judge, waves, texts)
    return {"cer": r["cer"], "wer": r["wer"], "collapse": collapse_share(r["utterance_cer"]),
            "utterance_cer": r["utterance_cer"], "examples": [(x["ref"], x["hyp"]) for x in r["records"][:3]]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", type=Path, default=Path(os.environ.get("MLOC_HOME", REPO / ".mloc")))
    ap.add_argument("--datasets", type=Path, default=None, help="dataset root (default <home>/datasets)")
    ap.add_argument("--asr-base", type=Path, default=None, help="judge + aligner (default newest <home>/models/base/*)")
    ap.add_argument("--tts-base", type=Path, default=None,
                    help="TTS base (default: newest <home>/models/tts/*, else <home>/models/tts_base, built)")
    ap.add_argument("--tts-base-s", type=float, default=480.0, help="pre-training budget when the TTS base is built")
    ap.add_argument("--work", type=Path, default=None, help="adapter directories (default <home>/bench-tts)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "tts.json")
    ap.add_argument("--dialect", default="en-gb-scotland")
    ap.add_argument("--timeboxes", default="60,120,240", help="adapter timeboxes in seconds, comma-separated")
    ap.add_argument("--n-test", type=int, default=20, help="held-out test sentences")
    ap.add_argument("--gl-iterations", type=int, default=32, help="Griffin-Lim iterations")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    datasets = args.datasets or args.home / "datasets"
    asr_base = args.asr_base or newest_dir(args.home / "models" / "base")
    # the tts_base_model asset's newest materialization (<home>/models/tts/<hash>), else one built here
    built = [p for p in (args.home / "models" / "tts").glob("*") if (p / "tts.json").exists()]
    tts_base = args.tts_base or max(built, key=lambda p: p.stat().st_mtime, default=args.home / "models" / "tts_base")
    work = args.work or args.home / "bench-tts"
    timeboxes = [float(t) for t in args.timeboxes.split(",") if t]
    version = latest_version(datasets, args.dialect)
    t0 = time.monotonic()

    if not (tts_base / "tts.json").exists():
        console.print(f"pre-training the TTS base ({args.tts_base_s:.0f} s on {BASE_DIALECT}) into {tts_base}")
        pretrain_tts_base(latest_version(datasets, BASE_DIALECT), asr_base, tts_base, args.tts_base_s,
                          threads=args.threads, log=console.print)
    base_meta = json.loads((tts_base / "tts.json").read_text()).get("training", {})

    # ---- adapters: one fresh job per timebox, same base, same seed
    adapters: dict[float, dict] = {}
    for tb in timeboxes:
        out = work / f"adapter-{int(tb)}"
        shutil.rmtree(out, ignore_errors=True)
        r = train_tts_adapter(TtsAdapterJobSpec(tts_base, asr_base, version, out, timebox_s=tb,
                                                hparams=TtsAdapterHParams(), cpu_threads=args.threads,
                                                log=console.print))
        adapters[tb] = {k: v for k, v in r.to_json().items() if k != "loss_history"} | {"dir": str(out)}
        console.print(f"adapter {tb:.0f} s: {r.steps} steps, {r.samples_per_s} samples/s, dev L1 {r.dev_frame_l1:.3f}")

    # ---- test sentences, the judge, the voices
    asr = load_base_model(asr_base)
    tests = [u for u in DatasetVersion(version).iter_utterances("test") if asr.tokenizer.encode(u.text)][:args.n_test]
    texts, real = [u.text for u in tests], [u.audio for u in tests]
    spec = JudgeSpec.pin(asr_base)
    base_tm = load_tts_model(tts_base)
    with cpu_threads(args.threads):
        base_dev_l1 = frame_l1(base_tm, load_rows(version, "dev", asr, 32))  # the adapters' eval rows
    judge = load_judge(spec, candidate_dir=tts_base)
    rows: list[dict] = []

    def voice(name: str, waves, seconds: float, **extra) -> list:
        row = {"voice": name} | score(judge, waves, texts) | {"mcd_vs_real": mean_mcd(waves, real),
                                                               "synth_s_per_utt": seconds / len(texts)} | extra
        rows.append(row)
        console.print(f"{name}: judge CER {row['cer']:.3f} (collapse {row['collapse']:.2f}), "
                      f"MCD vs real {row['mcd_vs_real']:.1f} dB")
        return waves

    rows.append({"voice": "real recordings (floor)"} | score(judge, real, texts) | {"mcd_vs_real": None})
    t = time.monotonic()
    voice("Griffin-Lim resynthesis of real", [griffin_lim(tts_frames(a), args.gl_iterations) for a in real],
          time.monotonic() - t)
    t = time.monotonic()
    base_waves = voice("base TTS", synthesize(base_tm, texts, gl_iterations=args.gl_iterations), time.monotonic() - t,
                       dev_frame_l1=base_dev_l1)
    for tb, a in adapters.items():
        judge = load_judge(spec, candidate_dir=a["dir"])  # refuses a judge that is the candidate
        t = time.monotonic()
        waves = synthesize(load_tts_adapter(tts_base, a["dir"]), texts, gl_iterations=args.gl_iterations)
        voice(f"candidate, {tb:.0f} s adapter", waves, time.monotonic() - t, timebox_s=tb,
              mcd_vs_base_tts=mean_mcd(waves, base_waves), steps=a["steps"], samples=a["samples"],
              samples_per_s=a["samples_per_s"], train_seconds=a["train_seconds"],
              wall_seconds=a["wall_seconds"], dev_frame_l1=a["dev_frame_l1"])

    table = Table(title=f"TTS {args.dialect}: judge = base ASR {spec.version[:12]}, {len(texts)} test sentences")
    for c in ("voice", "judge CER", "WER", "collapse", "MCD vs real", "MCD vs base TTS", "steps", "samples/s",
              "train s", "wall s", "dev frame L1"):
        table.add_column(c, justify="left" if c == "voice" else "right")

    def f(x, fmt: str) -> str:
        return "" if x is None else format(x, fmt)

    for r in rows:
        table.add_row(r["voice"], f(r["cer"], ".3f"), f(r["wer"], ".3f"), f(r["collapse"], ".2f"),
                      f(r["mcd_vs_real"], ".1f"), f(r.get("mcd_vs_base_tts"), ".1f"), f(r.get("steps"), "d"),
                      f(r.get("samples_per_s"), ".1f"), f(r.get("train_seconds"), ".0f"),
                      f(r.get("wall_seconds"), ".0f"), f(r.get("dev_frame_l1"), ".3f"))
    console.print(table)

    res = {
        "dialect": args.dialect, "dataset_version": version.name, "n_test": len(texts),
        "judge": {"dir": str(asr_base), "version": spec.version},
        "tts_base": {"dir": str(tts_base), "hash": model_dir_hash(tts_base)} | base_meta,
        "timeboxes": timeboxes, "gl_iterations": args.gl_iterations, "threads": args.threads,
        "voices": rows, "adapters": list(adapters.values()),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_avg_end": os.getloadavg(),
                    "torch": torch.__version__},
        "wall_seconds": time.monotonic() - t0,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1, default=str) + "\n")
    console.print(f"wrote {args.out} ({res['wall_seconds']:.0f} s)")
    return res


if __name__ == "__main__":
    main()
