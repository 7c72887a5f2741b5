"""StateStore on SQLite and on a real PostgreSQL (``state_url`` from tests/conftest_pg.py)."""

from __future__ import annotations

import multiprocessing as mp
import threading

import pytest

from mloc_dagster.core.state import StateStore
from mloc_dagster.core.state.candidates import AdapterClaimConflict, AdapterRef
from mloc_dagster.core.state.runs import InvalidTransition, UnknownRun
from tests.conftest_pg import wait_for_a_lock_wait
from tests.core.conftest import FakeClock


def _run(store: StateStore, dialect: str = "en-gb-scotland", **kw: object) -> str:
    return store.create_run(dialect=dialect, dataset_version="dv-1", base_model_version="bm-1", **kw).run_id


def _finished_job(store: StateStore, run_id: str, job_index: int, node: str = "node-a", base: str = "base-1") -> None:
    store.record_job_started(run_id, job_index, dagster_run_id=f"d-{run_id}-{job_index}", node_id=node,
                             worker_pid=123, worker_host="host-1")
    store.record_job_finished(run_id, job_index, "succeeded", checkpoint_path=f"/ckpt/{run_id}/{job_index}",
                              sha256=f"sha-{job_index}", metrics={"loss": 1.0 / (job_index + 1)}, base_model=base)


# -- runs -------------------------------------------------------------------------------------


def test_create_get_list_runs(store: StateStore, clock: FakeClock) -> None:
    a = store.create_run(dialect="en-gb-scotland", dataset_version="dv-1", base_model_version="bm-1",
                         hparams={"lr": 1e-3, "r": 8}, timebox_s=60, max_jobs=3, candidate_every=2)
    assert a.run_id.startswith("tr-") and len(a.run_id) == 3 + 12
    assert (a.status, a.last_finished_job, a.hparams) == ("active", None, {"lr": 1e-3, "r": 8})
    clock.advance(1)
    b = _run(store, dialect="en-029")
    assert store.get_run(a.run_id) == a
    assert store.get_run("tr-missing") is None
    assert [r.run_id for r in store.list_runs()] == [b, a.run_id]  # newest first
    assert [r.run_id for r in store.list_runs(dialect="en-gb-scotland")] == [a.run_id]
    assert store.list_runs(status="paused") == []
    assert len(store.list_runs(status=["active", "paused"], limit=1)) == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dialect": "EN_GB"}, "lowercase"),
        ({"candidate_every": 13}, "candidate_every"),
        ({"candidate_every": 0}, "candidate_every"),
        ({"max_jobs": 0}, "max_jobs"),
        ({"timebox_s": 0}, "timebox_s"),
    ],
)
def test_create_run_validates(store: StateStore, kwargs: dict, message: str) -> None:
    args = {"dialect": "en-gb", "dataset_version": "dv", "base_model_version": "bm", **kwargs}
    with pytest.raises(ValueError, match=message):
        store.create_run(**args)


def test_transition_is_compare_and_set(store: StateStore) -> None:
    run_id = _run(store)
    assert store.transition_run(run_id, "active", "paused", "operator pause") is True
    # The second caller read "active" too, but lost the race: nothing is overwritten.
    assert store.transition_run(run_id, "active", "paused", "late") is False
    run = store.get_run(run_id)
    assert (run.status, run.status_reason) == ("paused", "operator pause")
    assert store.transition_run(run_id, ["active", "paused"], "cancelled", "user cancel") is True
    with pytest.raises(InvalidTransition):
        store.transition_run(run_id, "cancelled", "active")  # terminal states are final
    with pytest.raises(UnknownRun):
        store.transition_run("tr-000000000000", "active", "paused")
    with pytest.raises(ValueError):
        store.transition_run(run_id, "active", "sleeping")


def test_concurrent_cas_has_exactly_one_winner(store: StateStore) -> None:
    run_id = _run(store)
    wins: list[bool] = []
    barrier = threading.Barrier(8)

    def contend(i: int) -> None:
        barrier.wait()
        wins.append(store.transition_run(run_id, "active", "completed", f"thread {i}"))

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == [False] * 7 + [True]


