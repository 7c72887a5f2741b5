"""The run launcher of a one-machine deployment: run workers forked from a warm process.

Dagster's ``DefaultRunLauncher`` asks the code server to *spawn* each run worker: a fresh Python
that imports torch, transformers, peft and dagster again before the first step (7 of the 8 s a
chained job waited to start on 2 cores, ``bench/chain.py``). ``WarmForkRunLauncher`` keeps one
``multiprocessing`` forkserver that has imported those libraries once, and forks every run worker
from it. The worker then runs exactly what ``dagster api execute_run`` runs (the entry point the
Docker and Kubernetes launchers start in their containers): our own code (half a second) is
imported fresh in each worker, so a code change reaches the next run as before; only third-party
libraries are shared, and a fork shares them copy-on-write.

Everything else stays Dagster's: the queue, retries, run monitoring. ``terminate`` sends the worker
SIGINT, which Dagster turns into a clean interrupt of the step (as the code server's cancel does);
the worker's pid and start time are kept as a run tag, so any process (``mloc run cancel``, the
UI) can find it, and a recycled pid is never signalled.
"""

from __future__ import annotations

import multiprocessing
import signal

import psutil
from dagster import Array, Field
from dagster._core.launcher import LaunchRunContext, RunLauncher
from dagster._serdes import ConfigurableClass, ConfigurableClassData

WORKER_TAG = "mloc/run_worker"  # "<pid>:<process start time>"
PRELOAD = ["dagster._cli.api", "torch", "transformers.modeling_utils", "peft", "safetensors.torch", "pyarrow",
           "soundfile", "jiwer", "sqlalchemy", "psutil"]


def _run_worker(run_id: str, instance_ref) -> None:
    """The forked run worker: ``dagster api execute_run`` for one run (events go to the instance)."""
    from dagster import DagsterInstance
    from dagster._cli.api import _execute_run_command_body
    from dagster._utils.interrupts import capture_interrupts

    with capture_interrupts(), DagsterInstance.from_ref(instance_ref) as instance:
        code = _execute_run_command_body(run_id, instance, lambda _event: None, set_exit_code_on_failure=True)
    raise SystemExit(code)


def _worker_id(pid: int) -> str:
    return f"{pid}:{psutil.Process(pid).create_time():.3f}"


def _worker_process(tag: str | None) -> psutil.Process | None:
    """The run's worker if it is still the process the tag names (not a recycled pid)."""
    try:
        pid, started = (tag or "").split(":")
        proc = psutil.Process(int(pid))
        return proc if f"{proc.create_time():.3f}" == started and proc.status() != psutil.STATUS_ZOMBIE else None
    except (ValueError, psutil.Error):
        return None


class WarmForkRunLauncher(RunLauncher, ConfigurableClass):
    """Launches each run as a fork of a warm process (``preload``: the modules it has imported)."""

    def __init__(self, preload: list[str] | None = None, inst_data: ConfigurableClassData | None = None):
        self._inst_data = inst_data
        self._preload = list(preload or PRELOAD)
        self._mp = None
        self._workers: dict[str, multiprocessing.process.BaseProcess] = {}
        super().__init__()

    @property
    def inst_data(self) -> ConfigurableClassData | None:
        return self._inst_data

    @classmethod
    def config_type(cls) -> dict:
        return {"preload": Field(Array(str), is_required=False,
                                 description="Modules the warm process imports once (default: the heavy libraries).")}

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData, config_value: dict) -> WarmForkRunLauncher:
        return cls(inst_data=inst_data, **config_value)

    def _context(self):
        if self._mp is None:
            self._mp = multiprocessing.get_context("forkserver")
            self._mp.set_forkserver_preload(self._preload)
        return self._mp

    def launch_run(self, context: LaunchRunContext) -> None:
        run = context.dagster_run
        for run_id, proc in list(self._workers.items()):  # forget workers that ended
            if not proc.is_alive():
                proc.close()
                del self._workers[run_id]
        proc = self._context().Process(target=_run_worker, args=(run.run_id, self._instance.get_ref()),
                                       name=f"dagster-run-{run.run_id[:8]}")
        proc.start()
        # Not a child to wait for at exit: a daemon that stops leaves its runs running, as the
        # code server's workers do (multiprocessing would otherwise join them in atexit).
        multiprocessing.process._children.discard(proc)
        self._workers[run.run_id] = proc
        self._instance.add_run_tags(run.run_id, {WORKER_TAG: _worker_id(proc.pid)})

    def terminate(self, run_id: str) -> bool:
        run = self._instance.get_run_by_id(run_id)
        if not run or run.is_finished:
            return False
        self._instance.report_run_canceling(run)
        worker = _worker_process(run.tags.get(WORKER_TAG))
        if worker is None:
            self._instance.report_engine_event("No live run worker to send the termination to.", run,
                                               cls=self.__class__)
            return False
        worker.send_signal(signal.SIGINT)
        return True

    def dispose(self) -> None:
        for proc in self._workers.values():
            if not proc.is_alive():
                proc.close()
        self._workers.clear()

