"""Shared fixtures: a temporary MLOC_HOME/DAGSTER_HOME and real espeak audio."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytest_plugins = ["tests.conftest_pg"] if (REPO / "tests" / "conftest_pg.py").exists() else []


@pytest.fixture()
def mloc_home(tmp_path, monkeypatch) -> Path:
    """A fresh MLOC_HOME and DAGSTER_HOME (with the project's dagster.yaml) for one test."""
    home = tmp_path / "mloc"
    dagster_home = home / "dagster"
    dagster_home.mkdir(parents=True)
    shutil.copy(REPO / "dagster.yaml", dagster_home / "dagster.yaml")
    monkeypatch.setenv("MLOC_HOME", str(home))
    monkeypatch.setenv("DAGSTER_HOME", str(dagster_home))
    monkeypatch.delenv("MLOC_DATABASE_URL", raising=False)
    return home


@pytest.fixture(scope="session")
def espeak_batch(tmp_path_factory) -> Path:
    """One real espeak batch (en-gb-scotland, 36 utterances, 12 speakers), synthesized once."""
    from mloc_dagster.core.data.corpus import synth_dialect

    root = tmp_path_factory.mktemp("espeak")
    return synth_dialect("en-gb-scotland", 36, root / "incoming", seed=3, speakers=12, batch_id="b0001")


def copy_batch(src: Path, incoming: Path, dialect: str, batch_id: str) -> Path:
    dst = incoming / dialect / batch_id
    shutil.copytree(src, dst)
    return dst


def write_manifest(batch_dir: Path, rows: list, name: str = "manifest.jsonl") -> None:
    lines = [r if isinstance(r, bytes) else json.dumps(r).encode() for r in rows]
    (batch_dir / name).write_bytes(b"\n".join(lines) + b"\n")


@pytest.fixture()
def registered_base(mloc_home, espeak_batch, tmp_path):
    """On the test's DAGSTER_HOME: dataset versions for en-us and en-gb-scotland (the espeak batch)
    and an untrained tiny base model registered through base_model's checkpoint_dir path."""
    import dagster as dg

    from mloc_dagster.core.models.ctc import new_tiny_model, save_base_model
    from mloc_dagster.definitions import defs
    from mloc_dagster.partitions import dialect_partitions

    dialects = ["en-us", "en-gb-scotland"]
    for dialect in dialects:
        copy_batch(espeak_batch, mloc_home / "incoming", dialect, "b0001")
    instance = dg.DagsterInstance.get()
    instance.add_dynamic_partitions(dialect_partitions.name, dialects)
    for dialect in dialects:
        assert defs.resolve_job_def("ingest_job").execute_in_process(partition_key=dialect, instance=instance).success
    base_dir = save_base_model(new_tiny_model(), tmp_path / "tiny")
    assert defs.resolve_job_def("base_model_job").execute_in_process(
        instance=instance, run_config={"ops": {"base_model": {"config": {"checkpoint_dir": str(base_dir)}}}}).success
    yield instance, base_dir
    instance.dispose()


def pytest_collection_modifyitems(config, items):
    """Test files with slow (daemon-driven) tests first: `make test` hands whole files to parallel
    workers in this order (pytest-xdist ``--dist loadfile``), so the longest files start at once
    instead of forming a tail; within a file the order is unchanged."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)