# -- jobs -------------------------------------------------------------------------------------


def test_job_lifecycle_and_retry(store: StateStore, clock: FakeClock) -> None:
    run_id = _run(store)
    queued = store.record_job_queued(run_id, 1)
    assert (queued.status, queued.attempts) == ("queued", 0)
    assert store.record_job_queued(run_id, 1) == queued  # idempotent

    first = store.record_job_started(run_id, 1, dagster_run_id="dg-1", node_id="node-a", worker_pid=11,
                                     worker_host="h1")
    assert (first.status, first.attempts, first.dagster_run_id) == ("running", 1, "dg-1")
    store.record_job_finished(run_id, 1, "failed", error="CUDA OOM")
    # Dagster's run retry: a new Dagster run for the same job index.
    clock.advance(30)
    retry = store.record_job_started(run_id, 1, dagster_run_id="dg-2", node_id="node-b", worker_pid=12,
                                     worker_host="h2")
    assert (retry.status, retry.attempts, retry.dagster_run_id, retry.error, retry.finished_at) == (
        "running", 2, "dg-2", None, None)

    clock.advance(5)
    assert store.heartbeat(run_id, 1, progress={"step": 10, "loss": 2.5, "eta_s": 100}) is True
    job = store.get_job(run_id, 1)
    assert job is not None and job.heartbeat_at == clock.now and job.progress == {"step": 10, "loss": 2.5,
                                                                                  "eta_s": 100}
    done = store.record_job_finished(run_id, 1, "succeeded", checkpoint_path="/ckpt/1", sha256="ab" * 32,
                                     metrics={"dev_cer": 0.12})
    assert (done.status, done.checkpoint_path, done.metrics) == ("succeeded", "/ckpt/1", {"dev_cer": 0.12})
    assert store.heartbeat(run_id, 1) is False  # not running any more
    assert store.get_run(run_id).last_finished_job == 1

    _finished_job(store, run_id, 3)
    _finished_job(store, run_id, 2)  # out of order: the maximum wins
    assert store.get_run(run_id).last_finished_job == 3
    assert [j.job_index for j in store.jobs_for_run(run_id)] == [1, 2, 3]


def test_job_errors(store: StateStore) -> None:
    run_id = _run(store)
    with pytest.raises(UnknownRun):
        store.record_job_started("tr-nope", 1)
    with pytest.raises(KeyError):
        store.record_job_finished(run_id, 9, "failed")
    store.record_job_started(run_id, 1)
    with pytest.raises(ValueError, match="checkpoint_path"):
        store.record_job_finished(run_id, 1, "succeeded")
    with pytest.raises(ValueError):
        store.record_job_finished(run_id, 1, "running")


def test_stale_jobs_and_watchdog_cas(store: StateStore, clock: FakeClock) -> None:
    run_id = _run(store)
    store.record_job_started(run_id, 1, worker_pid=100, worker_host="h1")
    store.record_job_started(run_id, 2, worker_pid=200, worker_host="h2")
    clock.advance(60)
    store.heartbeat(run_id, 2)
    clock.advance(60)
    assert [j.job_index for j in store.stale_jobs(90)] == [1]
    assert [j.job_index for j in store.stale_jobs(30)] == [1, 2]
    assert store.stale_jobs(30, worker_host="h2")[0].worker_pid == 200

    # The job came back to life between the watchdog's scan and its update: not failed.
    store.heartbeat(run_id, 1)
    assert store.mark_job_failed(run_id, 1, "no heartbeat", if_heartbeat_older_than_s=90) is False
    clock.advance(100)
    assert store.mark_job_failed(run_id, 1, "no heartbeat for 100 s", if_heartbeat_older_than_s=90) is True
    assert store.mark_job_failed(run_id, 1, "again") is False  # already failed
    assert store.heartbeat(run_id, 1) is False  # a zombie worker learns it should stop
    job = store.get_job(run_id, 1)
    assert job is not None and (job.status, job.error) == ("failed", "no heartbeat for 100 s")
    assert [j.job_index for j in store.stale_jobs(90)] == [2]

    _finished_job(store, run_id, 3)
    assert store.mark_job_failed(run_id, 3, "too late") is False  # finished jobs stay finished


