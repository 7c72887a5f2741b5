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
    from mloc_dagster.core.corpus import synth_dialect

    root = tmp_path_factory.mktemp("espeak")
    return synth_dialect("en-gb-scotland", 36, root / "incoming", seed=3, batch_id="b0001")


def copy_batch(src: Path, incoming: Path, dialect: str, batch_id: str) -> Path:
    dst = incoming / dialect / batch_id
    shutil.copytree(src, dst)
    return dst


def write_manifest(batch_dir: Path, rows: list, name: str = "manifest.jsonl") -> None:
    lines = [r if isinstance(r, bytes) else json.dumps(r).encode() for r in rows]
    (batch_dir / name).write_bytes(b"\n".join(lines) + b"\n")
