"""`mloc export`: every table, both formats, a versioned directory with its schema, clear errors."""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from mloc_dagster.cli.main import app
from mloc_dagster.core.state import StateStore
from mloc_dagster.core.state.engine import resolve_state_url
from mloc_dagster.operations.export import SCHEMA_VERSION, TABLES

DIALECT = "en-gb-scotland"


def make_state(home: Path) -> StateStore:
    store = StateStore(resolve_state_url())
    run = store.create_run(dialect=DIALECT, dataset_version="dv1", base_model_version="bm1", max_jobs=2)
    store.record_job_started(run.run_id, 0, dagster_run_id="d0", node_id="node-a")
    store.record_job_finished(run.run_id, 0, "succeeded", checkpoint_path="/ckpt/0", sha256="a" * 64,
                              metrics={"dev_cer": 0.31, "train_loss": 1.5})
    store.record_job_started(run.run_id, 1, dagster_run_id="d1", node_id="node-b")
    store.record_job_finished(run.run_id, 1, "failed", error="CUDA out of memory")
    cand = store.record_candidate(dialect=DIALECT, adapter_path="/cand/1", sha256="c" * 64, sources=[], trusted=True)
    report = home / "reports" / f"{cand.candidate_id}.json"
    report.parent.mkdir(parents=True)
    report.write_text(json.dumps({"decision": "passed", "gates": [
        {"name": "cer_gate", "passed": True, "value": 0.12, "threshold": 0.15, "description": "CER ok"},
        {"name": "wer_gate", "passed": True, "value": 0.18, "threshold": 0.20, "description": "WER ok"}]}))
    store.set_gate_result(cand.candidate_id, "passed", str(report))
    store.record_promotion(DIALECT, "stable", cand.candidate_id)
    store.heartbeat_node("node-a", host="gpu-host-1")
    store.set_node_reputation("node-a", 0.5)
    return store


def test_parquet_and_json_exports(mloc_home: Path, tmp_path: Path) -> None:
    make_state(mloc_home).close()
    runner = CliRunner()
    result = runner.invoke(app, ["export", "--format", "parquet", "--out", str(tmp_path / "exports")])
    assert result.exit_code == 0, result.output
    target = Path(result.output.strip())
    assert target.parent == tmp_path / "exports" and target.name.startswith("mloc-export-")

    manifest = json.loads((target / "manifest.json").read_text())
    assert manifest["schema_version"] == SCHEMA_VERSION and manifest["format"] == "parquet"
    rows = {name: t["rows"] for name, t in manifest["tables"].items()}
    assert rows.pop("nodes") >= 1  # node-a, and whatever registered itself through its jobs
    assert rows == {"runs": 1, "jobs": 2, "candidates": 1, "gate_results": 2, "promotions": 1}
    jobs = pq.read_table(target / "jobs.parquet")
    assert jobs.schema.equals(TABLES["jobs"])
    by_index = {r["job_index"]: r for r in jobs.to_pylist()}
    assert by_index[0]["dev_cer"] == 0.31 and by_index[0]["node_id"] == "node-a"
    assert by_index[1]["status"] == "failed" and by_index[1]["error"] == "CUDA out of memory"
    nodes = {n["node_id"]: n for n in pq.read_table(target / "nodes.parquet").to_pylist()}
    assert nodes["node-a"]["host"] == "gpu-host-1" and nodes["node-a"]["reputation"] == 0.5
    gates = pq.read_table(target / "gate_results.parquet").to_pylist()
    assert {(g["gate"], g["passed"], g["threshold"]) for g in gates} == {("cer_gate", True, 0.15),
                                                                          ("wer_gate", True, 0.20)}

    again = runner.invoke(app, ["export", "--format", "json", "--out", str(tmp_path / "exports")])
    assert again.exit_code == 0, again.output
    second = Path(again.output.strip())
    assert second != target  # every export is a new version, the old one stays
    promotions = json.loads((second / "promotions.json").read_text())
    assert promotions[0]["branch"] == "stable" and promotions[0]["promoted_at"].endswith("+00:00")
    assert json.loads((second / "manifest.json").read_text())["tables"]["runs"]["columns"]["created_at"] == \
        "timestamp[us, tz=UTC]"


def test_bad_input_is_a_clear_error(mloc_home: Path, tmp_path: Path) -> None:
    make_state(mloc_home).close()
    runner = CliRunner()
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = runner.invoke(app, ["export", "--out", str(blocker / "exports")])
    assert result.exit_code == 2
    assert "cannot create" in result.output and "Not a directory" in result.output
    result = runner.invoke(app, ["export", "--format", "csv", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "format must be one of parquet, json" in result.output


@pytest.mark.postgres
def test_the_database_password_never_leaves_an_export(mloc_home: Path, tmp_path: Path, pg_server, postgres_url,
                                                      monkeypatch, caplog) -> None:
    """The real CLI on a real Postgres, logged in as a role with a password: the password is in
    MLOC_DATABASE_URL only, never in the export, its manifest, the output or the logs."""
    database = sa.engine.make_url(postgres_url).database
    role, password = f"mloc_{uuid.uuid4().hex[:8]}", f"pw-{uuid.uuid4().hex}"
    admin = sa.create_engine(postgres_url)
    with admin.begin() as conn:
        conn.execute(sa.text(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'"))
        conn.execute(sa.text(f'ALTER DATABASE "{database}" OWNER TO {role}'))
        conn.execute(sa.text(f"GRANT ALL ON SCHEMA public TO {role}"))
    url = f"postgresql+psycopg2://{role}:{password}@{pg_server.host}:{pg_server.port}/{database}"
    monkeypatch.setenv("MLOC_DATABASE_URL", url)
    caplog.set_level(logging.DEBUG)
    try:
        make_state(mloc_home).close()
        runner = CliRunner()
        outputs = []
        for fmt in ("parquet", "json"):
            result = runner.invoke(app, ["export", "--format", fmt, "--out", str(tmp_path / "exports")])
            assert result.exit_code == 0, result.output
            outputs.append(result.output)
            manifest = json.loads((Path(result.output.strip()) / "manifest.json").read_text())
            assert manifest["state_store"] == \
                f"postgresql+psycopg2://{role}:***@{pg_server.host}:{pg_server.port}/{database}"
            assert manifest["tables"]["runs"]["rows"] == 1  # it did read the store, as that role
        files = [p for p in (tmp_path / "exports").rglob("*") if p.is_file()]
        assert len(files) == 2 * (len(TABLES) + 1)
        assert not [p for p in files if password.encode() in p.read_bytes()]
        assert password not in "".join(outputs) and password not in caplog.text
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f'ALTER DATABASE "{database}" OWNER TO {pg_server.user}'))
            conn.execute(sa.text(f"REASSIGN OWNED BY {role} TO {pg_server.user}"))
            conn.execute(sa.text(f"DROP OWNED BY {role}"))
            conn.execute(sa.text(f"DROP ROLE {role}"))
        admin.dispose()


def test_an_unreachable_store_is_a_clear_error_without_its_password(mloc_home: Path, tmp_path: Path,
                                                                    monkeypatch) -> None:
    monkeypatch.setenv("MLOC_DATABASE_URL", "postgresql+psycopg2://mloc:hunter2@127.0.0.1:1/mloc")
    result = CliRunner().invoke(app, ["export", "--out", str(tmp_path / "exports")])
    assert result.exit_code == 2, result.output
    assert "cannot open the state store postgresql+psycopg2://mloc:***@127.0.0.1:1/mloc" in result.output
    assert "hunter2" not in result.output and not (tmp_path / "exports").exists()