# -- candidates and promotions ----------------------------------------------------------------


def test_unclaimed_adapters_and_claims(store: StateStore, clock: FakeClock) -> None:
    run_a, run_b = _run(store), _run(store)
    other = _run(store, dialect="en-029")
    _finished_job(store, run_a, 1, node="node-a")
    clock.advance(1)
    _finished_job(store, run_b, 1, node="node-b")
    clock.advance(1)
    _finished_job(store, run_a, 2, node="node-a")
    _finished_job(store, other, 1)
    store.record_job_started(run_b, 2)  # running: not an adapter yet
    store.record_job_started(run_b, 3)
    store.record_job_finished(run_b, 3, "failed", error="boom")

    refs = store.unclaimed_adapters("en-gb-scotland")
    assert [(r.run_id, r.job_index, r.node_id) for r in refs] == [
        (run_a, 1, "node-a"), (run_b, 1, "node-b"), (run_a, 2, "node-a")]
    assert refs[0] == AdapterRef(run_a, 1, "node-a", "sha-1", f"/ckpt/{run_a}/1", "base-1")
    latest = store.unclaimed_adapters("en-gb-scotland", latest_per_run=True)
    assert {(r.run_id, r.job_index) for r in latest} == {(run_b, 1), (run_a, 2)}

    clock.advance(1)
    # Merging only each run's latest checkpoint claims the earlier jobs of that run too.
    cand = store.record_candidate(dialect="en-gb-scotland", adapter_path="/cand/1", sha256="c1", sources=latest,
                                  trusted=True, details={"method": "weighted_mean"}, base_model="base-1",
                                  dagster_run_id="dr-1", training_run_id=run_a)
    assert cand.candidate_id.startswith("cand-") and cand.gate_decision is None
    assert store.unclaimed_adapters("en-gb-scotland") == []
    assert len(store.unclaimed_adapters("en-029")) == 1
    assert store.get_job(run_a, 1).candidate_id == cand.candidate_id  # type: ignore[union-attr]
    assert store.candidate_of_dagster_run("dr-1") == cand and store.candidate_of_dagster_run("dr-2") is None

    # A second merge that read the same adapters before the claim writes nothing.
    with pytest.raises(AdapterClaimConflict, match=f"{run_a}/2"):
        store.record_candidate(dialect="en-gb-scotland", adapter_path="/cand/2", sha256="c2", sources=latest,
                               trusted=True)
    assert [c.candidate_id for c in store.list_candidates("en-gb-scotland")] == [cand.candidate_id]

    # An adapter finishing after the candidate is waiting for the next one.
    clock.advance(1)
    _finished_job(store, run_a, 3)
    assert [(r.run_id, r.job_index) for r in store.unclaimed_adapters("en-gb-scotland")] == [(run_a, 3)]

    decided = store.set_gate_result(cand.candidate_id, "passed", "/reports/1.json")
    assert (decided.gate_decision, decided.gate_report_path) == ("passed", "/reports/1.json")
    with pytest.raises(ValueError):
        store.set_gate_result(cand.candidate_id, "maybe", None)
    with pytest.raises(KeyError):
        store.set_gate_result("cand-nope", "passed", None)


