"""The line's Prometheus metrics: what a scrape shows for a known state, and `mloc metrics serve`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mloc_dagster.core.arbiter.acquire import Arbiter
from mloc_dagster.core.state import StateStore
from mloc_dagster.core.state.engine import resolve_state_url
from mloc_dagster.operations import metrics

MLOC = str(Path(sys.executable).parent / "mloc")


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in an exposition, or None."""
    wanted = {f'{k}="{v}"' for k, v in labels.items()}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            head, _, value = line.rpartition(" ")
            found = set(head[len(name) :].strip("{}").split(",")) if "{" in head else set()
            if wanted <= found:
                return float(value)
    return None


@pytest.fixture()
def line_state(mloc_home: Path) -> StateStore:
    """Two runs of one dialect: a chain with a finished, a failed-then-retried and a running job;
    one candidate that passed its gate and was promoted, one still waiting for its gate."""
    store = StateStore(resolve_state_url())
    run = store.create_run(dialect="en-gb-scotland", dataset_version="dv1", base_model_version="bm1", max_jobs=6)
    store.create_run(dialect="en-gb-scotland", dataset_version="dv1", base_model_version="bm1", kind="distributed",
                     parallelism=2, round_samples=64)
    store.record_job_queued(run.run_id, 0)
    store.record_job_started(run.run_id, 0, dagster_run_id="d0")
    store.record_job_finished(run.run_id, 0, "succeeded", checkpoint_path="/ckpt/0", sha256="a" * 64)
    store.record_job_started(run.run_id, 1, dagster_run_id="d1")
    store.record_job_started(run.run_id, 1, dagster_run_id="d1-retry")  # Dagster's run retry
    store.record_job_finished(run.run_id, 1, "succeeded", checkpoint_path="/ckpt/1", sha256="b" * 64)
    store.record_job_started(run.run_id, 2, dagster_run_id="d2")
    passed = store.record_candidate(dialect="en-gb-scotland", adapter_path="/cand/1", sha256="c" * 64, sources=[],
                                    trusted=True)
    store.set_gate_result(passed.candidate_id, "passed", None)
    store.record_promotion("en-gb-scotland", "stable", passed.candidate_id)
    store.record_candidate(dialect="en-gb-scotland", adapter_path="/cand/2", sha256="d" * 64, sources=[], trusted=False)
    return store


def test_a_scrape_shows_jobs_candidates_gates_and_the_arbiter(line_state: StateStore, mloc_home: Path) -> None:
    with Arbiter(mloc_home / "gpu", simulated_devices=1) as arbiter, arbiter.acquire("TRAIN"):
        pass
    text = metrics.exposition(metrics.registry(line_state, None, mloc_home / "gpu"))

    d = {"dialect": "en-gb-scotland"}
    assert sample(text, "mloc_training_runs", **d, kind="single", status="active") == 1
    assert sample(text, "mloc_training_runs", **d, kind="distributed", status="active") == 1
    assert sample(text, "mloc_training_jobs", **d, kind="single", status="succeeded") == 2
    assert sample(text, "mloc_training_jobs", **d, kind="single", status="running") == 1
    assert sample(text, "mloc_training_jobs", **d, kind="single", status="failed") == 0  # present, at 0
    assert sample(text, "mloc_training_job_attempts", **d, kind="single") == 1
    gap = sample(text, "mloc_training_chain_gap_seconds", **d)
    assert gap is not None and 0 <= gap < 60
    assert sample(text, "mloc_candidates", **d, trusted="true", gate="passed") == 1
    assert sample(text, "mloc_candidates", **d, trusted="false", gate="pending") == 1
    assert sample(text, "mloc_promotions", **d, branch="stable") == 1
    assert sample(text, "gpu_arbiter_acquire_total", status="ACQUIRED", task_type="TRAIN") >= 1
    assert sample(text, "gpu_arbiter_queue_length", task_type="TRAIN") == 0
    assert sample(text, "gpu_arbiter_device_leased", device="0", uuid="SIM-0") == 0


def test_textfile_and_unwritable_target(line_state: StateStore, mloc_home: Path, tmp_path: Path) -> None:
    from mloc_dagster.cli.metrics import metrics_app

    runner = CliRunner()
    out = tmp_path / "textfile" / "mloc.prom"
    result = runner.invoke(metrics_app, ["write", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert sample(out.read_text(), "mloc_promotions", dialect="en-gb-scotland", branch="stable") == 1

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = runner.invoke(metrics_app, ["write", "--out", str(blocker / "mloc.prom")])
    assert result.exit_code == 2
    assert "cannot write" in result.output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_serve_answers_curl_and_stops_on_sigterm(line_state: StateStore, mloc_home: Path, tmp_path: Path) -> None:
    port = _free_port()
    textfile = tmp_path / "mloc.prom"
    proc = subprocess.Popen([MLOC, "metrics", "serve", "--port", str(port), "--textfile", str(textfile)],
                            env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read()
                assert time.monotonic() < deadline, "mloc metrics serve never answered"
                time.sleep(0.3)
        assert sample(body, "mloc_training_jobs", dialect="en-gb-scotland", kind="single", status="running") == 1
        assert sample(body, "mloc_dagster_runs", job="all", status="QUEUED") == 0  # DAGSTER_HOME is set

        # A second exporter on the same port says why it cannot start.
        second = subprocess.run([MLOC, "metrics", "serve", "--port", str(port)], env=dict(os.environ),
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == 2
        assert f"cannot listen on 127.0.0.1:{port}" in second.stderr

        assert textfile.exists()
        proc.terminate()
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
