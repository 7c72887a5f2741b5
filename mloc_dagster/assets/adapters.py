"""adapter_checkpoint: one timeboxed LoRA training job of one training run, resumed exactly."""


import os
import socket
import time

import dagster as dg

from mloc_dagster.assets.datasets import dataset_version
from mloc_dagster.assets.lineage import latest_metadata, require_metadata
from mloc_dagster.assets.models import base_model
from mloc_dagster.partitions import dialect_partitions
from mloc_dagster.resources.artifacts import ArtifactStore
from mloc_dagster.resources.gpu import GpuArbiter
from mloc_dagster.resources.state import StateStoreResource

TIMEBOX_MARGIN_S = 120  # dagster/max_runtime = timebox + this: only a backstop


class AdapterJobConfig(dg.Config):
    run_id: str
    job_index: int = 0
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
    # Share of each epoch drawn from the base dialect's dataset, against forgetting it (0: off).
    rehearsal_fraction: float = 0.25


def rehearsal_dataset(instance: dg.DagsterInstance, dialect: str) -> str | None:
    """The base dialect's latest dataset version, mixed into adaptation so it is not forgotten."""
    base = latest_metadata(instance, "base_model")
    if base is None or base.get("base_dialect") in (None, dialect):
        return None
    dataset = latest_metadata(instance, "dataset_version", base["base_dialect"])
    return dataset["path"] if dataset else None


def node_id() -> str:
    return os.environ.get("MLOC_NODE_ID") or socket.gethostname()


@dg.asset(
    partitions_def=dialect_partitions, deps=[dataset_version, base_model], group_name="training",
    kinds={"pytorch", "safetensors"}, pool="gpu",
    description="One timeboxed LoRA job of a training run: resumes exactly from the run's previous "
                "checkpoint, stops itself before its timebox, checkpoints every few minutes.",
)
def adapter_checkpoint(context: dg.AssetExecutionContext, config: AdapterJobConfig, artifacts: ArtifactStore,
                       state: StateStoreResource, gpu: GpuArbiter) -> dg.MaterializeResult:
    from mloc_dagster.core.training import AdapterHParams, AdapterJobSpec, Progress, train_adapter

    started_at = time.time()  # the timebox counts from the start of the step
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
    previous = store.get_job(run.run_id, config.job_index - 1) if config.job_index > 0 else None
    if config.job_index > 0 and (previous is None or previous.checkpoint_path is None):
        raise dg.Failure(f"job {config.job_index} of {run.run_id} needs job {config.job_index - 1}'s checkpoint")

    out = artifacts.paths.adapters / dialect / run.run_id / f"job-{config.job_index:04d}"
    rehearsal = rehearsal_dataset(context.instance, dialect) if config.rehearsal_fraction > 0 else None
    store.record_job_started(run.run_id, config.job_index, dagster_run_id=context.run_id, node_id=node_id(),
                             worker_pid=os.getpid(), worker_host=socket.gethostname())

    last = {}

    def progress(p: Progress) -> None:
        last.update(step=p.step, samples=p.samples, loss=p.loss, samples_per_s=p.samples_per_s, eta_s=p.eta_s)
        context.log.info(f"{p.event}: step {p.step} samples {p.samples} loss {p.loss:.4f} "
                         f"{p.samples_per_s:.1f} samples/s, ETA to timebox {p.eta_s:.0f} s")

    def heartbeat() -> bool:
        # False once the job was cancelled or declared dead: the loop saves and stops.
        return store.heartbeat(run.run_id, config.job_index, dict(last))

    with gpu.lease("TRAIN", context) as lease:
        if not lease.runnable:
            raise dg.Failure(f"no device for training: {lease.outcome}", metadata=lease.metadata())
        try:
            result = train_adapter(AdapterJobSpec(
                base_model_dir=run.base_model_version, dataset_version_path=run.dataset_version, out_dir=out,
                resume_from=previous.checkpoint_path if previous else None,
                timebox_s=config.timebox_s, checkpoint_every_s=config.checkpoint_every_s,
                hparams=AdapterHParams(r=config.r, alpha=config.alpha, dropout=config.dropout,
                                       target_modules=config.target_modules or None, lr=config.lr,
                                       batch_size=config.batch_size, warmup_steps=config.warmup_steps,
                                       seed=config.seed, rehearsal_fraction=config.rehearsal_fraction),
                rehearsal_dataset_path=rehearsal,
                max_steps=config.max_steps or None, node_id=node_id(), device=lease.torch_device,
                run_id=run.run_id, job_index=config.job_index,
                feature_cache_dir=artifacts.paths.home / "features", started_at=started_at,
                progress=progress, heartbeat=heartbeat, log=context.log.info,
            ))
        except OSError as exc:  # full disk, unwritable artifact dir: say so, and what is still safe
            store.record_job_finished(run.run_id, config.job_index, "failed", error=str(exc)[:500])
            kept = previous.checkpoint_path if previous else "none (first job)"
            raise dg.Failure(
                description=f"cannot write the checkpoint of job {config.job_index} under {out.parent}: {exc}. "
                            f"The previous checkpoint is intact: {kept}. Free space or fix the directory, then "
                            "re-execute this run (or let run retries do it).",
                metadata={"out_dir": dg.MetadataValue.path(str(out)), "previous_checkpoint": kept},
            ) from exc
        except Exception as exc:
            store.record_job_finished(run.run_id, config.job_index, "failed", error=str(exc)[:500])
            raise
    metrics = {k: v for k, v in result.to_json().items()
               if isinstance(v, int | float) and not isinstance(v, bool) and v is not None}
    if result.stop_reason == "heartbeat":
        store.record_job_finished(run.run_id, config.job_index, "failed", error="stopped: job cancelled")
        raise dg.Failure(f"training job {run.run_id}/{config.job_index} was cancelled; "
                         f"its progress is saved in {result.path}")
    store.record_job_finished(run.run_id, config.job_index, "succeeded", checkpoint_path=str(result.path),
                              sha256=result.sha256, metrics=metrics)
    return dg.MaterializeResult(
        data_version=dg.DataVersion(result.sha256),
        metadata={**metrics, "node_id": node_id(), "run_id": run.run_id, "job_index": config.job_index,
                  "stop_reason": result.stop_reason, "resumed_kind": result.resumed_kind,
                  "resumed_from": result.resumed_from or "", "device": result.device,
                  "sha256": result.sha256, "path": dg.MetadataValue.path(str(result.path)), **lease.metadata()},
    )


defs = dg.Definitions(assets=[adapter_checkpoint])