def test_an_ungated_candidate_releases_its_adapters_once_and_is_never_gated(store: StateStore) -> None:
    run = _run(store)
    for i in range(2):
        _finished_job(store, run, i)
    cand = store.record_candidate(dialect="en-gb-scotland", adapter_path="/cand/u", sha256="u1", trusted=True,
                                  sources=store.unclaimed_adapters("en-gb-scotland", latest_per_run=True),
                                  details={"method": "weighted_mean"})
    assert store.unclaimed_adapters("en-gb-scotland") == []
    assert store.release_claims(cand.candidate_id, "gate crashed") == 2  # the claimed ancestor too
    assert [(r.run_id, r.job_index) for r in store.unclaimed_adapters("en-gb-scotland")] == [(run, 0), (run, 1)]
    released = store.get_candidate(cand.candidate_id)
    assert released.gate_decision == "released"
    assert released.details == {"method": "weighted_mean", "released": "gate crashed"}
    assert store.release_claims(cand.candidate_id, "again") is None  # once
    with pytest.raises(ValueError, match="released"):
        store.set_gate_result(cand.candidate_id, "passed", "/r.json")
    # The next merge claims them; a gated candidate never gives its adapters back.
    again = store.record_candidate(dialect="en-gb-scotland", adapter_path="/cand/v", sha256="v1", trusted=True,
                                   sources=store.unclaimed_adapters("en-gb-scotland", latest_per_run=True))
    store.set_gate_result(again.candidate_id, "failed", "/r.json")
    assert store.release_claims(again.candidate_id, "late") is None
    assert {j.candidate_id for j in store.jobs_for_run(run)} == {again.candidate_id}


def test_adapters_are_claimed_per_base_model(store: StateStore) -> None:
    run_old, run_new = _run(store), _run(store)
    _finished_job(store, run_old, 0, base="base-old")
    _finished_job(store, run_new, 0, base="base-new")
    assert [r.run_id for r in store.unclaimed_adapters("en-gb-scotland", base_model="base-new")] == [run_new]
    assert sorted(r.base_model for r in store.unclaimed_adapters("en-gb-scotland")) == ["base-new", "base-old"]


def test_a_job_finishing_after_its_run_was_cancelled_is_discarded(store: StateStore) -> None:
    run_id = _run(store)
    store.record_job_started(run_id, 0)
    store.transition_run(run_id, "active", "cancelled", "cancelled by user")
    job = store.record_job_finished(run_id, 0, "succeeded", checkpoint_path="/ckpt/late", sha256="x")
    assert job.status == "discarded" and "never merged" in (job.error or "")
    assert job.checkpoint_path == "/ckpt/late"  # recorded
    assert store.unclaimed_adapters("en-gb-scotland") == []
    assert store.get_run(run_id).last_finished_job is None


def test_a_search_trial_that_did_not_complete_never_reaches_a_candidate(store: StateStore) -> None:
    """A failed trial's job that succeeds after the search completed (its worker outlived the
    verdict) stays out: only a completed trial of a completed search contributes."""
    search = _run(store, kind="hyperparameter")
    won, lost = (_run(store, parent_run_id=search, trial_number=n) for n in (0, 1))
    _finished_job(store, won, 0)
    assert store.transition_run(won, "active", "completed")
    store.record_job_started(lost, 0)
    assert store.transition_run(lost, "active", "failed", "job 0 lost its heartbeat")
    assert store.transition_run(search, "active", "completed", "best trial 0")
    _finished_job(store, lost, 0)  # the late success
    assert [(a.run_id, a.job_index) for a in store.unclaimed_adapters("en-gb-scotland")] == [(won, 0)]


@pytest.mark.postgres
def test_a_job_completing_during_a_cancel_waits_for_it_and_is_discarded(postgres_url: str) -> None:
    """Connection 1 cancels the run and holds its row; connection 2 (the worker) records the job's
    success meanwhile: it must wait for the cancel and see it, not read the old 'active'."""
    import sqlalchemy as sa

    from mloc_dagster.core.state.schema import training_runs

    store = StateStore(postgres_url)
    run_id = _run(store)
    store.record_job_started(run_id, 0)
    cancelling, finished = threading.Event(), {}

    def worker() -> None:
        cancelling.wait(30)
        finished["job"] = store.record_job_finished(run_id, 0, "succeeded", checkpoint_path="/ckpt/0", sha256="x")

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        with store.engine.connect() as canceller, canceller.begin():
            this_run = training_runs.c.run_id == run_id
            canceller.execute(sa.select(training_runs.c.status).where(this_run).with_for_update())
            canceller.execute(training_runs.update().where(this_run).values(status="cancelled",
                                                                            status_reason="cancelled by user"))
            cancelling.set()
            wait_for_a_lock_wait(store, timeout_s=30.0)
            assert "job" not in finished  # still waiting for the cancel to commit
    finally:
        cancelling.set()
        thread.join(60)
    job = finished["job"]
    assert job.status == "discarded" and "never merged" in (job.error or "")
    assert store.get_run(run_id).last_finished_job is None  # type: ignore[union-attr]
    assert store.unclaimed_adapters("en-gb-scotland") == []
    store.close()


