"""pool_report on a real instance: its markdown, its numbers, and the daily schedule."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from mloc_dagster.assets.operations.reports import pool_report, pool_report_daily, sparkline
from mloc_dagster.core.state import StateStore
from mloc_dagster.core.state.engine import resolve_state_url
from mloc_dagster.resources.artifacts import ArtifactStore
from mloc_dagster.resources.state import StateStoreResource


def test_pool_report_renders_what_happened(mloc_home: Path) -> None:
    store = StateStore(resolve_state_url())
    run = store.create_run(dialect="en-gb-scotland", dataset_version="dv", base_model_version="bm", max_jobs=4)
    for i, cer in enumerate((0.40, 0.31, 0.27)):
        store.record_job_started(run.run_id, i, node_id="node-a" if i < 2 else "node-b")
        store.record_job_finished(run.run_id, i, "succeeded", checkpoint_path=f"/ckpt/{i}", sha256=str(i) * 64,
                                  metrics={"dev_cer": cer})
    store.record_job_started(run.run_id, 3, node_id="node-b")
    store.record_job_finished(run.run_id, 3, "failed", error="CUDA out of memory\nTraceback ...")
    store.close()

    instance = dg.DagsterInstance.get()
    result = dg.materialize([pool_report], instance=instance,
                            resources={"state": StateStoreResource(), "artifacts": ArtifactStore()})
    assert result.success
    meta = result.asset_materializations_for_node("pool_report")[0].metadata
    assert meta["success_rate"].value == 0.75
    assert (meta["jobs_finished"].value, meta["jobs_failed"].value) == (4, 1)
    report = meta["report"].value
    for section in ("## Success rate per job kind", "## Failure reasons", "## GPU-hours per dialect",
                    "## GPU-hours per node", "## Dev CER per dialect over time"):
        assert section in report
    assert "| 1 | `CUDA out of memory` |" in report  # the first line is the reason
    assert "node-a" in report and "node-b" in report
    assert "first 0.400  last 0.270  best 0.270  (3 jobs" in report
    assert Path(meta["path"].value).read_text() == report


def test_empty_pool_and_the_schedule(mloc_home: Path) -> None:
    result = dg.materialize([pool_report], instance=dg.DagsterInstance.get(),
                            resources={"state": StateStoreResource(), "artifacts": ArtifactStore()})
    assert result.success
    report = result.asset_materializations_for_node("pool_report")[0].metadata["report"].value
    assert "No failed job." in report and "(no evaluated job yet)" in report
    assert pool_report_daily.cron_schedule == "0 6 * * *"
    assert sparkline([3.0, 2.0, 1.0]) == "█▅▁"
