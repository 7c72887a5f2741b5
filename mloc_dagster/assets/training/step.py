"""What every training job does around its training, whatever it trains (ASR or TTS adapters).

``TrainingStep`` is one run of a training job seen from Dagster: it refuses to start when its
training run is not active (and tells Dagster not to retry), moves the ``dagster/max_runtime``
backstop, beats the run's and the node's heartbeats, and judges and records the result (a
stopped job, a job that trained no step, the node's measured throughput).

Heartbeats cover the whole job, not only its steps: from the call to ``train`` a keep-alive
thread beats every ``KEEPALIVE_EVERY_S`` while the job waits for its device, loads the model,
extracts features, evaluates and saves, so a slow start or a long evaluation never looks like a
dead node (the training loop's own heartbeat still decides whether to stop). ``adapter_checkpoint``
(ASR) and ``tts_adapter_checkpoint`` (TTS) call it around their own training function, and take
the job's spec fields from it (``job_fields``), so the rules live once.
"""

import math
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import dagster as dg

from mloc_dagster.assets.training.units import ChainJob, NotToStart, SliceJob
from mloc_dagster.core.adapters.format import InvalidAdapter, read_node_result
from mloc_dagster.core.pool.calibration import local_device, local_node_id
from mloc_dagster.core.pool.ray_cluster import local_address
from mloc_dagster.core.state import StateStore
from mloc_dagster.core.state.engine import retry_transient
from mloc_dagster.core.state.runs import TrainingRun
from mloc_dagster.core.state.schema import ACTIVE, FAILED
from mloc_dagster.execution.node_worker import FORKED_ENV

# dagster/max_runtime = (wait for the device) + timebox + this margin: only a backstop.
TIMEBOX_MARGIN_S = int(os.environ.get("MLOC_TIMEBOX_MARGIN_S", "120"))
NODE_BEAT_EVERY_S = 30.0  # the node registry's "last seen"
KEEPALIVE_EVERY_S = 10.0  # well under the silent-slice (60 s) and dead-job (90 s) limits
# `mloc run replay` tags the re-execution of the job a run failed on, then re-activates the run; a
# warm run worker can start before that write lands, so such a run waits for it (at most this long).
REPLAY_TAG = "mloc/replay_of"
REPLAY_WAIT_S = 30.0
MEMORY_MARGIN = 1.15  # over a previous job's measured CUDA peak (allocator fragmentation, longer batches)


def node_id() -> str:
    return local_node_id()  # MLOC_NODE_ID, else the host name, as a registry key


def refuse(context: dg.AssetExecutionContext, message: str, **tags: str) -> dg.Failure:
    """A failure that Dagster must not retry (the training run is not active: retrying cannot help)."""
    context.instance.add_run_tags(context.run_id, {"dagster/retry_on_asset_or_op_failure": "false", **tags})
    return dg.Failure(message, allow_retries=False)


def set_backstop(context: dg.AssetExecutionContext, seconds_from_now: float) -> float:
    """Point the run's ``dagster/max_runtime`` (counted by run monitoring from the run's start)
    at ``seconds_from_now`` + the margin; returns how long the run has been running."""
    now = time.time()
    record = context.instance.get_run_record_by_id(context.run_id)
    elapsed = max(0.0, now - (record.start_time if record is not None and record.start_time else now))
    max_runtime = math.ceil(elapsed + seconds_from_now) + TIMEBOX_MARGIN_S
    context.instance.add_run_tags(context.run_id, {"dagster/max_runtime": str(max_runtime)})
    return elapsed


def start_timebox(context: dg.AssetExecutionContext, timebox_s: int) -> float:
    """The timebox starts now (the device is ours): the backstop counts the same interval, the
    wait for the device before this moment added to it."""
    elapsed = set_backstop(context, timebox_s)
    context.log.info(f"timebox of {timebox_s} s starts {elapsed:.0f} s after the run started; "
                     f"dagster/max_runtime backstop moved to {math.ceil(elapsed) + timebox_s + TIMEBOX_MARGIN_S} s")
    return time.time()


