"""A production line with real learning, built once per session: an espeak corpus with enough
speakers for the gate's speaker bootstrap, a briefly pre-trained base model, and adapters that
were actually trained (B ≠ 0): a good one, a weak one (two tiny steps: worse than the good one),
and one trained on another base model. Each test gets its own DAGSTER_HOME on top of it."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.world import build_once, home_env, populate_home, tiny_base

DIALECT = "en-gb-scotland"
BASE_DIALECT = "en-us"


@dataclass(frozen=True)
class Line:
    incoming: Path
    base: Path  # pre-trained base model directory
    other_base: Path  # a second base model (a "base-model change")
    adapters: dict  # name -> AdapterJobResult


@pytest.fixture(scope="session")
def line(tmp_path_factory, worker_id) -> Line:
    from mloc_dagster.core.training.spec import AdapterJobResult

    root, record = build_once(tmp_path_factory, worker_id, "line", _build_line)
    adapters = {name: AdapterJobResult.from_json(r) for name, r in record["adapters"].items()}
    return Line(root / "incoming", root / "base", root / "other-base", adapters)


def _build_line(root: Path) -> dict:
    from mloc_dagster.core.data.batches import find_batches
    from mloc_dagster.core.data.corpus import synth_dialect
    from mloc_dagster.core.data.datasets import build_version
    from mloc_dagster.core.models.pretrain import pretrain_base
    from mloc_dagster.core.training.asr import train_adapter
    from mloc_dagster.core.training.spec import AdapterHParams, AdapterJobSpec

    incoming, features = root / "incoming", root / "features"
    synth_dialect(BASE_DIALECT, 240, incoming, seed=0, speakers=16, batch_id="b0001")
    synth_dialect(DIALECT, 200, incoming, seed=1, speakers=20, batch_id="b0001")
    versions = {d: build_version(d, find_batches(incoming, d), root / "datasets" / d).path
                for d in (BASE_DIALECT, DIALECT)}
    base = root / "base"
    pretrain_base(versions[BASE_DIALECT], base, train_seconds=900, max_steps=150, seed=0, feature_cache_dir=features)
    other_base = tiny_base(root / "other-base")

    # Hparams spelled out: the line's adapters must not change when a default does.
    def adapter(name: str, base_dir: Path, steps: int, lr: float) -> dict:
        return train_adapter(AdapterJobSpec(
            base_model_dir=base_dir, dataset_version_path=versions[DIALECT], out_dir=root / "adapters" / name,
            timebox_s=900, max_steps=steps, hparams=AdapterHParams(lr=lr, rehearsal_fraction=0.25, distill_weight=1.0),
            rehearsal_dataset_path=versions[BASE_DIALECT], feature_cache_dir=features, run_id=name,
            job_index=0)).to_json()

    return {"adapters": {"good": adapter("good", base, 60, 3e-3), "weak": adapter("weak", base, 2, 1e-4),
                         "other-base": adapter("other-base", other_base, 2, 3e-3)}}


@pytest.fixture(scope="session")
def line_template(line, tmp_path_factory, worker_id) -> Path:
    """A DAGSTER_HOME with both dialects ingested through Dagster and the base registered, built
    once; each test starts from a copy (the datasets and the base it points to are read-only)."""
    import dagster as dg

    def build(out: Path) -> dict:
        with home_env(out / "home"), dg.DagsterInstance.get() as instance:
            populate_home(instance, out / "home", {d: line.incoming / d for d in (BASE_DIALECT, DIALECT)}, line.base)
        return {}

    return build_once(tmp_path_factory, worker_id, "line-home", build)[0] / "home" / "dagster"


@pytest.fixture()
def line_instance(line_template, mloc_home):
    """A fresh instance (its own DAGSTER_HOME, MLOC_HOME and state store) on the shared line."""
    import dagster as dg

    shutil.copytree(line_template, mloc_home / "dagster", dirs_exist_ok=True)
    instance = dg.DagsterInstance.get()
    yield instance
    instance.dispose()
