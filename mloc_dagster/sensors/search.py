"""The hyperparameter half of the training chain: one search, its trials, its pruner.

A search (run kind ``hyperparameter``) is an Optuna study in the project's database
(``core/search/study.py``); each trial is a training run of kind ``single`` (``parent_run_id``,
``trial_number``) that the training chain advances like any run, one timeboxed job at a time.
Every tick, before the trials' next jobs are requested:

1. each job a trial finished is reported to the study (its dev CER, one job = one unit of
   resource); when the pruner says stop, the trial is cancelled with the reason, so its next job
   is never requested, and its adapters are discarded (kept on disk, never merged);
2. a trial that completed, failed or was cancelled by a person is told to the study;
3. while the study has open slots (parallelism, trial budget), a new trial is asked and started;
4. when every trial is finished, the best completed trial's hparams are the search's result
   (its status reason), the other trials' adapters are discarded, and a candidate is requested
   from the best trial's adapter: it is gated and promoted like any candidate.

Before 1, the study and the store are reconciled (the trial is asked first, its run written
second, so a crash between them leaves a running trial without a run): such a trial is
re-launched, its run written from the hparams the study stored for it (a sample the training job
refuses fails the trial instead); a trial run whose trial is not in the study fails with the reason.

Pausing, resuming or cancelling the search applies to its trials (``runs/service.py``).
"""

import dagster as dg

from mloc_dagster.assets.tracks import validate_hparams
from mloc_dagster.assets.training.hparams import InvalidHParams
from mloc_dagster.core.search.study import Search, SearchError, SearchSpaceError
from mloc_dagster.core.state import StateStore
from mloc_dagster.core.state.runs import TrainingRun
from mloc_dagster.core.state.schema import ACTIVE, CANCELLED, COMPLETED, FAILED, PAUSED, SUCCEEDED
from mloc_dagster.runs.requests import CANDIDATE_JOB, chain_run_key
from mloc_dagster.sensors.isolation import isolated


def search_requests(context: dg.SensorEvaluationContext, store: StateStore, search_run: TrainingRun) -> list:
    try:
        search = Search.open(store.url, search_run.run_id)
    except SearchError as exc:
        store.transition_run(search_run.run_id, ACTIVE, FAILED, f"the search's study cannot be opened: {exc}")
        return []
    with search:
        trials = store.list_runs(parent_run_id=search_run.run_id, limit=None)
        for trial in trials:
            if search.has_trial(trial.trial_number):  # one trial's error pauses that trial only
                isolated(context, store, trial.run_id, None, judge_trial, context, store, search, trial)
            else:
                fail_trial_without_study_trial(context, store, search, trial)
        relaunch_trials_without_run(context, store, search, search_run, {t.trial_number for t in trials})
        for _ in range(search.open_slots()):
            if not start_trial(context, store, search, search_run):
                break
        return finish_search(context, store, search, search_run) if search.done() else []


def judge_trial(context: dg.SensorEvaluationContext, store: StateStore, search: Search, trial: TrainingRun) -> None:
    jobs = [j for j in store.jobs_for_run(trial.run_id) if j.status == SUCCEEDED and j.metrics]
    for job in sorted(jobs, key=lambda j: j.job_index):
        if job.metrics.get("dev_cer") is None:
            continue
        if search.report(trial.trial_number, job.job_index, float(job.metrics["dev_cer"])):
            reason = (f"pruned after job {job.job_index} (dev CER {job.metrics['dev_cer']:.3f} not among the best "
                      f"at that point: {search.config.pruner})")
            if store.transition_run(trial.run_id, ACTIVE, CANCELLED, reason):
                store.discard_unclaimed(trial.run_id, f"trial {trial.trial_number} {reason}")
                context.log.info(f"search {search.run_id}: trial {trial.trial_number} {reason}")
            return
    if trial.status == COMPLETED and jobs:
        search.finish(trial.trial_number, float(jobs[-1].metrics.get("dev_cer", float("nan"))))
    elif trial.status == FAILED:
        search.fail(trial.trial_number, trial.status_reason or "failed")
    elif trial.status == CANCELLED:
        search.prune(trial.trial_number, trial.status_reason or "cancelled")


