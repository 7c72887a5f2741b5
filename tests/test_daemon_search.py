"""A hyperparameter search through the real `dagster-daemon` on CPU: 6 trials x 3 tiny timeboxed
jobs, pruned between jobs by the study in the project database, which survives a daemon restart
in the middle. Slow by nature.

One trial at a time: which trials ASHA prunes depends on the order in which they report their first
job, and with two in flight that order is the machine's (the dev CERs of a 2-step job on the tiny
base tie often, and a run of ties prunes nothing). In sequence, every sample (seeded by the trial
number), every job (exact on CPU) and so every decision is the same on every machine."""

import dagster as dg
import pytest

from mloc_dagster.core.search.study import Search
from mloc_dagster.core.state import StateStore
from mloc_dagster.core.state.engine import resolve_state_url
from mloc_dagster.runs.service import StartRequest, start_run
from tests.daemon import Daemon, wait_for

SPACE = {"lr": [1e-4, 3e-2, "log"], "r": [2, 4, 8]}


@pytest.mark.slow
def test_a_search_prunes_and_survives_a_daemon_restart(registered_base, mloc_home):
    instance, _ = registered_base
    store = StateStore(resolve_state_url())
    search = start_run(instance, store, StartRequest("en-gb-scotland", jobs=3, timebox_s=60, kind="hyperparameter", space=SPACE,
                       trials=6, parallelism=1, hparams={"max_steps": 2, "batch_size": 4}))

    def trials():
        return store.list_runs(parent_run_id=search.run_id, limit=None)

    def fail_fast():
        r = store.get_run(search.run_id)
        if r.status in ("failed", "cancelled", "paused"):
            raise AssertionError(f"search {r.status}: {r.status_reason}")
        return r

    daemon = Daemon(mloc_home)
    daemon.start()
    try:
        wait_for(lambda: fail_fast() and len(trials()) >= 3, 900, "three trials to start", daemon)
    finally:
        daemon.kill()  # a crash: the study must carry on from the database
    started_before = {t.trial_number for t in trials()}
    daemon = Daemon(mloc_home)
    daemon.start()
    try:
        def done():
            in_flight = instance.get_run_records(dg.RunsFilter(statuses=[
                dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
                dg.DagsterRunStatus.STARTED]), limit=1)
            # the candidate job is requested in the tick that completes the search: wait for it too
            merged = instance.get_run_records(dg.RunsFilter(job_name="candidate_job",
                                                            tags={"mloc/search": search.run_id}), limit=1)
            return fail_fast().status == "completed" and merged and not in_flight
        wait_for(done, 1500, "the search to complete", daemon,
                 lambda: str([(t.trial_number, t.status, t.last_finished_job) for t in trials()]))
    finally:
        daemon.stop()

    everything = trials()
    numbers = sorted(t.trial_number for t in everything)
    assert numbers == list(range(6)) and started_before <= set(numbers)  # no trial lost or started twice
    pruned = [t for t in everything if t.status == "cancelled"]
    summary = Search.open(store.url, search.run_id).summary()
    assert pruned, summary
    assert all(t.status_reason.startswith("pruned after job") for t in pruned)
    assert any((t.last_finished_job or 0) < 2 for t in pruned)  # stopped before its last job
    best = store.get_run(search.run_id).status_reason
    assert best.startswith("best trial") and "'lr'" in best and "'r'" in best
    winner = next(s for s in summary if best.startswith(f"best trial {s.trial} "))
    assert winner.state == "completed" and len(winner.dev_cer_per_job) == 3
    candidates = store.list_candidates("en-gb-scotland", limit=None)
    assert len(candidates) == 1 and {s.run_id for s in candidates[0].sources} == {f"{search.run_id}-t{winner.trial:02d}"}
