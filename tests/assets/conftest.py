"""A production line with real learning, built once per session: an espeak corpus with enough
speakers for the gate's speaker bootstrap, a briefly pre-trained base model, and adapters that
were actually trained (B ≠ 0): a good one, a weak one (two tiny steps: worse than the good one),
and one trained on another base model. Each test gets its own DAGSTER_HOME on top of it."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

DIALECT = "en-gb-scotland"
BASE_DIALECT = "en-us"


@dataclass(frozen=True)
class Line:
    incoming: Path
    base: Path  # pre-trained base model directory
    other_base: Path  # a second base model (a "base-model change")
    adapters: dict  # name -> AdapterJobResult


@pytest.fixture(scope="session")
def line(tmp_path_factory) -> Line:
    from mloc_dagster.core.data.batches import find_batches
    from mloc_dagster.core.data.corpus import synth_dialect
    from mloc_dagster.core.data.datasets import build_version
    from mloc_dagster.core.models.ctc import new_tiny_model, save_base_model
    from mloc_dagster.core.models.pretrain import pretrain_base
    from mloc_dagster.core.training.asr import train_adapter
    from mloc_dagster.core.training.spec import AdapterHParams, AdapterJobSpec

    root = tmp_path_factory.mktemp("line")
    incoming, features = root / "incoming", root / "features"
    synth_dialect(BASE_DIALECT, 240, incoming, seed=0, speakers=16, batch_id="b0001")
    synth_dialect(DIALECT, 200, incoming, seed=1, speakers=20, batch_id="b0001")
    versions = {d: build_version(d, find_batches(incoming, d), root / "datasets" / d).path
                for d in (BASE_DIALECT, DIALECT)}
    base = root / "base"
    pretrain_base(versions[BASE_DIALECT], base, train_seconds=900, max_steps=150, seed=0, feature_cache_dir=features)
    other_base = save_base_model(new_tiny_model(), root / "other-base")

    # Hparams spelled out: the line's adapters must not change when a default does.
    def adapter(name: str, base_dir: Path, steps: int, lr: float):
        return train_adapter(AdapterJobSpec(
            base_model_dir=base_dir, dataset_version_path=versions[DIALECT], out_dir=root / "adapters" / name,
            timebox_s=900, max_steps=steps, hparams=AdapterHParams(lr=lr, rehearsal_fraction=0.25, distill_weight=1.0),
            rehearsal_dataset_path=versions[BASE_DIALECT], feature_cache_dir=features, run_id=name, job_index=0))

    adapters = {"good": adapter("good", base, 60, 3e-3), "weak": adapter("weak", base, 2, 1e-4),
                "other-base": adapter("other-base", other_base, 2, 3e-3)}
    return Line(incoming, base, other_base, adapters)


@pytest.fixture(scope="session")
def line_template(line, tmp_path_factory) -> Path:
    """A DAGSTER_HOME with both dialects ingested through Dagster and the base registered, built
    once; each test starts from a copy (the datasets and the base it points to are read-only)."""
    import os

    import dagster as dg

    from mloc_dagster.definitions import defs
    from mloc_dagster.partitions import dialect_partitions
    from tests.conftest import REPO

    home = tmp_path_factory.mktemp("line-home")
    (home / "dagster").mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster" / "dagster.yaml")
    shutil.copytree(line.incoming, home / "incoming")
    saved = {k: os.environ.get(k) for k in ("MLOC_HOME", "DAGSTER_HOME", "MLOC_DATABASE_URL")}
    os.environ.update(MLOC_HOME=str(home), DAGSTER_HOME=str(home / "dagster"))
    os.environ.pop("MLOC_DATABASE_URL", None)
    try:
        with dg.DagsterInstance.get() as instance:
            instance.add_dynamic_partitions(dialect_partitions.name, [BASE_DIALECT, DIALECT])
            for dialect in (BASE_DIALECT, DIALECT):
                assert defs.resolve_job_def("ingest_job").execute_in_process(partition_key=dialect,
                                                                             instance=instance).success
            register_base(instance, line.base)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return home / "dagster"


@pytest.fixture()
def line_instance(line_template, mloc_home):
    """A fresh instance (its own DAGSTER_HOME, MLOC_HOME and state store) on the shared line."""
    import dagster as dg

    shutil.copytree(line_template, mloc_home / "dagster", dirs_exist_ok=True)
    instance = dg.DagsterInstance.get()
    yield instance
    instance.dispose()


def register_base(instance, base_dir: Path):
    from mloc_dagster.definitions import defs

    result = defs.resolve_job_def("base_model_job").execute_in_process(
        instance=instance, run_config={"ops": {"base_model": {"config": {"checkpoint_dir": str(base_dir)}}}})
    assert result.success
    return result.asset_materializations_for_node("base_model")[0].metadata["version"].value