def fail_trial_without_study_trial(context: dg.SensorEvaluationContext, store: StateStore, search: Search,
                                   trial: TrainingRun) -> None:
    """A trial run the study does not know cannot be judged: it fails, its adapters never merge."""
    reason = f"trial {trial.trial_number} is not in the search's study: it cannot be judged"
    if store.transition_run(trial.run_id, (ACTIVE, PAUSED), FAILED, reason):
        store.discard_unclaimed(trial.run_id, reason)
        context.log.warning(f"search {search.run_id}: {trial.run_id} failed: {reason}")


def relaunch_trials_without_run(context: dg.SensorEvaluationContext, store: StateStore, search: Search,
                                search_run: TrainingRun, with_run: set[int | None]) -> None:
    """A trial asked but whose run was never written (a crash between the two): write it now."""
    for number, sampled in sorted(search.running().items()):
        if number in with_run:
            continue
        try:
            validate_hparams(sampled)
        except InvalidHParams as exc:
            search.fail(number, f"sampled hparams refused: {exc}")
            continue
        trial = create_trial_run(store, search_run, number, sampled)
        context.log.warning(f"search {search_run.run_id}: trial {number} had no run (interrupted start); "
                            f"re-launched as {trial.run_id} with {sampled}")


def start_trial(context: dg.SensorEvaluationContext, store: StateStore, search: Search, search_run: TrainingRun) -> bool:
    try:
        number, sampled = search.ask(validate=validate_hparams)
    except (SearchError, SearchSpaceError) as exc:
        context.log.warning(f"search {search_run.run_id}: no new trial: {exc}")
        return False
    trial = create_trial_run(store, search_run, number, sampled)
    context.log.info(f"search {search_run.run_id}: trial {number} started as {trial.run_id} with {sampled}")
    return True


def create_trial_run(store: StateStore, search_run: TrainingRun, number: int, sampled: dict) -> TrainingRun:
    """The trial's training run, named by its number; written after the study's trial (see above)."""
    return store.create_run(
        run_id=f"{search_run.run_id}-t{number:02d}", dialect=search_run.dialect,
        dataset_version=search_run.dataset_version, base_model_version=search_run.base_model_version,
        hparams={**search_run.hparams, **sampled}, timebox_s=search_run.timebox_s, max_jobs=search_run.max_jobs,
        candidate_every=min(12, search_run.max_jobs), rehearsal_dataset=search_run.rehearsal_dataset,
        parent_run_id=search_run.run_id, trial_number=number)


def finish_search(context: dg.SensorEvaluationContext, store: StateStore, search: Search,
                  search_run: TrainingRun) -> list:
    best = search.best()
    if best is None:
        store.transition_run(search_run.run_id, ACTIVE, FAILED, "no trial completed all its jobs")
        return []
    number, hparams, dev_cer = best
    winner = next(t for t in store.list_runs(parent_run_id=search_run.run_id, limit=None) if t.trial_number == number)
    reason = f"best trial {number} ({winner.run_id}): dev CER {dev_cer:.4f} with {hparams}"
    # One transaction: the trials become mergeable with the losers already discarded.
    if not store.complete_search(search_run.run_id, winner.run_id, reason):
        return []
    context.log.info(f"search {search_run.run_id} completed: {reason}")
    last = winner.last_finished_job if winner.last_finished_job is not None else 0
    return [dg.RunRequest(job_name=CANDIDATE_JOB, partition_key=winner.dialect,
                          run_key=chain_run_key(search_run, "candidate"),
                          tags={"mloc/run_id": winner.run_id, "mloc/job_index": str(last),
                                "mloc/search": search_run.run_id})]
