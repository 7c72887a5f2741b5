"""Starting, pausing, resuming and cancelling training runs: shared by the `mloc run` CLI and the
`start_training_run` job of the UI launchpad."""


from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg

from mloc_dagster.assets.lineage import latest_metadata
from mloc_dagster.assets.tracks import TRACKS, validate_hparams
from mloc_dagster.assets.training.adapters import rehearsal_dataset
from mloc_dagster.assets.training.hparams import InvalidHParams, config_from
from mloc_dagster.core.adapters.format import InvalidAdapter, read_adapter_dir
from mloc_dagster.core.state import StateStore
from mloc_dagster.core.state.runs import TrainingRun
from mloc_dagster.core.state.schema import (
    ACTIVE,
    ADAPTER_BRANCHES,
    ASR,
    CANCELLED,
    DISTRIBUTED,
    FAILED,
    HYPERPARAMETER,
    PAUSED,
    PIPELINE,
    QUEUED,
    RUNNING,
    SINGLE,
)
from mloc_dagster.partitions import is_valid_dialect
from mloc_dagster.resources.state import StateStoreResource
from mloc_dagster.runs.pipelines import JobResolver, check_stage

IN_FLIGHT = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
             dg.DagsterRunStatus.STARTED]


class TrainingRunError(ValueError):
    pass


def resolve_warm_start(store: StateStore, dialect: str, base_version: str, spec: str) -> tuple[str, str, Path]:
    """``production[:stable|experimental]`` or a candidate id → (label, candidate id, adapter dir).
    The adapter must be of this dialect and trained on the base model the new run pins."""
    if spec == "production" or spec.startswith("production:"):
        branch = spec.partition(":")[2] or "stable"
        if branch not in ADAPTER_BRANCHES:
            raise TrainingRunError(f"--from {spec}: branch is one of {', '.join(ADAPTER_BRANCHES)}")
        promotion = store.production(dialect, branch)
        if promotion is None:
            raise TrainingRunError(f"--from {spec}: {dialect} has no {branch} production adapter yet")
        candidate = store.get_candidate(promotion.candidate_id)
        label = f"production:{branch}"
    else:
        candidate, label = store.get_candidate(spec), spec
        if candidate is None:
            raise TrainingRunError(f"--from {spec}: no such candidate (see `mloc candidate list`)")
    assert candidate is not None
    if candidate.dialect != dialect:
        raise TrainingRunError(f"--from {spec}: {candidate.candidate_id} is an adapter of {candidate.dialect}, "
                               f"not {dialect}")
    if candidate.base_model != base_version:
        raise TrainingRunError(f"--from {spec}: {candidate.candidate_id} was trained on base model "
                               f"{(candidate.base_model or 'unknown')[:12]}, the current base is {base_version[:12]}; "
                               "an adapter only continues on its own base")
    adapter_dir = Path(candidate.adapter_path)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise TrainingRunError(f"--from {spec}: the adapter of {candidate.candidate_id} is gone from {adapter_dir} "
                               "(removed from disk); pick another (`mloc candidate list`)")
    return label, candidate.candidate_id, adapter_dir


def warm_start_hparams(adapter_dir: Path, hparams: dict) -> dict:
    """A warm start continues the adapter's own LoRA shape (rank, alpha, target modules); the
    adapter must pass what a node may hand in (``core/adapters/format.py``), else nothing starts."""
    try:
        cfg = read_adapter_dir(adapter_dir).config
    except InvalidAdapter as exc:
        raise TrainingRunError(f"--from: {exc}") from exc
    shape = {"r": int(cfg["r"]), "alpha": float(cfg["lora_alpha"]), "target_modules": sorted(cfg["target_modules"])}
    clash = {k: hparams[k] for k in shape if k in hparams and hparams[k] != shape[k]}
    if clash:
        raise TrainingRunError(f"hparams {clash} differ from the warm-start adapter's {shape}; leave them out")
    return {**hparams, **shape}


@dataclass(frozen=True)
class StartRequest:
    """One training run to start, as `mloc run start`, the launchpad and the API ask for it.

    ``kind="distributed"``: ``jobs`` rounds of ``round_samples`` samples, each placed as up to
    ``parallelism`` slices on the pool's nodes and merged (``sensors/rounds.py``).
    ``kind="hyperparameter"``: ``trials`` single runs of ``jobs`` jobs with hparams sampled from
    ``space``, up to ``parallelism`` at once, pruned between jobs (``sensors/search.py``).
    ``track="tts"``: TTS adapters on the latest ``tts_base_model`` (single runs; docs/tts.md).
    ``init_from``: warm start from ``production[:stable|experimental]`` or a candidate id."""

    dialect: str
    jobs: int = 6
    candidate_every: int = 6
    timebox_s: int = 3600
    hparams: Mapping[str, Any] = field(default_factory=dict)
    init_from: str | None = None
    kind: str = SINGLE
    parallelism: int = 1
    round_samples: int = 0
    first_round_on_one_node: bool = False
    space: str | Mapping[str, Any] | None = None
    trials: int = 0
    track: str = ASR


