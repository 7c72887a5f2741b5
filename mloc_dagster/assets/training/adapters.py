"""adapter_checkpoint: one timeboxed LoRA training job of one training run, resumed exactly."""


import dagster as dg

from mloc_dagster.assets.datasets.versions import dataset_version
from mloc_dagster.assets.lineage import latest_metadata, require_metadata
from mloc_dagster.assets.models.base_model import base_model
from mloc_dagster.assets.training.hparams import AdapterJobConfig, core_hparams
from mloc_dagster.assets.training.step import TrainingStep
from mloc_dagster.core.pool.rounds import first_round_alone
from mloc_dagster.core.state.runs import TrainingRun
from mloc_dagster.execution.k8s import K8S_CONFIG_TAG, gpu_k8s_config
from mloc_dagster.partitions import dialect_partitions
from mloc_dagster.resources.artifacts import ArtifactStore
from mloc_dagster.resources.gpu import GpuArbiter
from mloc_dagster.resources.state import StateStoreResource


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
    from mloc_dagster.core.training.asr import train_adapter
    from mloc_dagster.core.training.spec import AdapterHParams, AdapterJobSpec

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
    hp = config
    rehearsal = run_rehearsal(context.instance, run) if config.rehearsal_fraction > 0 else None
    if config.slice_index >= 0 and not first_round_alone(run, config.job_index):
        hp = config.model_copy(update={"warmup_steps": 0})

    def train(lease, started_at: float):
        return train_adapter(AdapterJobSpec(
            base_model_dir=run.base_model_version, dataset_version_path=run.dataset_version,
            hparams=core_hparams(hp, AdapterHParams), rehearsal_dataset_path=rehearsal,
            feature_cache_dir=artifacts.paths.home / "features", **step.job_fields(config, lease, started_at)))

    return step.materialize(gpu, config.timebox_s, train,
                            lambda result: {"learning_curve": dg.MetadataValue.json(result.learning_curve)})

TRAIN_JOB = "train_adapter_job"
train_adapter_job = dg.define_asset_job(
    TRAIN_JOB, selection=[adapter_checkpoint], partitions_def=dialect_partitions,
    # On Kubernetes (K8sRunLauncher) the run pod asks for one GPU; ignored by other launchers.
    tags={K8S_CONFIG_TAG: gpu_k8s_config()},
    description="One timeboxed LoRA job of a training run (config: run_id, job_index, timebox_s, hparams).",
)

defs = dg.Definitions(assets=[adapter_checkpoint], jobs=[train_adapter_job])
