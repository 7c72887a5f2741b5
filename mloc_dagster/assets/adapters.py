"""adapter_checkpoint: one timeboxed LoRA training job of one training run, resumed exactly."""


from collections.abc import Mapping
from typing import Any

import dagster as dg
import pydantic

from mloc_dagster.assets.datasets import dataset_version
from mloc_dagster.assets.lineage import latest_metadata, require_metadata
from mloc_dagster.assets.models import base_model
from mloc_dagster.assets.training_step import TIMEBOX_MARGIN_S, TrainingStep, set_backstop
from mloc_dagster.core.state import TrainingRun
from mloc_dagster.partitions import dialect_partitions
from mloc_dagster.resources.artifacts import ArtifactStore
from mloc_dagster.resources.gpu import GpuArbiter
from mloc_dagster.resources.state import StateStoreResource

__all__ = ["TIMEBOX_MARGIN_S", "AdapterJobConfig", "adapter_checkpoint", "pin_hparams", "validate_hparams"]


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
    step = TrainingStep.open(context, store, run, config.job_index, config.slice_index,
                             artifacts.paths.adapters / dialect)
    unit, hp = step.unit, config
    rehearsal = run_rehearsal(context.instance, run) if config.rehearsal_fraction > 0 else None
    if config.slice_index >= 0:  # a slice is a few steps: a warm-up would take all of them
        hp = config.model_copy(update={"warmup_steps": 0})

    def progress(p: Progress) -> None:
        step.progress(step=p.step, samples=p.samples, loss=p.loss, samples_per_s=p.samples_per_s, eta_s=p.eta_s)
        context.log.info(f"{p.event}: step {p.step} samples {p.samples} loss {p.loss:.4f} "
                         f"{p.samples_per_s:.1f} samples/s, ETA to timebox {p.eta_s:.0f} s")

    # The wait for a device is bounded by the arbiter (TRAIN's max_wait_s), not by the backstop.
    set_backstop(context, gpu.arbiter.policy_for("TRAIN").max_wait_s + config.timebox_s)
    with gpu.lease("TRAIN", context) as lease:
        if not lease.runnable:
            raise dg.Failure(f"no device for training: {lease.outcome}", metadata=lease.metadata())
        started_at = step.device_granted(lease, config.timebox_s)
        try:
            result = train_adapter(AdapterJobSpec(
                base_model_dir=run.base_model_version, dataset_version_path=run.dataset_version, out_dir=unit.out,
                resume_from=unit.resume_from, init_adapter=unit.init_adapter,
                segments=unit.segments, throttle=unit.throttle, on_train_start=unit.training_started,
                timebox_s=config.timebox_s, checkpoint_every_s=config.checkpoint_every_s,
                hparams=AdapterHParams(r=hp.r, alpha=hp.alpha, dropout=hp.dropout,
                                       target_modules=hp.target_modules or None, lr=hp.lr,
                                       batch_size=hp.batch_size, warmup_steps=hp.warmup_steps,
                                       seed=hp.seed, rehearsal_fraction=hp.rehearsal_fraction,
                                       distill_weight=hp.distill_weight),
                rehearsal_dataset_path=rehearsal,
                max_steps=config.max_steps or None, node_id=step.node, device=lease.torch_device,
                run_id=run.run_id, job_index=config.job_index,
                feature_cache_dir=artifacts.paths.home / "features", started_at=started_at,
                progress=progress, heartbeat=step.heartbeat, log=context.log.info,
            ))
        except OSError as exc:
            raise step.write_failed(exc, unit.out, config.timebox_s) from exc
        except Exception as exc:
            unit.failed(str(exc))
            raise
    stop_reason, status, record = step.finish(result, config.timebox_s)
    return dg.MaterializeResult(
        data_version=dg.DataVersion(result.sha256),
        metadata={**step.metadata(result, stop_reason, status, record),
                  "learning_curve": dg.MetadataValue.json(result.learning_curve)},
    )

defs = dg.Definitions(assets=[adapter_checkpoint])
