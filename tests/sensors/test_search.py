"""A hyperparameter search on a real instance, state store and Optuna study (same SQLite file):
trials started up to the parallelism, each finished job judged by the pruner before the trial's
next job is requested, pruned trials stopped with the reason and kept out of candidates, the best
trial's hparams as the result and a candidate from it. Jobs are recorded through the store here
(their dev CERs chosen so the pruner has something to decide); the training is tested elsewhere."""

import threading

import pytest

from mloc_dagster.assets.training.adapters import TRAIN_JOB
from mloc_dagster.core.search.study import Search
from mloc_dagster.core.state import StateStore
from mloc_dagster.runs.requests import CANDIDATE_JOB
from mloc_dagster.runs.service import StartRequest, TrainingRunError, cancel_run, pause_run, resume_run, search_config, start_run
from tests.conftest_pg import wait_for_a_lock_wait
from tests.sensors.conftest import tick

SPACE = {"lr": [1e-4, 1e-2, "log"], "r": [4, 8, 16]}


@pytest.fixture()
def store(mloc_home):
    from mloc_dagster.core.state.engine import resolve_state_url

    return StateStore(resolve_state_url())


@pytest.fixture()
def instance(registered_base):
    return registered_base[0]



def finish_job(store, run, job_index, dev_cer):
    store.record_job_started(run.run_id, job_index, dagster_run_id=f"d-{run.run_id}-{job_index}")
    store.record_job_finished(run.run_id, job_index, "succeeded", checkpoint_path=f"/ckpt/{run.run_id}/{job_index}",
                              sha256="x", metrics={"dev_cer": dev_cer}, base_model="b")


def test_a_search_prunes_between_jobs_and_ends_with_its_best_trial(instance, store):
    search_run = start_run(instance, store, StartRequest("en-gb-scotland", jobs=3, timebox_s=60, kind="hyperparameter",
                           space=SPACE, trials=6, parallelism=3))
    assert search_run.kind == "hyperparameter"
    result, cursor = tick(instance, store)
    trials = sorted(store.list_runs(parent_run_id=search_run.run_id), key=lambda r: r.trial_number)
    assert [t.trial_number for t in trials] == [0, 1, 2]  # parallelism 3
    assert sorted(r.run_key for r in result.run_requests) == sorted(f"{t.run_id}/0" for t in trials)
    assert all(set(SPACE) <= set(t.hparams) for t in trials)
    assert isinstance(trials[0].hparams["r"], int)

    curves = {}  # trial number -> dev CER per job: trial 0 best, the others worse at every job
    for _ in range(40):  # ticks, until the search is done
        for t in store.list_runs(parent_run_id=search_run.run_id, status="active"):
            nxt = 0 if t.last_finished_job is None else t.last_finished_job + 1
            curve = curves.setdefault(t.trial_number, [0.5 + 0.05 * t.trial_number - 0.02 * j for j in range(3)])
            if store.get_job(t.run_id, nxt) is not None:  # requested by the sensor: "train" it
                finish_job(store, t, nxt, curve[nxt])
        result, cursor = tick(instance, store, cursor)
        if store.get_run(search_run.run_id).status == "completed":
            break
    done = store.get_run(search_run.run_id)
    assert done.status == "completed" and done.status_reason.startswith("best trial 0")
    trials = store.list_runs(parent_run_id=search_run.run_id, limit=None)
    assert len(trials) == 6
    pruned = [t for t in trials if t.status == "cancelled"]
    assert pruned and all(t.status_reason.startswith("pruned after job") for t in pruned)
    assert all((t.last_finished_job or 0) < 2 for t in pruned)  # stopped before their last job
    # The winner's adapter is the candidate's; every other trial's adapters are discarded.
    assert [(r.job_name, r.tags["mloc/run_id"]) for r in result.run_requests] == [
        (CANDIDATE_JOB, f"{search_run.run_id}-t00")]
    unclaimed = store.unclaimed_adapters("en-gb-scotland", latest_per_run=True)
    assert [(a.run_id, a.job_index) for a in unclaimed] == [(f"{search_run.run_id}-t00", 2)]
    summary = Search.open(store.url, search_run.run_id).summary()
    assert {s.state for s in summary} == {"completed", "pruned"}


def drive(instance, store, search_run, dev_cer, cursor=None, ticks=30):
    """Tick until the search ends, "training" every job the sensor requested with ``dev_cer(trial, job)``."""
    result = None
    for _ in range(ticks):
        for t in store.list_runs(parent_run_id=search_run.run_id, status="active"):
            nxt = 0 if t.last_finished_job is None else t.last_finished_job + 1
            if store.get_job(t.run_id, nxt) is not None:
                finish_job(store, t, nxt, dev_cer(t, nxt))
        result, cursor = tick(instance, store, cursor)
        if store.get_run(search_run.run_id).status != "active":
            break
    return result


def test_a_trial_whose_run_was_never_written_is_relaunched_and_the_search_finishes(instance, store):
    search_run = start_run(instance, store, StartRequest("en-gb-scotland", jobs=2, kind="hyperparameter", space=SPACE, trials=2,
                           parallelism=1))
    with Search.open(store.url, search_run.run_id) as search:  # the crash: trial 0 asked, its run never written
        number, sampled = search.ask()
    assert number == 0 and store.list_runs(parent_run_id=search_run.run_id) == []

    result, cursor = tick(instance, store)
    trial = store.get_run(f"{search_run.run_id}-t00")
    assert trial is not None and trial.trial_number == 0 and trial.status == "active"
    assert {k: trial.hparams[k] for k in sampled} == sampled  # the hparams the study holds for it
    assert [r.run_key for r in result.run_requests] == [f"{trial.run_id}/0"]
    drive(instance, store, search_run, lambda t, j: 0.5 - 0.1 * j + 0.05 * t.trial_number, cursor)
    assert store.get_run(search_run.run_id).status == "completed"
    summary = Search.open(store.url, search_run.run_id).summary()
    assert [s.trial for s in summary] == [0, 1] and "running" not in {s.state for s in summary}


