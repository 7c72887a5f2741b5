"""A full disk while a job saves: a clear error, the previous checkpoint intact, no torn output.

The disk fills for real: the job runs in a subprocess whose RLIMIT_FSIZE makes the kernel refuse
writes past 8 KiB (EFBIG), which is what a full volume looks like to the writer."""

import hashlib
import subprocess
import sys
from pathlib import Path

from mloc_dagster.core.adapters.format import read_adapter_dir
from mloc_dagster.core.training.asr import train_adapter
from mloc_dagster.core.training.spec import AdapterHParams, AdapterJobSpec

CHILD = r"""
import resource, signal, sys
from pathlib import Path
from mloc_dagster.core.training.spec import AdapterHParams, AdapterJobSpec
from mloc_dagster.core.training.asr import train_adapter
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG as an OSError instead of a signal
resource.setrlimit(resource.RLIMIT_FSIZE, (8 * 1024, 8 * 1024))
base, data, out, prev, cache = sys.argv[1:]
try:
    train_adapter(AdapterJobSpec(base_model_dir=base, dataset_version_path=data, out_dir=out, resume_from=prev,
                                 timebox_s=120, max_steps=4, feature_cache_dir=cache,
                                 hparams=AdapterHParams(r=4, alpha=8.0, batch_size=4)))
except OSError as exc:
    print(f"OSError: {exc}")
    sys.exit(3)
print("no error")
"""


def digest(d: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def test_full_disk_during_save(pretrained_base, corpus, tmp_path):
    base, _ = pretrained_base
    job0 = tmp_path / "run" / "job-0000"
    train_adapter(AdapterJobSpec(base_model_dir=base, dataset_version_path=corpus.scottish, out_dir=job0,
                                 timebox_s=120, max_steps=4, feature_cache_dir=corpus.feature_cache,
                                 hparams=AdapterHParams(r=4, alpha=8.0, batch_size=4)))
    before = digest(job0)
    job1 = tmp_path / "run" / "job-0001"
    proc = subprocess.run([sys.executable, "-c", CHILD, str(base), str(corpus.scottish), str(job1), str(job0),
                           str(corpus.feature_cache)], capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 3, proc.stdout + proc.stderr[-2000:]
    assert "File too large" in proc.stdout
    assert digest(job0) == before  # the previous checkpoint is untouched and still valid
    read_adapter_dir(job0)
    assert not job1.exists()  # nothing torn at the final path; temp dirs are cleaned up
    leftovers = [p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]
    assert leftovers == []