def test_resume_starts_a_new_generation(store: StateStore) -> None:
    run_id = _run(store)
    assert store.get_run(run_id).generation == 0
    assert store.transition_run(run_id, "active", "paused")
    assert store.transition_run(run_id, "paused", "active")
    assert store.get_run(run_id).generation == 1


def test_promotions_per_branch(store: StateStore, clock: FakeClock) -> None:
    def candidate(path: str, gate: str = "passed") -> str:
        cid = store.record_candidate(dialect="en-gb", adapter_path=path, sha256=path[-1] * 64, sources=[],
                                     trusted=True, base_model="base-1").candidate_id
        store.set_gate_result(cid, gate, None)
        return cid

    c1, c2, c3 = candidate("/c/1"), candidate("/c/2"), candidate("/c/3")
    assert store.production("en-gb") is None
    p1 = store.record_promotion("en-gb", "stable", c1)
    store.record_promotion("en-gb", "experimental", c2)
    # Same clock tick: order of promotion still decides what is in production.
    p3 = store.record_promotion("en-gb", "stable", c3)
    prod = store.production("en-gb", "stable")
    assert prod == p3 and prod.adapter_path == "/c/3" and prod.sha256 == "3" * 64  # type: ignore[union-attr]
    assert prod.base_model == "base-1"  # type: ignore[union-attr]
    assert store.production("en-gb", "experimental").candidate_id == c2  # type: ignore[union-attr]
    assert [p.promotion_id for p in store.list_promotions("en-gb", branch="stable")] == [p3.promotion_id,
                                                                                         p1.promotion_id]
    with pytest.raises(ValueError):
        store.record_promotion("en-gb", "nightly", c1)
    with pytest.raises(ValueError):
        store.record_promotion("en-029", "stable", c1)
    with pytest.raises(KeyError):
        store.record_promotion("en-gb", "stable", "cand-nope")
    with pytest.raises(ValueError, match="has not passed its gate"):
        store.record_promotion("en-gb", "stable", candidate("/c/4", gate="failed"))


# -- nodes ------------------------------------------------------------------------------------


def test_node_reputation(store: StateStore) -> None:
    assert store.node_reputation("node-x") == 1.0  # unknown nodes start trusted
    assert store.set_node_reputation("node-x", -3) == 0.0  # clamped
    assert store.set_node_reputation("node-x", 0.6) == pytest.approx(0.6)
    assert [(n.node_id, n.reputation) for n in store.list_nodes()] == [("node-x", pytest.approx(0.6))]


# -- schema and concurrency across processes --------------------------------------------------


def _construct_and_create(url: str, barrier: object, results: object) -> None:
    try:
        barrier.wait()  # type: ignore[attr-defined]
        store = StateStore(url)
        store.create_run(dialect="en-gb", dataset_version="dv", base_model_version="bm")
        store.close()
        results.put("ok")  # type: ignore[attr-defined]
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        results.put(f"{type(exc).__name__}: {exc}")  # type: ignore[attr-defined]