def test_a_trial_run_missing_from_the_study_fails_and_the_search_goes_on(instance, store):
    search_run = start_run(instance, store, StartRequest("en-gb-scotland", jobs=1, kind="hyperparameter", space=SPACE, trials=2,
                           parallelism=2))
    stray = store.create_run(run_id=f"{search_run.run_id}-t07", dialect="en-gb-scotland",
                             dataset_version=search_run.dataset_version, base_model_version=search_run.base_model_version,
                             max_jobs=1, candidate_every=1, parent_run_id=search_run.run_id, trial_number=7)
    result, cursor = tick(instance, store)
    stray = store.get_run(stray.run_id)
    assert stray.status == "failed" and "trial 7 is not in the search's study" in stray.status_reason
    assert stray.run_id not in {r.tags["mloc/run_id"] for r in result.run_requests}
    assert store.get_job(stray.run_id, 0) is None
    drive(instance, store, search_run, lambda t, j: 0.4 + 0.1 * t.trial_number, cursor)
    assert store.get_run(search_run.run_id).status_reason.startswith("best trial 0")


@pytest.mark.postgres
def test_no_merge_ever_sees_a_losing_trial_while_the_search_finishes(instance, postgres_url):
    """A merge reading unclaimed adapters at any moment of the search's finish sees no loser: here
    the loser's adapter row is held by another connection, so the finish stops half-way."""
    import sqlalchemy as sa

    from mloc_dagster.core.state.schema import training_jobs

    store = StateStore(postgres_url)
    # As start_run writes it, with short version strings: the pytest paths overflow String(128).
    search_run = store.create_run(dialect="en-gb-scotland", dataset_version="dv-1", base_model_version="bm-1",
                                  max_jobs=1, kind="hyperparameter", parallelism=2)
    Search.create(store.url, search_run.run_id, search_config("hyperparameter", SPACE, trials=2, jobs=1, parallelism=2))
    _, cursor = tick(instance, store)
    winner, loser = sorted(store.list_runs(parent_run_id=search_run.run_id), key=lambda r: r.trial_number)
    finish_job(store, winner, 0, 0.3)
    finish_job(store, loser, 0, 0.5)
    _, cursor = tick(instance, store, cursor)  # both trials complete; the next tick finishes the search
    assert {t.status for t in store.list_runs(parent_run_id=search_run.run_id)} == {"completed"}

    finished = {}
    ticker = threading.Thread(target=lambda: finished.update(result=tick(instance, store, cursor)[0]))
    with store.engine.connect() as holder, holder.begin():
        holder.execute(sa.select(training_jobs).where(training_jobs.c.run_id == loser.run_id).with_for_update())
        ticker.start()
        wait_for_a_lock_wait(store)
        seen_mid_finish = [(a.run_id, a.job_index) for a in store.unclaimed_adapters("en-gb-scotland")]
    ticker.join(120)
    assert seen_mid_finish == []  # the trials are not mergeable before the losers are discarded
    assert store.get_run(search_run.run_id).status == "completed"
    assert [(a.run_id, a.job_index) for a in store.unclaimed_adapters("en-gb-scotland")] == [(winner.run_id, 0)]
    assert store.get_job(loser.run_id, 0).status == "discarded"
    assert [r.tags["mloc/run_id"] for r in finished["result"].run_requests] == [winner.run_id]
    store.close()


def test_trials_are_held_back_from_candidates_while_the_search_runs(instance, store):
    search_run = start_run(instance, store, StartRequest("en-gb-scotland", jobs=2, kind="hyperparameter", space=SPACE, trials=2,
                           parallelism=2))
    tick(instance, store)
    trial = store.list_runs(parent_run_id=search_run.run_id)[0]
    finish_job(store, trial, 0, 0.4)
    assert store.unclaimed_adapters("en-gb-scotland") == []
    assert pause_run(store, search_run.run_id)
    assert {t.status for t in store.list_runs(parent_run_id=search_run.run_id)} == {"paused"}
    result, _ = tick(instance, store)
    assert [r for r in result.run_requests if r.job_name == TRAIN_JOB] == []
    assert resume_run(store, search_run.run_id)
    assert {t.status for t in store.list_runs(parent_run_id=search_run.run_id)} == {"active"}
    cancel_run(instance, store, search_run.run_id)
    assert {t.status for t in store.list_runs(parent_run_id=search_run.run_id)} == {"cancelled"}


@pytest.mark.parametrize("space, message", [
    ({}, "search space is empty"),
    ("{not json", "not valid JSON"),
    ({"lora_r": [4, 8]}, "unknown hparam 'lora_r'"),
    ({"lr": [0.1, 0.01]}, "lr"),
])
def test_a_bad_search_space_starts_nothing(instance, store, space, message):
    with pytest.raises(TrainingRunError, match=message):
        start_run(instance, store, StartRequest("en-gb-scotland", jobs=2, kind="hyperparameter", space=space, trials=2))
    assert store.list_runs() == []
