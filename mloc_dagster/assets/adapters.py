"""adapter_checkpoint: one timeboxed LoRA training job of one training run, resumed exactly."""


import math
import os
import shutil
import socket
import time
from collections.abc import Mapping
from typing import Any

import dagster as dg
import pydantic

from mloc_dagster.assets.datasets import dataset_version
from mloc_dagster.assets.lineage import latest_metadata, require_metadata
from mloc_dagster.assets.models import base_model
from mloc_dagster.assets.training_units import ChainJob, NotToStart, SliceJob
from mloc_dagster.core.calibration import local_device, local_node_id
from mloc_dagster.core.state import ACTIVE, TrainingRun, retry_transient
from mloc_dagster.partitions import dialect_partitions
from mloc_dagster.resources.artifacts import ArtifactStore
from mloc_dagster.resources.gpu import GpuArbiter
from mloc_dagster.resources.state import StateStoreResource

# dagster/max_runtime = (wait for the device) + timebox + this margin: only a backstop.
TIMEBOX_MARGIN_S = int(os.environ.get("MLOC_TIMEBOX_MARGIN_S", "120"))


class AdapterJobConfig(dg.Config):
    run_id: str
    job_index: int = 0  # the chain's job; of a distributed run: the round
    slice_index: int = -1  # >= 0: this is slice N of round job_index of a distributed run
    timebox_s: int = 3600
    checkpoint_every_s: float = 300.0
    max_steps: int = 0  # 0: train until the timebox; >0: a fixed-size job (tests, benchmarks)
    # LoRA and optimizer hyper-parameters (defaults: core.training.AdapterHParams)
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.1
    target_modules: list[str] = []  # empty: the base model's default LoRA targets
    lr: float = 3e-3
    batch_size: int = 16
    warmup_steps: int = 20
    seed: int = 0
    # Share of each epoch drawn from the base dialect's dataset, against forgetting it (0: off),
    # and the weight of distillation to the frozen base on those rows (0: off).
    rehearsal_fraction: float = 0.75
    distill_weight: float = 3.0


# What a training run may set per job: every field above but the ones the chain sets itself.
# The one rule for hparams, used by `mloc run start`, the launchpad and the chain alike.
HPARAM_KEYS = tuple(sorted(set(AdapterJobConfig.model_fields) - {"run_id", "job_index", "slice_index", "timebox_s"}))


class InvalidHParams(ValueError):
    pass


