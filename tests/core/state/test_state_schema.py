"""The state store's schema on PostgreSQL: version paths of any length, and an older schema whose
VARCHAR(128) version columns are widened in place."""

import pytest
import sqlalchemy as sa

from mloc_dagster.core.state import StateStore

LONG = "/srv/mloc/" + "deep/" * 60 + "datasets/en-gb/0123456789abcdef"  # > 128 characters

OLD_RUNS = ("CREATE TABLE training_runs (run_id VARCHAR(64) PRIMARY KEY, dialect VARCHAR(64) NOT NULL, "
            "dataset_version VARCHAR(128) NOT NULL, base_model_version VARCHAR(128) NOT NULL, "
            "hparams JSON NOT NULL, timebox_s INTEGER NOT NULL, max_jobs INTEGER NOT NULL, "
            "candidate_every INTEGER NOT NULL, status VARCHAR(16) NOT NULL, status_reason TEXT, "
            "last_finished_job INTEGER, created_at TIMESTAMP NOT NULL, updated_at TIMESTAMP NOT NULL)")


def long_run(store: StateStore):
    run = store.create_run(dialect="en-gb", dataset_version=LONG, base_model_version=LONG + "/model",
                           hparams={}, timebox_s=60, max_jobs=1, candidate_every=1)
    return store.get_run(run.run_id)


@pytest.mark.postgres
def test_version_paths_longer_than_128_characters_are_stored_on_postgres(postgres_url):
    with StateStore(postgres_url) as store:
        assert long_run(store).dataset_version == LONG


@pytest.mark.postgres
def test_an_older_postgres_schema_has_its_version_columns_widened_in_place(postgres_url):
    engine = sa.create_engine(postgres_url)
    with engine.begin() as conn:
        conn.exec_driver_sql(OLD_RUNS)
    engine.dispose()
    with StateStore(postgres_url) as store:
        assert {"training_runs.dataset_version", "training_runs.base_model_version"} <= set(store.migrated)
        assert long_run(store).base_model_version == LONG + "/model"
    with StateStore(postgres_url) as store:  # idempotent
        assert store.migrated == []