def start_run(instance: dg.DagsterInstance, store: StateStore, request: StartRequest) -> TrainingRun:
    """Check every field of ``request``, pin the dialect's latest dataset version and the track's
    latest base model, and create the run (from the base alone, or warm-started from an adapter of
    the dialect). The hparams are validated here, once, and pinned on the run with every default;
    the training_chain_sensor launches its first job on its next tick."""
    r = request
    if not is_valid_dialect(r.dialect):
        raise TrainingRunError(f"{r.dialect!r}: dialect keys are lowercase [a-z0-9-]")
    if r.track not in TRACKS:
        raise TrainingRunError(f"--track {r.track!r}: one of {', '.join(TRACKS)}")
    track = TRACKS[r.track]
    if r.kind not in track.kinds or (r.init_from and not track.warm_start):
        raise TrainingRunError(f"a {track.name} run is of kind {' or '.join(track.kinds)}"
                               + ("" if track.warm_start else f", from the {track.base_asset} (no --from)"))
    if r.first_round_on_one_node and r.kind != DISTRIBUTED:
        raise TrainingRunError(f"--first-round-on-one-node is for a distributed run, not {r.kind}")
    check_run_params(r.kind, jobs=r.jobs, candidate_every=r.candidate_every, timebox_s=r.timebox_s,
                     parallelism=r.parallelism, round_samples=r.round_samples, trials=r.trials)
    try:
        hparams = track.validate(r.hparams or {})
    except InvalidHParams as exc:
        raise TrainingRunError(str(exc)) from exc
    search = search_config(r.kind, r.space, r.trials, r.jobs, r.parallelism)  # every input checked: nothing started yet
    dataset = latest_metadata(instance, "dataset_version", r.dialect)
    if dataset is None:
        raise TrainingRunError(f"dialect {r.dialect} has no dataset_version yet: add incoming data first")
    base = latest_metadata(instance, track.base_asset)
    if base is None:
        raise TrainingRunError(f"no {track.base_asset} yet: materialize {track.base_asset} first")
    label = init_adapter = None
    if r.init_from:
        label, candidate_id, adapter_dir = resolve_warm_start(store, r.dialect, base["version"], r.init_from)
        hparams = warm_start_hparams(adapter_dir, hparams)
        label, init_adapter = f"{label} ({candidate_id})", str(adapter_dir)
    try:
        run = store.create_run(dialect=r.dialect, dataset_version=dataset["path"], base_model_version=base["path"],
                                hparams=track.pin(hparams), timebox_s=r.timebox_s, max_jobs=r.jobs,
                                candidate_every=min(r.candidate_every, 12), init_from=label, init_adapter=init_adapter,
                                kind=r.kind, parallelism=r.parallelism, round_samples=r.round_samples,
                                first_round_on_one_node=r.first_round_on_one_node,
                                rehearsal_dataset=(rehearsal_dataset(instance, r.dialect) or "") if track.rehearsal else "",
                                track=track.name)
    except ValueError as exc:
        raise TrainingRunError(str(exc)) from exc
    if search is not None:
        from mloc_dagster.core.search.study import Search

        Search.create(store.url, run.run_id, search)
    return run


def start_pipeline(instance: dg.DagsterInstance, store: StateStore, spec, job_def: JobResolver) -> TrainingRun:
    """A pipeline run from a spec (dict, JSON/YAML text or file; ``core/training/pipeline.py``), checked
    before anything starts (``job_def``: the code location's jobs by name); the training_chain_sensor
    starts its first stage on its next tick."""
    from mloc_dagster.core.training.pipeline import PipelineSpecError, load_spec, spec_json

    try:
        stages = load_spec(spec)
        for s in stages:
            check_stage(s, job_def)
    except (PipelineSpecError, OSError) as exc:
        raise TrainingRunError(f"pipeline spec: {exc}") from exc
    training = [s for s in stages if s.kind == "training_run"]
    dialect = training[0].fields["dialect"] if training else "en-us"
    return store.create_run(dialect=dialect, dataset_version="", base_model_version="", kind=PIPELINE,
                            max_jobs=len(stages), candidate_every=1, spec=spec_json(stages))