def _hammer(url: str, run_id: str, worker: int, n_ops: int, barrier: object, results: object) -> None:
    """One writer process: heartbeats, CAS toggles, upserts."""
    try:
        store = StateStore(url)
        store.record_job_started(run_id, worker, worker_pid=worker, worker_host="h")
        barrier.wait()  # type: ignore[attr-defined]
        toggles = beats = 0
        for i in range(n_ops):
            beats += store.heartbeat(run_id, worker, progress={"step": i})
            # Reads, then writes in one transaction: the pattern SQLite answers with an immediate
            # "database is locked" unless the transaction takes the write lock up front.
            store.record_job_started(run_id, 1000 * (worker + 1) + i, worker_pid=worker, worker_host="h")
            src, dst = ("active", "paused") if (i + worker) % 2 == 0 else ("paused", "active")
            toggles += store.transition_run(run_id, src, dst, f"w{worker}")
        store.record_job_finished(run_id, worker, "succeeded", checkpoint_path=f"/c/{worker}", sha256="x")
        store.close()
        results.put((worker, beats, toggles))  # type: ignore[attr-defined]
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        results.put(f"worker {worker}: {type(exc).__name__}: {exc}")  # type: ignore[attr-defined]


def _run_processes(target: object, arg_tuples: list[tuple]) -> list[object]:
    # spawn: nothing (connections, locks) is inherited from the pytest process.
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    barrier = ctx.Barrier(len(arg_tuples))
    procs = [ctx.Process(target=target, args=(*args, barrier, results)) for args in arg_tuples]
    for p in procs:
        p.start()
    out = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    return out


def test_schema_creation_is_idempotent_across_processes(state_url: str) -> None:
    out = _run_processes(_construct_and_create, [(state_url,)] * 4)
    assert out == ["ok"] * 4
    with StateStore(state_url) as store:  # and once more, on an existing schema
        assert len(store.list_runs()) == 4


def test_concurrent_writers_in_four_processes(state_url: str) -> None:
    n_ops = 50
    with StateStore(state_url) as store:
        run_id = _run(store)
    out = _run_processes(_hammer, [(state_url, run_id, w, n_ops) for w in range(4)])
    errors = [o for o in out if isinstance(o, str)]
    assert errors == [], errors  # in particular no "database is locked"
    rows = sorted(out)  # type: ignore[type-var]
    assert all(beats == n_ops for _, beats, _ in rows)
    with StateStore(state_url) as store:
        # Every successful CAS flipped the status once; none was lost or doubled.
        total_toggles = sum(t for _, _, t in rows)
        assert store.get_run(run_id).status == ("active" if total_toggles % 2 == 0 else "paused")
        assert total_toggles >= 1
        jobs = store.jobs_for_run(run_id)
        assert [j.status for j in jobs[:4]] == ["succeeded"] * 4 and len(jobs) == 4 + 4 * n_ops
        assert store.get_run(run_id).last_finished_job == 3


def test_sqlite_file_is_wal_and_parent_dir_created(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'nested' / 'home' / 'state.db'}"
    with StateStore(url) as store, store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
    assert (tmp_path / "nested" / "home" / "state.db").exists()


def test_resolve_state_url(monkeypatch, tmp_path) -> None:
    from mloc_dagster.core.state.engine import resolve_state_url

    monkeypatch.delenv("MLOC_DATABASE_URL", raising=False)
    assert resolve_state_url(tmp_path) == f"sqlite:///{tmp_path.resolve() / 'state.db'}"
    monkeypatch.setenv("MLOC_DATABASE_URL", "postgresql+psycopg2://u@db/mloc")
    assert resolve_state_url(tmp_path) == "postgresql+psycopg2://u@db/mloc"


def _merge_repeatedly(url: str, worker: int, barrier: object, results: object) -> None:
    """One merger process: read the unclaimed adapters, claim them as a candidate; on a conflict
    read again (what merged_candidate does)."""
    try:
        store = StateStore(url)
        barrier.wait()  # type: ignore[attr-defined]
        made = []
        for i in range(30):
            refs = store.unclaimed_adapters("en-gb-scotland")
            if not refs:
                continue
            try:
                made.append(store.record_candidate(dialect="en-gb-scotland", adapter_path=f"/c/{worker}/{i}",
                                                   sha256="x", sources=refs, trusted=True).candidate_id)
            except AdapterClaimConflict:
                pass
        store.close()
        results.put(made)  # type: ignore[attr-defined]
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        results.put(f"worker {worker}: {type(exc).__name__}: {exc}")  # type: ignore[attr-defined]