def await_reactivation(store: StateStore, run: TrainingRun) -> TrainingRun:
    """The run as soon as the replay that started this job has re-activated it (or as it is after
    ``REPLAY_WAIT_S``: still failed, the job then refuses as usual)."""
    deadline = time.monotonic() + REPLAY_WAIT_S
    while run.status == FAILED and time.monotonic() < deadline:
        time.sleep(0.5)
        run = store.get_run(run.run_id)
    return run


def memory_need(previous: str | None) -> dict[str, int]:
    """What the job asks the arbiter's memory check for: the CUDA peak the run's previous job measured
    (its ``result.json``: same base model, family and hparams) plus ``MEMORY_MARGIN``; without one (a
    run's first job, a slice, a job after a CPU job) the TRAIN policy's own ``min_free_mb``."""
    if not previous:
        return {}
    try:
        peak = read_node_result(previous, required=False).get("peak_cuda_mb")
    except InvalidAdapter:
        return {}
    ok = isinstance(peak, int | float) and not isinstance(peak, bool) and math.isfinite(peak) and peak > 0
    return {"min_free_mb": math.ceil(peak * MEMORY_MARGIN)} if ok else {}


class TrainingStep:
    """One training job of a training run, from its refusal rules to its recorded result."""

    def __init__(self, context: dg.AssetExecutionContext, store: StateStore, run: TrainingRun,
                 unit: ChainJob | SliceJob) -> None:
        self.context, self.store, self.run, self.unit = context, store, run, unit
        self.node = unit.node_id
        self.last: dict[str, Any] = {}
        self.stopped_by: str | None = None
        self.lease: Any = None
        self._node_beat = time.monotonic()

    @classmethod
    def open(cls, context: dg.AssetExecutionContext, store: StateStore, run: TrainingRun, job_index: int,
             slice_index: int, adapters_dir) -> "TrainingStep":
        """The job's unit (a chain job, or a slice of a round), started; refused (never retried)
        when the training run is not active or the unit must not train."""
        if run.dialect != context.partition_key:
            raise dg.Failure(f"training run {run.run_id} is for {run.dialect}, not partition {context.partition_key}")
        if run.status == FAILED and REPLAY_TAG in context.dagster_run.tags:
            run = await_reactivation(store, run)
        try:
            unit = (SliceJob(store, run, job_index, slice_index, adapters_dir) if slice_index >= 0
                    else ChainJob(store, run, job_index, node_id(), adapters_dir))
            if run.status != ACTIVE:
                unit.refuse(f"refused to start: training run {run.status}")
                raise refuse(context, f"training run {run.run_id} is {run.status} "
                                      f"({run.status_reason or 'no reason given'}): {unit.label} does not start. "
                                      + ("`mloc run resume` requests it again." if run.status == "paused" else ""),
                             **{"mloc/refused": run.status})
            unit.start(context.run_id, os.getpid(), socket.gethostname())
        except NotToStart as exc:
            raise refuse(context, str(exc), **{"mloc/refused": "not-to-start"}) from exc
        return cls(context, store, run, unit)

    def progress(self, p: Any) -> None:
        """A job's ``Progress``: carried by the next heartbeat (step, samples, loss, samples/s, ETA), and logged."""
        self.last.update(step=p.step, samples=p.samples, loss=p.loss, samples_per_s=p.samples_per_s, eta_s=p.eta_s)
        self.context.log.info(f"{p.event}: step {p.step} samples {p.samples} loss {p.loss:.4f} "
                              f"{p.samples_per_s:.1f} samples/s, ETA to timebox {p.eta_s:.0f} s")

    def job_fields(self, config: Any, lease: Any, started_at: float) -> dict[str, Any]:
        """The ``JobSpec`` fields every track's job gets from its unit, config, lease and this step
        (``core/training/spec.py``); a track's asset adds its inputs and hparams."""
        unit = self.unit
        return dict(out_dir=unit.out, resume_from=unit.resume_from, init_adapter=unit.init_adapter,
                    segments=unit.segments, throttle=unit.throttle, on_train_start=unit.training_started,
                    on_train_end=unit.training_ended, timebox_s=config.timebox_s,
                    checkpoint_every_s=config.checkpoint_every_s, max_steps=config.max_steps or None,
                    node_id=self.node, device=lease.torch_device, run_id=self.run.run_id,
                    job_index=config.job_index, started_at=started_at, progress=self.progress,
                    heartbeat=self.heartbeat, log=self.context.log.info)

    def heartbeat(self) -> bool | None:
        """Only a lost device lease or a deliberate stop (cancel, dead-worker verdict, dropped
        slice) stops the loop; a database that cannot be reached is retried, and training goes on."""
        if self.lease is not None and self.lease.lost:
            self.stopped_by = "lease_lost"
            return False
        try:
            alive = retry_transient(lambda: self.unit.beat(dict(self.last)), log=self.context.log.warning)
            if time.monotonic() - self._node_beat > NODE_BEAT_EVERY_S:
                self._node_beat = time.monotonic()
                self.store.heartbeat_node(self.node)
        except Exception as exc:  # the database stayed away: keep training, the next beat retries
            self.context.log.error(f"heartbeat not recorded ({type(exc).__name__}); training goes on")
            return None
        if not alive:
            self.stopped_by = "stopped"
        return alive

    def keep_alive(self, stop: threading.Event) -> None:
        """Beat until ``stop`` is set or the unit is no longer running (then the loop's own
        heartbeat, or the job's end, tells the job what to do)."""
        while not stop.wait(KEEPALIVE_EVERY_S):
            try:
                if not self.unit.beat(dict(self.last)):
                    return
                if time.monotonic() - self._node_beat > NODE_BEAT_EVERY_S:
                    self._node_beat = time.monotonic()
                    self.store.heartbeat_node(self.node)
            except Exception as exc:  # the database is away: the next beat tries again
                self.context.log.warning(f"keep-alive heartbeat not recorded ({type(exc).__name__})")

    def train(self, gpu: Any, timebox_s: int, train: Callable[[Any, float], Any]) -> Any:
        """Wait for a device (bounded by the arbiter's TRAIN ``max_wait_s``, not by the backstop),
        start the timebox once it is ours, and call ``train(lease, timebox start)``; heartbeats
        go on throughout (``keep_alive``)."""
        stop = threading.Event()
        beating = threading.Thread(target=self.keep_alive, args=(stop,), daemon=True, name="mloc-keepalive")
        beating.start()
        try:
            return self._train(gpu, timebox_s, train)
        finally:
            stop.set()
            beating.join(timeout=5)

    def _train(self, gpu: Any, timebox_s: int, train: Callable[[Any, float], Any]) -> Any:
        set_backstop(self.context, gpu.arbiter.policy_for("TRAIN").max_wait_s + timebox_s)
        with gpu.lease("TRAIN", self.context, **memory_need(self.unit.resume_from)) as lease:
            if not lease.runnable:
                raise dg.Failure(f"no device for training: {lease.outcome}", metadata=lease.metadata())
            self.lease = lease
            self.store.heartbeat_node(self.node, host=socket.gethostname(), device=local_device(lease.torch_device))
            started_at = start_timebox(self.context, timebox_s)
            try:
                return train(lease, started_at)
            except OSError as exc:
                raise self._write_failed(exc) from exc
            except Exception as exc:
                self.unit.failed(str(exc))
                raise

    def _write_failed(self, exc: OSError) -> dg.Failure:
        """A full disk or an unwritable artifact directory: say so, and what is still safe."""
        out = self.unit.out
        self.unit.failed(str(exc))
        kept = self.unit.resume_from or "none (first job)"
        return dg.Failure(
            description=f"cannot write the checkpoint of {self.unit.label} under {out.parent}: {exc}. "
                        f"The previous checkpoint is intact: {kept}. Free space or fix the directory, then "
                        "re-execute this run (or let run retries do it).",
            metadata={"out_dir": dg.MetadataValue.path(str(out)), "previous_checkpoint": kept},
        )

    def finish(self, result: Any, timebox_s: int) -> tuple[str, str, Any]:
        """Judge and record a finished training call (``result``: an ASR or TTS job result);
        returns (stop reason, job status, the node's registry record)."""
        label, run_id = self.unit.label, self.run.run_id
        if self.stopped_by == "stopped":
            self.unit.failed("stopped: cancelled, dropped from its round or declared dead")
            raise dg.Failure(f"training {run_id} {label} was stopped (cancelled, dropped, or declared dead); "
                             f"its progress is saved in {result.path}")
        if result.steps == 0 and result.resumed_kind != "reused":
            shutil.rmtree(result.path, ignore_errors=True)  # identical to where it started: let a retry train
            reason = (f"no training time: {result.overhead_seconds:.0f} s of the {timebox_s} s timebox went to "
                      "start-up before the first step; raise timebox_s or use a faster node")
            self.unit.failed(reason)
            raise dg.Failure(f"training {run_id} {label} trained 0 steps: {reason}")
        stop_reason = "lease_lost" if self.stopped_by == "lease_lost" else result.stop_reason
        if stop_reason == "lease_lost":
            self.context.log.warning(f"the device lease was lost: training stopped at step {result.total_steps}, saved")
        status = self.unit.succeeded(str(result.path), result.sha256, self.metrics(result), result.base_model_hash)
        if status != "succeeded":
            self.context.log.warning(f"{label} of {run_id} finished as {status}: kept, never merged")
        record = (self.store.record_job_throughput(self.node, result.base_model_hash, result.samples_per_s,
                                                   host=socket.gethostname(), device=local_device(result.device))
                  if result.steps > 0 and result.samples_per_s > 0 else self.store.get_node(self.node))
        return stop_reason, status, record

    def materialize(self, gpu: Any, timebox_s: int, train: Callable[[Any, float], Any],
            extra: Callable[[Any], dict[str, Any]] = lambda result: {}) -> dg.MaterializeResult:
        """The whole job of a training asset: ``train`` on a leased device, judge and record the
        result, and materialize it (data version: the adapter's hash; the track adds ``extra``)."""
        result = self.train(gpu, timebox_s, train)
        stop_reason, status, record = self.finish(result, timebox_s)
        return dg.MaterializeResult(data_version=dg.DataVersion(result.sha256),
                                    metadata={**self.metadata(result, stop_reason, status, record), **extra(result)})

    @staticmethod
    def metrics(result: Any) -> dict[str, float]:
        """The result's numbers (what the training job records and the asset shows)."""
        return {k: v for k, v in result.to_json().items()
                if isinstance(v, int | float) and not isinstance(v, bool) and v is not None}

    def metadata(self, result: Any, stop_reason: str, status: str, record: Any) -> dict[str, Any]:
        """The materialization's metadata both training assets share."""
        return {**self.metrics(result), "node_id": self.node, "run_id": self.run.run_id, **self.unit.tags(),
                "stop_reason": stop_reason, "resumed_kind": result.resumed_kind,
                "resumed_from": result.resumed_from or "", "device": result.device,
                "base_model": result.base_model_hash, "job_status": status,
                "node_samples_per_s": record.samples_per_s(result.base_model_hash) or 0.0,
                "node_reputation": record.reputation,
                "sha256": result.sha256, "path": dg.MetadataValue.path(str(result.path)),
                **({"peak_cuda_mb": result.peak_cuda_mb} if result.peak_cuda_mb else {}),  # the next job asks for it
                "ran_on": local_node_id(), **({"ran_at": address} if (address := local_address()) else {}),
                **({"warm_worker": warm} if (warm := os.environ.get(FORKED_ENV)) else {}),  # a pool node's fork
                **(self.lease.metadata() if self.lease is not None else {})}