def check_run_params(kind: str, **values: Any) -> None:
    """The numbers of a run, each named as `mloc run start` and the launchpad call it, checked
    before anything is created."""
    if kind not in (SINGLE, DISTRIBUTED, HYPERPARAMETER):
        raise TrainingRunError(f"--kind {kind!r}: one of {SINGLE}, {DISTRIBUTED}, {HYPERPARAMETER} "
                               "(a pipeline starts from its --spec)")
    lows = {"jobs": 1, "candidate_every": 1, "timebox_s": 1, "parallelism": 1, "round_samples": 0, "trials": 0}
    if kind == DISTRIBUTED:
        lows["round_samples"] = values["parallelism"] if isinstance(values["parallelism"], int) else 1
    if kind == HYPERPARAMETER:
        lows["trials"] = 1
    for name, low in lows.items():
        value = values[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            why = " (one sample per slice at least: >= parallelism)" if name == "round_samples" and low > 0 else ""
            raise TrainingRunError(f"{name} must be an integer >= {low}{why}, got {value!r}")


def search_config(kind: str, space: str | dict | None, trials: int, jobs: int, parallelism: int):
    """A search's configuration, checked (``core.search.study``), or None for other kinds."""
    if kind != HYPERPARAMETER:
        if space:
            raise TrainingRunError(f"--space is for --kind hyperparameter, not {kind}")
        return None
    from mloc_dagster.core.search.study import SearchConfig, SearchError, SearchSpaceError, parse_space, space_json

    try:
        parsed = parse_space(space if space is not None else {}, TRACKS[ASR].hparam_keys, validate_hparams)
        return SearchConfig(space=space_json(parsed), trials=trials, jobs=jobs, parallelism=parallelism)
    except (SearchError, SearchSpaceError) as exc:
        raise TrainingRunError(str(exc)) from exc


def pause_run(store: StateStore, run_id: str) -> bool:
    """The job in flight finishes; no next job is requested (a search: none of its trials')."""
    paused = store.transition_run(run_id, ACTIVE, PAUSED, "paused by user")
    for trial in store.list_runs(status=ACTIVE, parent_run_id=run_id, limit=None) if paused else []:
        store.transition_run(trial.run_id, ACTIVE, PAUSED, f"its search {run_id} was paused")
    return paused


def resume_run(store: StateStore, run_id: str) -> bool:
    """The next job resumes from the last checkpoint (a new generation of run keys: a job, a
    distributed run's queued slices or its round merge that were canceled or refused while paused
    are requested again); a search resumes its trials."""
    resumed = store.transition_run(run_id, PAUSED, ACTIVE, None)
    for trial in store.list_runs(status=PAUSED, parent_run_id=run_id, limit=None) if resumed else []:
        store.transition_run(trial.run_id, PAUSED, ACTIVE, None)
    return resumed


def reactivate_run(store: StateStore, run_id: str, job_index: int, reason: str) -> bool:
    """A run that failed because job ``job_index`` exhausted its retries becomes active again (a
    new generation, the reason recorded) and the job is queued: its replay (``mloc run replay``)
    resumes it from the run's last checkpoint. False if the run is not failed (any more)."""
    if not store.transition_run(run_id, FAILED, ACTIVE, reason):
        return False
    store.record_job_queued(run_id, job_index)
    return True


def cancel_run(instance: dg.DagsterInstance, store: StateStore, run_id: str) -> list[str]:
    """Cancel the run and terminate its Dagster runs in flight; returns their ids. A search
    cancels its live trials too."""
    terminated = []
    for trial in store.list_runs(status=(ACTIVE, PAUSED), parent_run_id=run_id, limit=None):
        terminated += cancel_run(instance, store, trial.run_id)
    store.transition_run(run_id, (ACTIVE, PAUSED), CANCELLED, "cancelled by user")
    for job in store.jobs_for_run(run_id):
        if job.status in (QUEUED, RUNNING):
            store.mark_job_failed(run_id, job.job_index, "cancelled by user")
    for record in instance.get_run_records(dg.RunsFilter(tags={"mloc/run_id": run_id}, statuses=IN_FLIGHT)):
        run = record.dagster_run
        # A run not started yet is simply cancelled; a started one is terminated by its launcher.
        # If the launcher cannot reach it, the worker still stops at its next heartbeat (the job
        # is marked failed above) and the run is recorded as cancelled here.
        if run.status not in (dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED) and \
                instance.run_coordinator.cancel_run(run.run_id):
            terminated.append(run.run_id)
            continue
        instance.report_run_canceled(run, message="cancelled by `mloc run cancel`")
        terminated.append(run.run_id)
    return terminated


# The launchpad's config is StartRequest's fields (`hparams` and `space` as JSON objects there).
StartRunConfig = config_from("StartRunConfig", StartRequest,
                             overrides={"hparams": (dict[str, Any], {}), "space": (dict[str, Any], {})})


@dg.op(description="Create a training run; the training_chain_sensor then chains its jobs.")
def create_training_run(context: dg.OpExecutionContext, config: StartRunConfig,
                        state: StateStoreResource) -> str:
    try:
        run = start_run(context.instance, state.store(), StartRequest(**{
            **config.model_dump(), "init_from": config.init_from or None, "space": config.space or None}))
    except TrainingRunError as exc:
        raise dg.Failure(str(exc)) from exc
    context.add_output_metadata({"run_id": run.run_id, "dialect": run.dialect, "track": run.track,
                                 "jobs": run.max_jobs,
                                 "hparams": dg.MetadataValue.json(run.hparams), "init_from": run.init_from or ""})
    context.log.info(f"training run {run.run_id} started for {run.dialect}")
    return run.run_id


@dg.job(description="Start a training run from the UI launchpad (same as `mloc run start`).")
def start_training_run():
    create_training_run()


defs = dg.Definitions(jobs=[start_training_run])
