"""Jobs the sensors and users launch, and the run requests that carry a training job's contract."""

from __future__ import annotations

import dagster as dg

from mloc_dagster.assets.adapters import TIMEBOX_MARGIN_S, AdapterJobConfig, adapter_checkpoint
from mloc_dagster.assets.candidates import candidate_job
from mloc_dagster.core.state import TrainingRun
from mloc_dagster.k8s import K8S_CONFIG_TAG, gpu_k8s_config
from mloc_dagster.partitions import dialect_partitions

TRAIN_JOB = "train_adapter_job"
CANDIDATE_JOB = candidate_job.name

train_adapter_job = dg.define_asset_job(
    TRAIN_JOB, selection=[adapter_checkpoint], partitions_def=dialect_partitions,
    # On Kubernetes (K8sRunLauncher) the run pod asks for one GPU; ignored by other launchers.
    tags={K8S_CONFIG_TAG: gpu_k8s_config()},
    description="One timeboxed LoRA job of a training run (config: run_id, job_index, timebox_s, hparams).",
)

HPARAM_KEYS = set(AdapterJobConfig.model_fields) - {"run_id", "job_index", "timebox_s"}


def train_run_request(run: TrainingRun, job_index: int) -> dg.RunRequest:
    hparams = {k: v for k, v in run.hparams.items() if k in HPARAM_KEYS}
    return dg.RunRequest(
        job_name=TRAIN_JOB, partition_key=run.dialect, run_key=f"{run.run_id}/{job_index}",
        run_config={"ops": {"adapter_checkpoint": {"config": {
            "run_id": run.run_id, "job_index": job_index, "timebox_s": run.timebox_s, **hparams}}}},
        tags={"mloc/run_id": run.run_id, "mloc/job_index": str(job_index),
              "dagster/max_runtime": str(run.timebox_s + TIMEBOX_MARGIN_S)},
    )
