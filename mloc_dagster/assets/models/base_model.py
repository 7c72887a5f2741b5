"""base_model: a registered local checkpoint, or the tiny CTC model pre-trained on the base dialect."""


from pathlib import Path

import dagster as dg

from mloc_dagster.assets.datasets.versions import dataset_version
from mloc_dagster.assets.lineage import require_metadata
from mloc_dagster.core.state import StateStore
from mloc_dagster.core.state.schema import ASR
from mloc_dagster.resources.artifacts import ArtifactStore
from mloc_dagster.resources.gpu import GpuArbiter
from mloc_dagster.resources.state import StateStoreResource

BASE_DIALECT = "en-us"


class BaseModelConfig(dg.Config):
    checkpoint_dir: str = ""  # a local Hugging Face CTC checkpoint to register instead of pre-training
    base_dialect: str = BASE_DIALECT
    train_seconds: float = 180.0
    max_steps: int = 0  # > 0: stop after this many steps (the cosine schedule follows steps), within train_seconds
    batch_size: int = 16
    lr: float = 4e-3
    length_groups: int = 0  # > 0: batches of similar length, sorted within groups of this many batches
    seed: int = 0


@dg.asset(
    deps=[dg.AssetDep(dataset_version, partition_mapping=dg.SpecificPartitionsPartitionMapping([BASE_DIALECT]))],
    group_name="models", kinds={"pytorch"}, pool="gpu",
    description="The base ASR model every adapter is trained on: a registered local checkpoint "
                "(content hash as version) or the built-in tiny CTC model pre-trained on the base dialect.",
)
def base_model(context: dg.AssetExecutionContext, config: BaseModelConfig, artifacts: ArtifactStore,
               gpu: GpuArbiter, state: StateStoreResource) -> dg.MaterializeResult:
    from mloc_dagster.core.data.features import load_features
    from mloc_dagster.core.models.evaluate import error_rates, transcribe
    from mloc_dagster.core.models.families import UnsupportedModel, check_family, load_base_model
    from mloc_dagster.core.publish import model_dir_hash, publish_copy, publish_version

    dataset = require_metadata(context.instance, "dataset_version", config.base_dialect)
    models = artifacts.paths.models / "base"
    with gpu.lease("TRAIN", context) as lease:
        if config.checkpoint_dir:
            source = Path(config.checkpoint_dir)
            try:  # refused before anything is copied
                check_family(source)
            except (UnsupportedModel, FileNotFoundError) as exc:
                raise dg.Failure(f"checkpoint_dir: {exc}") from exc
            version = model_dir_hash(source)
            out = publish_copy(source, models / version, version)  # a half copy left by a crash is rebuilt
            train_metrics = {}
        else:
            from mloc_dagster.core.models.pretrain import pretrain_base

            tmp = models / f".pretrain-{context.run_id[:8]}"
            train_metrics = pretrain_base(dataset["path"], tmp, train_seconds=config.train_seconds,
                                          max_steps=config.max_steps or None, batch_size=config.batch_size,
                                          lr=config.lr, length_groups=config.length_groups,
                                          seed=config.seed, device=lease.torch_device,
                                          feature_cache_dir=artifacts.paths.home / "features",
                                          log=context.log.info)
            version, out = publish_version(tmp, models)
        bm = load_base_model(out, lease.torch_device)
        # Pre-training evaluates dev and test itself; a registered checkpoint is evaluated here.
        scores = {k: train_metrics[k] for k in ("dev_cer", "dev_wer", "test_cer", "test_wer") if k in train_metrics}
        if not scores:
            for split in ("dev", "test"):
                features = load_features(dataset["path"], split, bm.feature_extractor,
                                         cache_dir=artifacts.paths.home / "features")
                rates = error_rates(transcribe(bm.model, bm.family, features, device=lease.torch_device))
                scores[f"{split}_cer"], scores[f"{split}_wer"] = rates["cer"], rates["wer"]
    stale = stale_production(state.store(), version)
    if stale:
        context.log.warning(f"production adapters on another base model are now stale: {', '.join(stale)}")
    return dg.MaterializeResult(
        data_version=dg.DataVersion(version),
        metadata={
            "stale_production_adapters": dg.MetadataValue.md(
                "\n".join(f"- {line}" for line in stale) or "none: every production adapter is on this base"),
            "version": version, "base_dialect": config.base_dialect, "parameters": bm.num_parameters,
            "family": bm.model.config.model_type,  # load_base_model checked it is a supported family
            "dataset_version": dataset["version"], **scores,
            **{k: v for k, v in train_metrics.items() if isinstance(v, int | float) and k not in scores},
            "path": dg.MetadataValue.path(str(out)), **lease.metadata(),
        },
    )


def stale_production(store: StateStore, version: str) -> list[str]:
    """Production adapters (per dialect and branch) trained on another base: they are not compared
    with candidates of this base, and `mloc candidate list` marks them stale."""
    current = {}
    for p in store.list_promotions(limit=None, track=ASR):
        current.setdefault((p.dialect, p.branch), p)
    return [f"{d} {b}: {p.candidate_id} (base {(p.base_model or 'unknown')[:12]})"
            for (d, b), p in sorted(current.items()) if p.base_model != version]


base_model_job = dg.define_asset_job("base_model_job", selection=[base_model],
                                     description="Register or pre-train the base model.")

defs = dg.Definitions(assets=[base_model], jobs=[base_model_job])
