"""The test world: what the suite builds once per test run and the tests copy.

Two pieces, used by every world fixture (``tests/conftest.py``, ``tests/core/conftest.py``,
``tests/assets/conftest.py``, ``tests/core/tts``, ``tests/ui/world.py``):

- :func:`build_once` builds a named directory once per test run. Under pytest-xdist the workers
  share it: the first to ask builds it under a file lock, the others wait for it and read what the
  build returned (a JSON record). Worlds are read-only once built; a test that changes something
  works on a copy.
- :func:`populate_home` turns a fresh MLOC_HOME into a home with dialects ingested through Dagster
  and a base model registered: the one way a test home gets its datasets and base.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock

REPO = Path(__file__).resolve().parent.parent
_RECORD = ".built.json"


def build_once(tmp_path_factory, worker_id: str, name: str, build: Callable[[Path], dict]) -> tuple[Path, dict]:
    """``build(out)`` into ``<run's temp>/world/<name>`` unless this run already did; returns the
    directory and the record ``build`` returned (JSON: paths as strings)."""
    root = tmp_path_factory.getbasetemp()
    if worker_id != "master":  # xdist: every worker's base temp sits in the run's directory
        root = root.parent
    (root / "world").mkdir(exist_ok=True)
    out = root / "world" / name
    with FileLock(str(out) + ".lock"):
        record = out / _RECORD
        if not record.is_file():
            shutil.rmtree(out, ignore_errors=True)  # a build that failed half-way
            out.mkdir()
            record.write_text(json.dumps(build(out)))
        return out, json.loads(record.read_text())


@contextmanager
def home_env(home: Path) -> Iterator[None]:
    """MLOC_HOME=home, DAGSTER_HOME=home/dagster (with the project's dagster.yaml) for a build
    outside a test's monkeypatch; restores the environment after."""
    (home / "dagster").mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "dagster.yaml", home / "dagster" / "dagster.yaml")
    saved = {k: os.environ.get(k) for k in ("MLOC_HOME", "DAGSTER_HOME", "MLOC_DATABASE_URL")}
    os.environ.update(MLOC_HOME=str(home), DAGSTER_HOME=str(home / "dagster"))
    os.environ.pop("MLOC_DATABASE_URL", None)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def populate_home(instance, home: Path, incoming: dict[str, Path], base_dir: Path) -> str:
    """On the instance of ``home`` (MLOC_HOME): each dialect's batches copied from ``incoming``
    (dialect -> a directory of batches, or one batch named by its directory), ingested through
    ingest_job, and the base model at ``base_dir`` registered through base_model_job. Returns the
    base model's version."""
    from mloc_dagster.definitions import defs
    from mloc_dagster.partitions import dialect_partitions

    for dialect, src in incoming.items():
        dst = home / "incoming" / dialect
        if (src / "manifest.jsonl").is_file():  # one batch
            shutil.copytree(src, dst / src.name)
        else:
            shutil.copytree(src, dst)
    instance.add_dynamic_partitions(dialect_partitions.name, list(incoming))
    for dialect in incoming:
        assert defs.resolve_job_def("ingest_job").execute_in_process(partition_key=dialect, instance=instance).success
    return register_base(instance, base_dir)


def register_base(instance, base_dir: Path) -> str:
    """base_model_job with ``checkpoint_dir``: the directory registered under its content hash."""
    from mloc_dagster.definitions import defs

    result = defs.resolve_job_def("base_model_job").execute_in_process(
        instance=instance, run_config={"ops": {"base_model": {"config": {"checkpoint_dir": str(base_dir)}}}})
    assert result.success
    return result.asset_materializations_for_node("base_model")[0].metadata["version"].value


def tiny_base(out: Path, seed: int = 0) -> Path:
    """An untrained tiny base model saved at ``out``, the same on every run (seeded)."""
    import torch

    from mloc_dagster.core.models.ctc import new_tiny_model
    from mloc_dagster.core.models.families import save_base_model

    torch.manual_seed(seed)
    return save_base_model(new_tiny_model(), out)


def copy_home(template: Path, home: Path) -> None:
    """A test's MLOC_HOME as a copy of a built home (its metadata still names the template's
    datasets and base, which stay read-only)."""
    shutil.copytree(template, home, dirs_exist_ok=True, ignore=shutil.ignore_patterns(_RECORD))
