"""The TTS track's training (issue 11): the base TTS, and one timeboxed LoRA job of a TTS run.

- ``tts_base_model``: the tiny FastSpeech2Conformer TTS (``core/tts/``) pre-trained on the base
  dialect, with character durations from the *base ASR*'s CTC forced alignment; the ASR base it
  was aligned with is pinned in the model directory (``tts.json: aligner_hash``).
- ``tts_adapter_checkpoint``: job *i* of a training run of track ``tts`` (``mloc run start DIALECT
  --track tts``), resumed exactly from job *i-1*, with the same ``TrainingStep`` rules as ASR jobs
  (refusal, heartbeats, backstop, result judging). It trains on the TTS base and aligner the run
  pinned when it started, never "the latest".
"""

import json
from pathlib import Path

import dagster as dg

from mloc_dagster.assets.datasets.versions import dataset_version
from mloc_dagster.assets.lineage import require_metadata
from mloc_dagster.assets.models.base_model import BASE_DIALECT, base_model
from mloc_dagster.assets.training.hparams import TtsAdapterJobConfig, core_hparams
from mloc_dagster.assets.training.step import TrainingStep
from mloc_dagster.core.state.schema import TTS
from mloc_dagster.execution.k8s import K8S_CONFIG_TAG, gpu_k8s_config
from mloc_dagster.partitions import dialect_partitions
from mloc_dagster.resources.artifacts import ArtifactStore
from mloc_dagster.resources.gpu import GpuArbiter
from mloc_dagster.resources.state import StateStoreResource


class TtsBaseModelConfig(dg.Config):
    base_dialect: str = BASE_DIALECT
    train_seconds: float = 480.0
    max_steps: int = 0  # > 0: stop after this many steps, within train_seconds
    train_limit: int = 0  # > 0: pre-train on the first N utterances only (tests, the demo)
    lr: float = 2e-3
    batch_size: int = 16
    warmup_steps: int = 50
    schedule: str = "cosine"  # or "constant"
    dropout: float = -1.0  # < 0: the model's default; 0 lets a test base memorise its few sentences
    seed: int = 0


def dropout_config(rate: float) -> dict | None:
    """Every dropout rate of the tiny TTS set to ``rate`` (None: the model's defaults)."""
    from mloc_dagster.core.tts.model import TINY_CONFIG

    return {k: rate for k in TINY_CONFIG if "dropout" in k} if rate >= 0 else None


def aligner_of(tts_dir: str | Path, models: Path) -> Path:
    """The base ASR whose forced alignment gave this TTS model's durations: the directory it was
    pre-trained with, or the registered base model of that hash; its content must match the pin."""
    from mloc_dagster.core.publish import model_dir_hash

    info = json.loads((Path(tts_dir) / "tts.json").read_text())
    pinned = str(info.get("aligner_hash") or "")
    for aligner in (Path(info.get("aligner_dir") or models / "base" / pinned), models / "base" / pinned):
        if pinned and aligner.is_dir() and model_dir_hash(aligner) == pinned:
            return aligner
    raise dg.Failure(f"{tts_dir}: its aligner ASR {pinned[:12] or '(none recorded)'} is neither at "
                     f"{info.get('aligner_dir')} nor under {models / 'base'}; re-materialize tts_base_model")


@dg.asset(
    deps=[dg.AssetDep(dataset_version, partition_mapping=dg.SpecificPartitionsPartitionMapping([BASE_DIALECT])),
          base_model],
    group_name="tts", kinds={"pytorch"}, pool="gpu",
    description="The base TTS every TTS adapter is trained on: a tiny FastSpeech2Conformer (built from a config, "
                "never downloaded) pre-trained on the base dialect, durations from the base ASR's forced alignment.",
)
def tts_base_model(context: dg.AssetExecutionContext, config: TtsBaseModelConfig, artifacts: ArtifactStore,
                   gpu: GpuArbiter) -> dg.MaterializeResult:
    from mloc_dagster.core.publish import publish_version
    from mloc_dagster.core.tts.pretrain import pretrain_tts_base

    dataset = require_metadata(context.instance, "dataset_version", config.base_dialect)
    aligner = require_metadata(context.instance, "base_model")
    models = artifacts.paths.models / "tts"
    tmp = models / f".pretrain-{context.run_id[:8]}"
    with gpu.lease("TRAIN", context) as lease:
        metrics = pretrain_tts_base(
            dataset["path"], aligner["path"], tmp, config.train_seconds, config.seed, device=lease.torch_device,
            max_steps=config.max_steps or None, train_limit=config.train_limit or None, lr=config.lr,
            batch_size=config.batch_size, warmup_steps=config.warmup_steps, schedule=config.schedule,
            log=context.log.info, model_config=dropout_config(config.dropout))
    version, out = publish_version(tmp, models)
    return dg.MaterializeResult(
        data_version=dg.DataVersion(version),
        metadata={"version": version, "aligner": aligner["version"], "base_dialect": config.base_dialect,
                  "dataset_version": dataset["version"],
                  **{k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)},
                  "path": dg.MetadataValue.path(str(out)), **lease.metadata()},
    )


@dg.asset(
    partitions_def=dialect_partitions, deps=[dataset_version, tts_base_model], group_name="tts",
    kinds={"pytorch", "safetensors"}, pool="gpu",
    description="One timeboxed LoRA job of a TTS training run: resumes exactly from the run's previous "
                "checkpoint, on the TTS base and aligner ASR the run pinned.",
)
def tts_adapter_checkpoint(context: dg.AssetExecutionContext, config: TtsAdapterJobConfig, artifacts: ArtifactStore,
                           state: StateStoreResource, gpu: GpuArbiter) -> dg.MaterializeResult:
    from mloc_dagster.core.tts.hparams import TtsAdapterHParams
    from mloc_dagster.core.tts.training import TtsAdapterJobSpec, train_tts_adapter

    store = state.store()
    run = store.get_run(config.run_id)
    if run is None or run.track != TTS:
        raise dg.Failure(f"{config.run_id} is not a TTS training run: start one with "
                         f"`mloc run start {context.partition_key} --track tts`")
    step = TrainingStep.open(context, store, run, config.job_index, -1,
                             artifacts.paths.adapters / "tts" / context.partition_key)
    aligner = aligner_of(run.base_model_version, artifacts.paths.models)

    def train(lease, started_at: float):
        return train_tts_adapter(TtsAdapterJobSpec(
            base_tts_dir=run.base_model_version, aligner_dir=aligner, dataset_version_path=run.dataset_version,
            hparams=core_hparams(config, TtsAdapterHParams), **step.job_fields(config, lease, started_at)))

    return step.materialize(gpu, config.timebox_s, train, lambda result: {"track": TTS, "aligner": result.aligner_hash})


tts_base_model_job = dg.define_asset_job("tts_base_model_job", selection=[tts_base_model],
                                         description="Pre-train the base TTS on the base dialect.")
TTS_TRAIN_JOB = "tts_train_adapter_job"
tts_train_adapter_job = dg.define_asset_job(
    TTS_TRAIN_JOB, selection=[tts_adapter_checkpoint], partitions_def=dialect_partitions,
    tags={K8S_CONFIG_TAG: gpu_k8s_config()},  # as train_adapter_job: the pod asks for one GPU
    description="One timeboxed LoRA job of a TTS training run (config: run_id, job_index, timebox_s, hparams).")

defs = dg.Definitions(assets=[tts_base_model, tts_adapter_checkpoint], jobs=[tts_base_model_job, tts_train_adapter_job])
