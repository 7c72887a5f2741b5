"""The production instance (deploy/postgres/dagster.yaml) on a real PostgreSQL server.

The file is used exactly as shipped: copied into a temporary DAGSTER_HOME, credentials from the
DAGSTER_PG_* variables pointing at the pytest-postgresql server (tests/conftest_pg.py), one fresh
database for Dagster and another for mloc's own state, as in production.
"""

import shutil
import uuid
from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage

from mloc_dagster.assets.datasets.versions import dataset_version
from mloc_dagster.assets.training.adapters import TRAIN_JOB
from mloc_dagster.core.state import StateStore
from mloc_dagster.definitions import defs
from mloc_dagster.partitions import dialect_partitions
from mloc_dagster.resources.artifacts import ArtifactStore
from mloc_dagster.resources.state import StateStoreResource
from mloc_dagster.sensors.training_chain import training_chain_sensor
from tests.conftest import copy_batch
from tests.conftest_pg import fresh_database

pytestmark = pytest.mark.postgres

REPO = Path(__file__).resolve().parents[2]
PG_YAML = REPO / "deploy" / "postgres" / "dagster.yaml"
DIALECT = "en-gb-scotland"


@pytest.fixture()
def pg_instance(pg_server, mloc_home, tmp_path, monkeypatch):
    """DagsterInstance.get() on deploy/postgres/dagster.yaml, backed by a fresh database."""
    with fresh_database(pg_server) as dbname:
        dagster_home = tmp_path / "dagster_home_pg"
        dagster_home.mkdir()
        shutil.copy(PG_YAML, dagster_home / "dagster.yaml")
        monkeypatch.setenv("DAGSTER_HOME", str(dagster_home))
        monkeypatch.setenv("DAGSTER_PG_USERNAME", pg_server.user)
        monkeypatch.setenv("DAGSTER_PG_PASSWORD", "")  # the test cluster trusts local TCP
        monkeypatch.setenv("DAGSTER_PG_HOST", pg_server.host)
        monkeypatch.setenv("DAGSTER_PG_PORT", str(pg_server.port))
        monkeypatch.setenv("DAGSTER_PG_DB", dbname)
        with dg.DagsterInstance.get() as instance:
            yield instance


def test_production_yaml_keeps_the_embedded_settings():
    """Moving to Postgres must not change scheduling, the gpu pool, retries or monitoring."""
    prod = yaml.safe_load(PG_YAML.read_text())
    embedded = yaml.safe_load((REPO / "dagster.yaml").read_text())
    for key in ("run_coordinator", "concurrency", "run_retries", "run_monitoring", "sensors", "schedules"):
        assert prod[key] == embedded[key], key
    db = prod["storage"]["postgres"]["postgres_db"]
    assert {k: v["env"] for k, v in db.items() if isinstance(v, dict)} == {
        "username": "DAGSTER_PG_USERNAME", "password": "DAGSTER_PG_PASSWORD", "hostname": "DAGSTER_PG_HOST",
        "db_name": "DAGSTER_PG_DB", "port": "DAGSTER_PG_PORT"}
    assert db["scheme"] == "postgresql+psycopg2"


def test_instance_is_postgres_backed_with_the_shipped_settings(pg_instance, pg_server):
    assert isinstance(pg_instance.run_storage, PostgresRunStorage)
    assert isinstance(pg_instance.event_log_storage, PostgresEventLogStorage)
    assert isinstance(pg_instance.schedule_storage, PostgresScheduleStorage)
    assert f"@{pg_server.host}:{pg_server.port}/" in pg_instance.run_storage.postgres_url
    assert type(pg_instance.run_coordinator).__name__ == "QueuedRunCoordinator"
    assert pg_instance.run_retries_enabled and pg_instance.run_retries_max_retries == 3
    assert pg_instance.run_monitoring_enabled
    assert pg_instance.get_concurrency_config().pool_config.default_pool_limit == 1
    # Instance-level pool limits live in the database (what `dagster instance concurrency set` does).
    pg_instance.event_log_storage.set_concurrency_slots("gpu", 2)
    assert pg_instance.event_log_storage.get_concurrency_info("gpu").slot_count == 2


def test_materialize_dataset_version_on_postgres(pg_instance, mloc_home, espeak_batch):
    copy_batch(espeak_batch, mloc_home / "incoming", DIALECT, "b0001")
    pg_instance.add_dynamic_partitions(dialect_partitions.name, [DIALECT])

    result = dg.materialize([dataset_version], partition_key=DIALECT, instance=pg_instance,
                            resources={"artifacts": ArtifactStore()})
    assert result.success

    # Read back from Postgres, not from the result object.
    record = pg_instance.get_run_record_by_id(result.run_id)
    assert record.dagster_run.status == dg.DagsterRunStatus.SUCCESS
    event = pg_instance.get_latest_materialization_event(dg.AssetKey("dataset_version"))
    mat = event.asset_materialization
    assert event.run_id == result.run_id and mat.partition == DIALECT
    assert mat.metadata["rows"].value == 36 and mat.metadata["quarantined"].value == 0
    assert mat.tags["dagster/data_version"] == mat.metadata["version"].value
    assert Path(mat.metadata["path"].value, "manifest.json").is_file()
    assert pg_instance.get_materialized_partitions(dg.AssetKey("dataset_version")) == {DIALECT}


def test_training_chain_sensor_on_postgres(pg_instance, postgres_url):
    """Dagster on one database, mloc state on another, both Postgres: the sensor chains a run."""
    store = StateStore(postgres_url)
    run = store.create_run(dialect=DIALECT, dataset_version="/d", base_model_version="/m",
                           hparams={"lr": 0.001}, timebox_s=60, max_jobs=2, candidate_every=2)
    resources = {"state": StateStoreResource(url=postgres_url)}

    def tick(cursor=None):
        ctx = dg.build_sensor_context(instance=pg_instance, cursor=cursor, definitions=defs, resources=resources)
        result = training_chain_sensor(ctx)
        return [(r.job_name, r.run_key) for r in result.run_requests], result

    requested, result = tick()
    assert requested == [(TRAIN_JOB, f"{run.run_id}/0")]
    request = result.run_requests[0]
    assert request.partition_key == DIALECT and request.tags["mloc/run_id"] == run.run_id
    assert request.run_config["ops"]["adapter_checkpoint"]["config"]["job_index"] == 0
    assert tick(result.cursor)[0] == []  # job 0 in flight: nothing twice

    # The job fails for good (retries exhausted): the failure query runs against Postgres run storage.
    failed = pg_instance.add_run(dg.DagsterRun(
        job_name=TRAIN_JOB, run_id=str(uuid.uuid4()), status=dg.DagsterRunStatus.STARTED,
        # the last of its retries (Dagster counts the run group; this lone record says so by its tags)
        tags={"mloc/run_id": run.run_id, "mloc/job_index": "0", "dagster/retry_number": "3",
              "dagster/max_retries": "0"}))
    pg_instance.report_run_failed(failed)
    requested, _ = tick(result.cursor)
    assert requested == []
    assert store.get_run(run.run_id).status == "failed"
    assert "job 0 failed after 4 attempt(s)" in store.get_run(run.run_id).status_reason
