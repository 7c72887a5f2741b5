"""Shared fixtures: a temporary MLOC_HOME/DAGSTER_HOME and real espeak audio."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.world import build_once, copy_home, home_env, populate_home, tiny_base

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
def espeak_batch(tmp_path_factory, worker_id) -> Path:
    """One real espeak batch (en-gb-scotland, 36 utterances, 12 speakers), synthesized once per run."""
    from mloc_dagster.core.data.corpus import synth_dialect

    def build(out: Path) -> dict:
        return {"batch": str(synth_dialect("en-gb-scotland", 36, out / "incoming", seed=3, speakers=12,
                                           batch_id="b0001"))}

    return Path(build_once(tmp_path_factory, worker_id, "espeak", build)[1]["batch"])


def copy_batch(src: Path, incoming: Path, dialect: str, batch_id: str) -> Path:
    dst = incoming / dialect / batch_id
    shutil.copytree(src, dst)
    return dst


def write_manifest(batch_dir: Path, rows: list, name: str = "manifest.jsonl") -> None:
    lines = [r if isinstance(r, bytes) else json.dumps(r).encode() for r in rows]
    (batch_dir / name).write_bytes(b"\n".join(lines) + b"\n")


@pytest.fixture(scope="session")
def base_home(espeak_batch, tmp_path_factory, worker_id) -> tuple[Path, Path]:
    """A home with dataset versions for en-us and en-gb-scotland (the espeak batch) and an
    untrained tiny base model registered through base_model's checkpoint_dir path, built once per
    run: (home, base model directory)."""
    import dagster as dg

    def build(out: Path) -> dict:
        base_dir = tiny_base(out / "tiny")
        with home_env(out / "home"), dg.DagsterInstance.get() as instance:
            populate_home(instance, out / "home", {"en-us": espeak_batch, "en-gb-scotland": espeak_batch}, base_dir)
        return {"home": str(out / "home"), "base": str(base_dir)}

    record = build_once(tmp_path_factory, worker_id, "base-home", build)[1]
    return Path(record["home"]), Path(record["base"])


@pytest.fixture()
def registered_base(base_home, mloc_home):
    """The test's MLOC_HOME as a copy of ``base_home``: (its instance, the base model directory)."""
    import dagster as dg

    copy_home(base_home[0], mloc_home)
    instance = dg.DagsterInstance.get()
    yield instance, base_home[1]
    instance.dispose()


def pytest_collection_modifyitems(config, items):
    """Test files with slow (daemon-driven) tests first: `make test` hands whole files to parallel
    workers in this order (pytest-xdist ``--dist loadfile``), so the longest files start at once
    instead of forming a tail; within a file the order is unchanged."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)
