"""The run requests that carry a training job's contract (each run's track names its jobs), and
the jobs the chain launches."""

from __future__ import annotations

import dagster as dg

from mloc_dagster.assets.candidates.promotion import candidate_job
from mloc_dagster.assets.models.base_model import base_model_job
from mloc_dagster.assets.pool.rounds import ROUND_MERGE_JOB, round_merge_job
from mloc_dagster.assets.tracks import track_of, validate_hparams
from mloc_dagster.assets.training.adapters import TRAIN_JOB, train_adapter_job
from mloc_dagster.assets.training.step import TIMEBOX_MARGIN_S
from mloc_dagster.assets.tts.candidates import tts_candidate_job
from mloc_dagster.assets.tts.training import tts_base_model_job, tts_train_adapter_job
from mloc_dagster.core.state.rounds import RoundSlice
from mloc_dagster.core.state.runs import TrainingRun
from mloc_dagster.execution.k8s import K8S_CONFIG_TAG, node_k8s_config
from mloc_dagster.execution.ray import RAY_CONFIG_TAG, node_ray_config

CANDIDATE_JOB = candidate_job.name

# Every job the training chain launches (a pipeline's base_model stage too), both tracks.
CHAIN_JOBS = [train_adapter_job, candidate_job, round_merge_job, base_model_job, tts_train_adapter_job,
              tts_candidate_job, tts_base_model_job]


def chain_run_key(run: TrainingRun, *parts: object) -> str:
    """``<run_id>/<part>...``, plus ``/g<N>`` after the N-th resume: a job re-requested after a
    pause is a new unit of work, a repeated sensor decision within one generation is not."""
    key = "/".join([run.run_id, *map(str, parts)])
    return f"{key}/g{run.generation}" if run.generation else key


def train_run_request(run: TrainingRun, job_index: int, node_id: str | None = None) -> dg.RunRequest:
    """Job ``job_index`` of a chained run; ``node_id``: the pool node it was placed on (a Ray pool),
    which becomes its per-node concurrency tag and its Ray placement, as a slice's does."""
    # Validated when the run was created; checked again so a bad row fails loudly, never silently.
    hparams = validate_hparams(run.hparams, run.track)
    track = track_of(run.track)
    placed = {"mloc/node": node_id, RAY_CONFIG_TAG: node_ray_config(node_id)} if node_id else {}
    return dg.RunRequest(
        job_name=track.train_job, partition_key=run.dialect, run_key=chain_run_key(run, job_index),
        run_config={"ops": {track.train_op: {"config": {
            "run_id": run.run_id, "job_index": job_index, "timebox_s": run.timebox_s, **hparams}}}},
        # The backstop; the job moves it once its device is granted (adapters.start_timebox).
        tags={"mloc/run_id": run.run_id, "mloc/job_index": str(job_index),
              "dagster/max_runtime": str(run.timebox_s + TIMEBOX_MARGIN_S), **placed},
    )


def slice_run_request(run: TrainingRun, s: RoundSlice) -> dg.RunRequest:
    """Slice ``s`` of a distributed round: its own run of the training job, on its node.

    ``mloc/node`` is what Dagster's per-node concurrency counts (``tag_concurrency_limits`` with
    ``applyLimitPerUniqueValue`` in dagster.yaml / the Helm values); on Kubernetes the node also
    becomes the pod's node selector, on a Ray cluster the Ray placement (``execution/ray.py``).
    Run key ``<run_id>/<round>/<slice>``."""
    request = train_run_request(run, s.round_index)
    config = request.run_config["ops"]["adapter_checkpoint"]["config"]
    return dg.RunRequest(
        job_name=TRAIN_JOB, partition_key=run.dialect, run_key=chain_run_key(run, s.round_index, s.slice_index),
        run_config={"ops": {"adapter_checkpoint": {"config": {**config, "slice_index": s.slice_index}}}},
        tags={"mloc/run_id": run.run_id, "mloc/round": str(s.round_index), "mloc/slice": str(s.slice_index),
              "mloc/node": s.node_id, "dagster/max_runtime": request.tags["dagster/max_runtime"],
              K8S_CONFIG_TAG: node_k8s_config(s.node_id), RAY_CONFIG_TAG: node_ray_config(s.node_id)})


def candidate_run_request(run: TrainingRun, job_index: int) -> dg.RunRequest:
    """The candidate job (merge, gate, promotion) of the run's track, after job ``job_index``."""
    return dg.RunRequest(
        job_name=track_of(run.track).candidate_job, partition_key=run.dialect,
        run_key=chain_run_key(run, "candidate", job_index),
        tags={"mloc/run_id": run.run_id, "mloc/job_index": str(job_index)})


def round_merge_request(run: TrainingRun, round_index: int) -> dg.RunRequest:
    return dg.RunRequest(
        job_name=ROUND_MERGE_JOB, partition_key=run.dialect, run_key=chain_run_key(run, round_index, "merge"),
        run_config={"ops": {"round_adapter": {"config": {"run_id": run.run_id, "round_index": round_index}}}},
        tags={"mloc/run_id": run.run_id, "mloc/round": str(round_index)})