def validate_hparams(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """The hparams as the training job will receive them (ints stay ints, lists lists); an unknown
    or ill-typed key is an ``InvalidHParams`` naming it and what is allowed."""
    unknown = sorted(set(hparams) - set(HPARAM_KEYS))
    if unknown:
        raise InvalidHParams(f"unknown hparam(s) {', '.join(unknown)}; allowed: {', '.join(HPARAM_KEYS)}")
    try:
        checked = AdapterJobConfig.model_validate({"run_id": "-", **hparams})
    except pydantic.ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']} (got {e['input']!r})" for e in exc.errors())
        raise InvalidHParams(f"ill-typed hparam(s): {problems}") from exc
    return {k: getattr(checked, k) for k in hparams}


def pin_hparams(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """Every hparam a job takes, the run's own values over today's defaults: a run stores this,
    so a release that changes a default never changes a run in flight (its resume checks them)."""
    defaults = {k: AdapterJobConfig.model_fields[k].get_default(call_default_factory=True) for k in HPARAM_KEYS}
    return {**defaults, **validate_hparams(hparams)}


def rehearsal_dataset(instance: dg.DagsterInstance, dialect: str) -> str | None:
    """The base dialect's latest dataset version, mixed into adaptation so it is not forgotten
    (pinned on a training run when it starts: ``run_rehearsal``)."""
    base = latest_metadata(instance, "base_model")
    if base is None or base.get("base_dialect") in (None, dialect):
        return None
    dataset = latest_metadata(instance, "dataset_version", base["base_dialect"])
    return dataset["path"] if dataset else None


def run_rehearsal(instance: dg.DagsterInstance, run: TrainingRun) -> str | None:
    """The rehearsal dataset the run pinned at start; a run from before pinning takes the latest."""
    if run.rehearsal_dataset is None:
        return rehearsal_dataset(instance, run.dialect)
    return run.rehearsal_dataset or None


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


@dg.asset(
    partitions_def=dialect_partitions, deps=[dataset_version, base_model], group_name="training",
    kinds={"pytorch", "safetensors"}, pool="gpu",
    description="One timeboxed LoRA job of a training run: resumes exactly from the run's previous "
                "checkpoint, stops itself before its timebox, checkpoints every few minutes.",
)
def adapter_checkpoint(context: dg.AssetExecutionContext, config: AdapterJobConfig, artifacts: ArtifactStore,
                       state: StateStoreResource, gpu: GpuArbiter) -> dg.MaterializeResult:
    from mloc_dagster.core.training import AdapterHParams, AdapterJobSpec, Progress, train_adapter

    dialect = context.partition_key
    store = state.store()
    run = store.get_run(config.run_id)
    if run is None:  # launched by hand (launchpad, CLI): an ad-hoc run of one job
        dataset = require_metadata(context.instance, "dataset_version", dialect)
        base = require_metadata(context.instance, "base_model")
        run = store.create_run(run_id=config.run_id, dialect=dialect, dataset_version=dataset["path"],
                               base_model_version=base["path"], timebox_s=config.timebox_s,
                               max_jobs=config.job_index + 1, candidate_every=min(12, config.job_index + 1))
    if run.dialect != dialect:
        raise dg.Failure(f"training run {run.run_id} is for {run.dialect}, not partition {dialect}")
    adapters = artifacts.paths.adapters / dialect
    try:
        unit = (SliceJob(store, run, config.job_index, config.slice_index, adapters) if config.slice_index >= 0
                else ChainJob(store, run, config.job_index, node_id(), adapters))
        if run.status != ACTIVE:
            unit.refuse(f"refused to start: training run {run.status}")
            raise refuse(context, f"training run {run.run_id} is {run.status} ({run.status_reason or 'no reason given'}): "
                                  f"{unit.label} does not start. "
                                  + ("`mloc run resume` requests it again." if run.status == "paused" else ""),
                         **{"mloc/refused": run.status})
        rehearsal = run_rehearsal(context.instance, run) if config.rehearsal_fraction > 0 else None
        unit.start(context.run_id, os.getpid(), socket.gethostname())
    except NotToStart as exc:
        raise refuse(context, str(exc), **{"mloc/refused": "not-to-start"}) from exc
    node, out, hp = unit.node_id, unit.out, config
    if config.slice_index >= 0:  # a slice is a few steps: a warm-up would take all of them
        hp = config.model_copy(update={"warmup_steps": 0})

    last, stopped_by, node_beat = {}, {}, [time.monotonic()]

    def progress(p: Progress) -> None:
        last.update(step=p.step, samples=p.samples, loss=p.loss, samples_per_s=p.samples_per_s, eta_s=p.eta_s)
        context.log.info(f"{p.event}: step {p.step} samples {p.samples} loss {p.loss:.4f} "
                         f"{p.samples_per_s:.1f} samples/s, ETA to timebox {p.eta_s:.0f} s")

    def heartbeat() -> bool | None:
        # Only a lost device lease or a deliberate stop (cancel, dead-worker verdict) stops the
        # loop; a database that cannot be reached is retried, and training goes on if it stays away.
        if lease.lost:
            stopped_by["reason"] = "lease_lost"
            return False
        try:
            alive = retry_transient(lambda: unit.beat(dict(last)), log=context.log.warning)
            if time.monotonic() - node_beat[0] > 30:  # the node registry's "last seen"
                node_beat[0] = time.monotonic()
                store.heartbeat_node(node)
        except Exception as exc:  # the database stayed away: keep training, the next beat retries
            context.log.error(f"heartbeat not recorded ({type(exc).__name__}); training goes on")
            return None
        if not alive:
            stopped_by["reason"] = "stopped"
        return alive

    # The wait for a device is bounded by the arbiter (TRAIN's max_wait_s), not by the backstop.
    set_backstop(context, gpu.arbiter.policy_for("TRAIN").max_wait_s + config.timebox_s)
    with gpu.lease("TRAIN", context) as lease:
        if not lease.runnable:
            raise dg.Failure(f"no device for training: {lease.outcome}", metadata=lease.metadata())
        store.heartbeat_node(node, host=socket.gethostname(), device=local_device(lease.torch_device))
        started_at = start_timebox(context, config.timebox_s)
        try:
            result = train_adapter(AdapterJobSpec(
                base_model_dir=run.base_model_version, dataset_version_path=run.dataset_version, out_dir=out,
                resume_from=unit.resume_from, init_adapter=unit.init_adapter,
                segments=unit.segments, throttle=unit.throttle, on_train_start=unit.training_started,
                timebox_s=config.timebox_s, checkpoint_every_s=config.checkpoint_every_s,
                hparams=AdapterHParams(r=hp.r, alpha=hp.alpha, dropout=hp.dropout,
                                       target_modules=hp.target_modules or None, lr=hp.lr,
                                       batch_size=hp.batch_size, warmup_steps=hp.warmup_steps,
                                       seed=hp.seed, rehearsal_fraction=hp.rehearsal_fraction,
                                       distill_weight=hp.distill_weight),
                rehearsal_dataset_path=rehearsal,
                max_steps=config.max_steps or None, node_id=node, device=lease.torch_device,
                run_id=run.run_id, job_index=config.job_index,
                feature_cache_dir=artifacts.paths.home / "features", started_at=started_at,
                progress=progress, heartbeat=heartbeat, log=context.log.info,
            ))
        except OSError as exc:  # full disk, unwritable artifact dir: say so, and what is still safe
            unit.failed(str(exc))
            kept = unit.resume_from or "none (first job)"
            raise dg.Failure(
                description=f"cannot write the checkpoint of job {config.job_index} under {out.parent}: {exc}. "
                            f"The previous checkpoint is intact: {kept}. Free space or fix the directory, then "
                            "re-execute this run (or let run retries do it).",
                metadata={"out_dir": dg.MetadataValue.path(str(out)), "previous_checkpoint": kept},
            ) from exc
        except Exception as exc:
            unit.failed(str(exc))
            raise
    metrics = {k: v for k, v in result.to_json().items()
               if isinstance(v, int | float) and not isinstance(v, bool) and v is not None}
    if stopped_by.get("reason") == "stopped":
        unit.failed("stopped: cancelled, dropped from its round or declared dead")
        raise dg.Failure(f"training {run.run_id} {unit.label} was stopped (cancelled, dropped, or declared dead); "
                         f"its progress is saved in {result.path}")
    if result.steps == 0 and result.resumed_kind != "reused":
        shutil.rmtree(result.path, ignore_errors=True)  # identical to where it started: let a retry train
        reason = (f"no training time: {result.overhead_seconds:.0f} s of the {config.timebox_s} s timebox went to "
                  "start-up before the first step; raise timebox_s or use a faster node")
        unit.failed(reason)
        raise dg.Failure(f"training {run.run_id} {unit.label} trained 0 steps: {reason}")
    stop_reason = "lease_lost" if stopped_by.get("reason") == "lease_lost" else result.stop_reason
    if stop_reason == "lease_lost":
        context.log.warning(f"the device lease was lost: training stopped at step {result.total_steps}, saved")
    status = unit.succeeded(str(result.path), result.sha256, metrics, result.base_model_hash)
    if status != "succeeded":
        context.log.warning(f"{unit.label} of {run.run_id} finished as {status}: kept, never merged")
    record = store.record_job_throughput(node, result.base_model_hash, result.samples_per_s,
                                         host=socket.gethostname(), device=local_device(result.device)) \
        if result.steps > 0 and result.samples_per_s > 0 else store.get_node(node)
    return dg.MaterializeResult(
        data_version=dg.DataVersion(result.sha256),
        metadata={**metrics, "node_id": node, "run_id": run.run_id, **unit.tags(),
                  "stop_reason": stop_reason, "resumed_kind": result.resumed_kind,
                  "resumed_from": result.resumed_from or "", "device": result.device,
                  "base_model": result.base_model_hash, "job_status": status,
                  "node_samples_per_s": record.samples_per_s(result.base_model_hash) or 0.0,
                  "node_reputation": record.reputation,
                  "learning_curve": dg.MetadataValue.json(result.learning_curve),
                  "sha256": result.sha256, "path": dg.MetadataValue.path(str(result.path)), **lease.metadata()},
    )


defs = dg.Definitions(assets=[adapter_checkpoint])
