"""The hyperparameter half of the training chain: one search, its trials, its pruner.

A search (run kind ``hyperparameter``) is an Optuna study in the project's database
(``core/search.py``); each trial is a training run of kind ``single`` (``parent_run_id``,
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

Pausing, resuming or cancelling the search applies to its trials (``training_runs.py``).
"""

import dagster as dg

from mloc_dagster.assets.adapters import validate_hparams
from mloc_dagster.core.search import Search, SearchError, SearchSpaceError
from mloc_dagster.core.state import ACTIVE, CANCELLED, COMPLETED, FAILED, SUCCEEDED, StateStore, TrainingRun
from mloc_dagster.jobs import CANDIDATE_JOB, chain_run_key


def search_requests(context: dg.SensorEvaluationContext, store: StateStore, search_run: TrainingRun) -> list:
    try:
        search = Search.open(store.url, search_run.run_id)
    except SearchError as exc:
        store.transition_run(search_run.run_id, ACTIVE, FAILED, f"the search's study cannot be opened: {exc}")
        return []
    for trial in store.list_runs(parent_run_id=search_run.run_id, limit=None):
        judge_trial(context, store, search, trial)
    if search_run.status == ACTIVE:
        for _ in range(search.open_slots()):
            if not start_trial(context, store, search, search_run):
                break
    if not search.done():
        return []
    return finish_search(context, store, search, search_run)


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


def start_trial(context: dg.SensorEvaluationContext, store: StateStore, search: Search, search_run: TrainingRun) -> bool:
    try:
        number, sampled = search.ask(validate=validate_hparams)
    except (SearchError, SearchSpaceError) as exc:
        context.log.warning(f"search {search_run.run_id}: no new trial: {exc}")
        return False
    trial = store.create_run(
        run_id=f"{search_run.run_id}-t{number:02d}", dialect=search_run.dialect,
        dataset_version=search_run.dataset_version, base_model_version=search_run.base_model_version,
        hparams={**search_run.hparams, **sampled}, timebox_s=search_run.timebox_s, max_jobs=search_run.max_jobs,
        candidate_every=min(12, search_run.max_jobs), rehearsal_dataset=search_run.rehearsal_dataset,
        parent_run_id=search_run.run_id, trial_number=number)
    context.log.info(f"search {search_run.run_id}: trial {number} started as {trial.run_id} with {sampled}")
    return True


def finish_search(context: dg.SensorEvaluationContext, store: StateStore, search: Search,
                  search_run: TrainingRun) -> list:
    best = search.best()
    trials = store.list_runs(parent_run_id=search_run.run_id, limit=None)
    if best is None:
        store.transition_run(search_run.run_id, ACTIVE, FAILED, "no trial completed all its jobs")
        return []
    number, hparams, dev_cer = best
    winner = next(t for t in trials if t.trial_number == number)
    reason = f"best trial {number} ({winner.run_id}): dev CER {dev_cer:.4f} with {hparams}"
    if not store.transition_run(search_run.run_id, ACTIVE, COMPLETED, reason):
        return []
    for t in trials:
        if t.run_id != winner.run_id:
            store.discard_unclaimed(t.run_id, f"trial {t.trial_number} lost the search to trial {number}")
    context.log.info(f"search {search_run.run_id} completed: {reason}")
    last = winner.last_finished_job if winner.last_finished_job is not None else 0
    return [dg.RunRequest(job_name=CANDIDATE_JOB, partition_key=winner.dialect,
                          run_key=chain_run_key(search_run, "candidate"),
                          tags={"mloc/run_id": winner.run_id, "mloc/job_index": str(last),
                                "mloc/search": search_run.run_id})]
