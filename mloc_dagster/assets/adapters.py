"""adapter_checkpoint: one timeboxed LoRA training job of one training run, resumed exactly."""


import os
import socket

import dagster as dg

from mloc_dagster.assets.datasets import dataset_version
from mloc_dagster.assets.lineage import require_metadata
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
    lora_r: int = 8
    lora_alpha: float = 16.0
    target_modules: list[str] = []  # empty: the base model's default LoRA targets
    lr: float = 2e-3
    batch_size: int = 16
    seed: int = 0


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
    from mloc_dagster.core.training import AdapterJobSpec, train_adapter

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
    store.record_job_started(run.run_id, config.job_index, dagster_run_id=context.run_id, node_id=node_id(),
                             worker_pid=os.getpid(), worker_host=socket.gethostname())

    def progress(p: dict) -> None:
        context.log.info("step {step} samples {samples} loss {loss:.4f} {samples_per_s:.1f} samples/s "
                         "ETA to timebox {eta_s:.0f} s".format(**p))

    def heartbeat(p: dict | None = None) -> bool:
        return store.heartbeat(run.run_id, config.job_index, p)

    with gpu.lease("TRAIN", context) as lease:
        if not lease.runnable:
            raise dg.Failure(f"no device for training: {lease.outcome}", metadata=lease.metadata())
        try:
            result = train_adapter(AdapterJobSpec(
                base_model_dir=run.base_model_version, dataset_path=run.dataset_version, out_dir=out,
                resume_from=previous.checkpoint_path if previous else None,
                timebox_s=config.timebox_s, checkpoint_every_s=config.checkpoint_every_s,
                lora_r=config.lora_r, lora_alpha=config.lora_alpha, target_modules=config.target_modules or None,
                lr=config.lr, batch_size=config.batch_size, seed=config.seed, node_id=node_id(),
                device=lease.torch_device, feature_cache=artifacts.paths.home / "features",
                progress=progress, heartbeat=heartbeat,
            ))
        except Exception as exc:
            store.record_job_finished(run.run_id, config.job_index, "failed", error=str(exc)[:500])
            raise
    metrics = {k: v for k, v in result.metrics().items() if isinstance(v, int | float)}
    store.record_job_finished(run.run_id, config.job_index, "succeeded", checkpoint_path=str(result.path),
                              sha256=result.sha256, metrics=metrics)
    return dg.MaterializeResult(
        data_version=dg.DataVersion(result.sha256),
        metadata={**metrics, "node_id": node_id(), "run_id": run.run_id, "job_index": config.job_index,
                  "sha256": result.sha256, "path": dg.MetadataValue.path(str(result.path)), **lease.metadata()},
    )


defs = dg.Definitions(assets=[adapter_checkpoint])