def test_concurrent_merges_never_share_or_lose_an_adapter(state_url: str) -> None:
    with StateStore(state_url) as store:
        runs = [_run(store) for _ in range(40)]
        for run_id in runs:
            _finished_job(store, run_id, 0)
    out = _run_processes(_merge_repeatedly, [(state_url, w) for w in range(4)])
    assert not [o for o in out if isinstance(o, str)], out
    with StateStore(state_url) as store:
        cands = store.list_candidates("en-gb-scotland", limit=None)
        sources = [s.key for c in cands for s in c.sources]
        assert sorted(sources) == sorted(f"{r}/0" for r in runs)  # each adapter in exactly one candidate
        for c in cands:
            assert all(store.get_job(s.run_id, s.job_index).candidate_id == c.candidate_id for s in c.sources)


def test_an_older_schema_is_migrated_in_place(tmp_path) -> None:
    import sqlalchemy as sa

    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = sa.create_engine(url)
    with engine.begin() as conn:  # the first release's training_jobs, without base_model
        conn.exec_driver_sql("CREATE TABLE training_runs (run_id VARCHAR(64) PRIMARY KEY, dialect VARCHAR(64) NOT NULL, "
                             "dataset_version VARCHAR(128) NOT NULL, base_model_version VARCHAR(128) NOT NULL, "
                             "hparams JSON NOT NULL, timebox_s INTEGER NOT NULL, max_jobs INTEGER NOT NULL, "
                             "candidate_every INTEGER NOT NULL, status VARCHAR(16) NOT NULL, status_reason TEXT, "
                             "last_finished_job INTEGER, created_at DATETIME NOT NULL, updated_at DATETIME NOT NULL)")
        conn.exec_driver_sql("INSERT INTO training_runs VALUES ('tr-old', 'en-gb', 'dv', 'bm', '{}', 60, 2, 2, "
                             "'active', NULL, NULL, '2025-01-01 00:00:00', '2025-01-01 00:00:00')")
    engine.dispose()
    with StateStore(url) as store:
        assert "training_runs.generation" in store.migrated and "training_jobs.base_model" not in store.migrated
        assert store.get_run("tr-old").generation == 0
    with StateStore(url) as store:  # idempotent
        assert store.migrated == []


def test_transient_errors_are_retried_with_backoff_then_raised() -> None:
    import sqlalchemy as sa

    from mloc_dagster.core.state.engine import retry_transient

    calls, logged, slept = [], [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise sa.exc.OperationalError("UPDATE training_jobs", {}, Exception("server closed the connection"))
        return "ok"

    assert retry_transient(flaky, log=logged.append, sleep=slept.append) == "ok"
    assert slept == [0.5, 1.0] and len(logged) == 2 and "server closed the connection" in logged[0]

    def down():
        raise sa.exc.OperationalError("UPDATE", {}, Exception("down"))

    with pytest.raises(sa.exc.OperationalError):
        retry_transient(down, attempts=3, sleep=slept.append)
    with pytest.raises(ZeroDivisionError):  # not a database error: no retry
        retry_transient(lambda: 1 / 0, sleep=slept.append)


def test_a_non_finite_number_in_a_json_column_is_stored_as_null_on_both_backends(state_url: str) -> None:
    """An unbounded norm bound (Infinity) or a CER of nothing (NaN) inside a record's JSON must not
    fail the write: PostgreSQL's json type refuses those tokens (a candidate job failed so on
    Postgres before); both backends store null."""
    with StateStore(state_url) as store:
        run_id = store.create_run(dialect="en-gb-scotland", dataset_version="/d", base_model_version="/m",
                                  hparams={"lr": 0.01, "bounds": {"head": float("inf")}, "cer": [float("nan"), 0.5]}).run_id
        assert store.get_run(run_id).hparams == {"lr": 0.01, "bounds": {"head": None}, "cer": [None, 0.5]}
