"""A small but complete world for the browser tests, built in-process on a fresh DAGSTER_HOME, and
`dagster dev` serving it.

World: the suite's ``base_home`` (dataset versions for en-us and en-gb-scotland from the espeak
batch, an untrained tiny base model), two adapter_checkpoint jobs of one training run (a few steps each), one candidate
through merged_candidate → gate_report → production_adapter with a lenient gate, and a pool_report.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

from mloc_dagster.execution.daemon import default_signals

REPO = Path(__file__).resolve().parents[2]
DIALECT = "en-gb-scotland"
# Lenient on purpose: the world shows a passed gate whatever a few steps of training did.
LENIENT_GATE = {"thresholds": {DIALECT: {"max_cer": 10.0, "max_wer": 10.0, "min_p_better": 0.0,
                                         "max_base_regression_rel": 10.0}}, "bootstrap_samples": 200}


def build_world() -> dict[str, str]:
    """Materialize the world's runs on the home in MLOC_HOME/DAGSTER_HOME, a copy of the suite's
    ``base_home`` (both dialects ingested, the tiny base registered)."""
    import dagster as dg

    from mloc_dagster.core.state import StateStore
    from mloc_dagster.core.state.engine import resolve_state_url
    from mloc_dagster.definitions import defs
    from mloc_dagster.runs.service import StartRequest, pause_run, start_run

    with dg.DagsterInstance.get() as instance:
        store = StateStore(resolve_state_url())
        run = start_run(instance, store, StartRequest(DIALECT, jobs=2, candidate_every=2, timebox_s=300))
        for job_index in range(2):
            config = {"run_id": run.run_id, "job_index": job_index, "timebox_s": 300, "max_steps": 3,
                      "batch_size": 8, "warmup_steps": 1}
            result = defs.resolve_job_def("train_adapter_job").execute_in_process(
                partition_key=DIALECT, instance=instance, tags={"mloc/run_id": run.run_id,
                                                               "mloc/job_index": str(job_index)},
                run_config={"ops": {"adapter_checkpoint": {"config": config}}})
            assert result.success
        result = defs.resolve_job_def("candidate_job").execute_in_process(
            partition_key=DIALECT, instance=instance, raise_on_error=False,
            run_config={"ops": {"gate_report": {"config": LENIENT_GATE}}})
        assert result.success, [e.message for e in result.all_events if e.is_failure]
        # Paused: the chain sensor of `dagster dev` launches nothing more for it.
        pause_run(store, run.run_id)
        assert defs.resolve_job_def("pool_report_job").execute_in_process(instance=instance).success
        store.close()
    return {"run_id": run.run_id}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(proc: subprocess.Popen, timeout_s: float = 15.0) -> None:
    """SIGTERM the process group, then SIGKILL whatever of it (children included) is left."""
    if proc.poll() is None:
        try:
            family = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
        except psutil.NoSuchProcess:
            family = [proc.pid]
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
        for pid in family:  # children that left the group, or ignored SIGTERM
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)


@contextmanager
def dagster_dev(home: Path, log_path: Path, timeout_s: float = 180.0) -> Iterator[str]:
    """`dagster dev` on the world (its own process group), yielding the UI's base URL."""
    port = free_port()
    env = os.environ | {"MLOC_HOME": str(home), "DAGSTER_HOME": str(home / "dagster")}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "dagster"), "dev", "-w", str(REPO / "workspace.yaml"),
             "-h", "127.0.0.1", "-p", str(port)],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=default_signals)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                # The code location must be loaded too, not just the webserver up.
                body = urllib.request.urlopen(f"{url}/server_info", timeout=5).read()
                if body:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dagster dev did not come up; log tail:\n{log_path.read_text()[-4000:]}")
            time.sleep(1)
        yield url
    finally:
        stop_group(proc)
