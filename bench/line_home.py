"""A temporary line for the daemon-driven benches: espeak dialects ingested, a tiny base model
registered, and the real `dagster-daemon run` on the embedded default (warm-fork launcher)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@contextmanager
def line_home(utterances: dict[str, int], env: dict[str, str] | None = None) -> Iterator[tuple]:
    """Yields ``(home, instance, store)`` with the daemon running; removes everything after."""
    import dagster as dg

    from mloc_dagster.core.data.corpus import synth_dialect
    from mloc_dagster.core.models.ctc import new_tiny_model
    from mloc_dagster.core.models.families import save_base_model
    from mloc_dagster.core.state import StateStore
    from mloc_dagster.core.state.engine import resolve_state_url
    from mloc_dagster.definitions import defs
    from mloc_dagster.execution.daemon import DaemonProcess

    home = Path(tempfile.mkdtemp(prefix="mloc-bench-line-"))
    (home / "dagster").mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster" / "dagster.yaml")
    os.environ.update(MLOC_HOME=str(home), DAGSTER_HOME=str(home / "dagster"))
    daemon = None
    try:
        with dg.DagsterInstance.get() as instance:
            for dialect, n in utterances.items():
                synth_dialect(dialect, n, home / "incoming", seed=0)
                instance.add_dynamic_partitions("dialect", [dialect])
                defs.resolve_job_def("ingest_job").execute_in_process(partition_key=dialect, instance=instance)
            base = save_base_model(new_tiny_model(), home / "tiny")
            defs.resolve_job_def("base_model_job").execute_in_process(
                instance=instance, run_config={"ops": {"base_model": {"config": {"checkpoint_dir": str(base)}}}})
            instance.all_instigator_state()  # create every storage before the daemon starts
            daemon = DaemonProcess(home / "daemon.log", env).start()
            yield home, instance, StateStore(resolve_state_url())
    finally:
        if daemon is not None:
            daemon.stop()
        shutil.rmtree(home, ignore_errors=True)
