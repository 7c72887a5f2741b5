"""The search core on a real Optuna study in the state store's database (SQLite and PostgreSQL).

No training here: trials follow deterministic learning curves, a function of the sampled hparams
and the job index, so the pruning assertions do not depend on the machine.
"""

from __future__ import annotations

import math

import pytest
import sqlalchemy as sa
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from mloc_dagster.core.search.study import Search, SearchConfig, SearchError, SearchSpaceError, parse_space, space_json

ALLOWED = ("alpha", "batch_size", "dropout", "lr", "r", "seed", "target_modules", "warmup_steps")
SPACE = {"lr": [1e-4, 1e-1, "log"], "r": [4, 8, 16]}


def curve(hparams: dict, job: int) -> float:
    """Dev CER after job ``job``: best near lr = 3e-3, larger r slightly better, falling per job."""
    distance = abs(math.log10(hparams["lr"]) - math.log10(3e-3))
    return 0.2 + 0.25 * distance + 0.02 * (16 - hparams["r"]) / 12 + 0.3 / (job + 1)


def run_search(search: Search) -> None:
    """The sensor's loop, sequentially: ask, report job by job, finish unless pruned."""
    while search.open_slots():
        number, hparams = search.ask()
        for job in range(search.config.jobs):
            cer = curve(hparams, job)
            if search.report(number, job, cer):
                break
        else:
            search.finish(number, cer)


# -- parsing --------------------------------------------------------------------------------------

def test_parse_space_maps_ranges_and_choices():
    space = parse_space('{"lr": [1e-4, 1e-2, "log"], "r": [4, 8, 16], "warmup_steps": [0, 40], '
                        '"dropout": [0.0, 0.3], "target_modules": ["q", "v"]}', ALLOWED)
    assert space["lr"] == FloatDistribution(1e-4, 1e-2, log=True)
    assert space["r"] == CategoricalDistribution([4, 8, 16])
    assert space["warmup_steps"] == IntDistribution(0, 40)
    assert space["dropout"] == FloatDistribution(0.0, 0.3)
    assert space["target_modules"] == CategoricalDistribution(["q", "v"])
    assert parse_space(space_json(space), ALLOWED) == space


@pytest.mark.parametrize("raw, message", [
    ("{}", "search space is empty"),
    ("", "not valid JSON"),
    ('{"lr": [1e-4, 1e-2, "log"]', "not valid JSON"),
    ('[["lr", 1]]', "must be a JSON object"),
    ('{"lr": [1e-2, 1e-4]}', "lr: range [0.01, 0.0001] needs low < high"),
    ('{"r": [8, 8]}', "r: range [8, 8] needs low < high"),
    ('{"lr": [0, 1e-2, "log"]}', "lr: log range [0, 0.01, log] needs low > 0"),
    ('{"lr": [-1, 1e-2, "log"]}', "lr: log range"),
    ('{"learning_rate": [1e-4, 1e-2]}', "unknown hparam 'learning_rate' in the search space; allowed: alpha, batch_size"),
    ('{"lr": 0.01}', "lr: expected a range [low, high]"),
    ('{"lr": []}', "lr: expected a range"),
    ('{"r": [8]}', "a fixed value belongs in the run's hparams"),
    ('{"r": [4, 4, 8]}', "r: choices [4, 4, 8] repeat a value"),
    ('{"target_modules": [["q"], ["v"]]}', "target_modules: choices must be numbers, strings or booleans"),
])
def test_parse_space_refuses_bad_input_naming_the_key(raw, message):
    with pytest.raises(SearchSpaceError) as err:
        parse_space(raw, ALLOWED)
    assert message in str(err.value)


def test_parse_space_checks_value_types_with_the_training_jobs_rule():
    def validate(hparams):  # stands in for assets.adapters.validate_hparams
        if "r" in hparams and not isinstance(hparams["r"], int):
            raise ValueError(f"r: must be an integer (got {hparams['r']!r})")

    with pytest.raises(SearchSpaceError, match=r"r: 0.5 is not a valid value for the training job: r: must be an integer"):
        parse_space({"r": [0.5, 2.5]}, ALLOWED, validate=validate)
    assert parse_space({"r": [2, 32]}, ALLOWED, validate=validate) == {"r": IntDistribution(2, 32)}


def test_config_is_checked():
    with pytest.raises(SearchError, match="pruner must be one of"):
        SearchConfig(space=SPACE, trials=4, jobs=3, pruner="hyperband-ish")
    with pytest.raises(SearchError, match=">= 1"):
        SearchConfig(space=SPACE, trials=0, jobs=3)


# -- the study in the project's database -----------------------------------------------------------

def test_optuna_tables_sit_beside_the_state_store(state_url):
    from mloc_dagster.core.state import StateStore

    store = StateStore(state_url)
    with Search.create(state_url, "run-1", SearchConfig(space=SPACE, trials=2, jobs=2)) as search:
        number, _ = search.ask()
        search.report(number, 0, 0.5)
    store.close()
    store = StateStore(state_url)  # re-opening migrates nothing and trips over nothing
    tables = set(sa.inspect(sa.create_engine(state_url)).get_table_names())
    assert {"training_runs", "training_jobs", "nodes"} <= tables
    assert {"studies", "trials", "trial_intermediate_values", "version_info"} <= tables
    store.close()


def test_study_survives_a_restart(state_url):
    config = SearchConfig(space=SPACE, trials=4, jobs=3, parallelism=2, seed=7)
    first = Search.create(state_url, "run-restart", config)
    a, hp_a = first.ask()
    b, _ = first.ask()
    assert first.open_slots() == 0  # parallelism 2
    first.report(a, 0, 0.6)
    first.report(a, 1, 0.5)
    first.report(b, 0, 0.9)
    del first

    again = Search.open(state_url, "run-restart")  # a new process: URL and run id only
    assert again.config == config
    rows = {t.trial: t for t in again.summary()}
    assert rows[a].dev_cer_per_job == [0.6, 0.5] and rows[a].hparams == hp_a and rows[a].state == "running"
    assert rows[b].state in ("running", "pruned")
    assert again.report(a, 1, 0.5) is False  # the same job again: the stored decision, nothing new
    again.finish(a, again.report(a, 2, 0.4) or 0.4)
    again.finish(a, 0.4)  # idempotent
    assert again.best() == (a, hp_a, 0.4)
    # create() on an existing id opens it; with another config it refuses
    assert Search.create(state_url, "run-restart", config).best() == (a, hp_a, 0.4)
    with pytest.raises(SearchError, match="another configuration"):
        Search.create(state_url, "run-restart", SearchConfig(space=SPACE, trials=9, jobs=3))
    with pytest.raises(SearchError, match="no search 'nope'"):
        Search.open(state_url, "nope")


def test_sampling_depends_on_history_not_on_restarts(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    config = SearchConfig(space=SPACE, trials=3, jobs=1, seed=3)
    one = Search.create(url, "a", config)
    first = [one.ask()[1] for _ in range(3)]
    two = Search.create(f"sqlite:///{tmp_path / 't.db'}", "a", config)
    second = []
    for _ in range(3):
        second.append(two.ask()[1])
        two = Search.open(f"sqlite:///{tmp_path / 't.db'}", "a")  # a restart after every ask
    assert first == second
    assert len({(h["lr"], h["r"]) for h in first}) == 3


# -- pruning ----------------------------------------------------------------------------------------

def test_asha_prunes_bad_trials_early_and_best_is_the_best_finished(state_url):
    search = Search.create(state_url, "run-asha", SearchConfig(space=SPACE, trials=8, jobs=3, seed=0))
    run_search(search)
    rows = search.summary()
    assert len(rows) == 8 and search.done()
    pruned = [t for t in rows if t.state == "pruned"]
    assert pruned and all(t.pruned_at_job is not None and t.pruned_at_job < 2 for t in pruned)
    assert all(len(t.dev_cer_per_job) == t.pruned_at_job + 1 for t in pruned)
    completed = [t for t in rows if t.state == "completed"]
    assert completed and all(len(t.dev_cer_per_job) == 3 for t in completed)
    number, hparams, cer = search.best()
    winner = min(completed, key=lambda t: t.dev_cer)
    assert (number, hparams, cer) == (winner.trial, winner.hparams, winner.dev_cer)
    assert cer == pytest.approx(curve(hparams, 2))
    # jobs spent: fewer than trials x jobs
    assert sum(len(t.dev_cer_per_job) for t in rows) < 8 * 3


def test_median_and_no_pruner(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    median = Search.create(url, "median", SearchConfig(space=SPACE, trials=6, jobs=3, pruner="median"))
    run_search(median)
    assert any(t.state == "pruned" for t in median.summary())
    none = Search.create(url, "none", SearchConfig(space=SPACE, trials=6, jobs=3, pruner="none"))
    run_search(none)
    assert all(t.state == "completed" for t in none.summary())


def test_never_pruned_at_the_last_job_and_outside_calls(tmp_path):
    search = Search.create(f"sqlite:///{tmp_path / 's.db'}", "r", SearchConfig(space=SPACE, trials=3, jobs=1))
    a, _ = search.ask()
    search.finish(a, 0.1)
    b, _ = search.ask()
    assert search.report(b, 0, 0.9) is False  # worse, but its only job is paid for
    with pytest.raises(SearchError, match="outside the search's 1 jobs"):
        search.report(b, 1, 0.9)
    search.prune(b, "cancelled by the user")
    c, _ = search.ask()
    search.fail(c, "job 0 failed 3 times: CUDA out of memory")
    rows = {t.trial: t for t in search.summary()}
    assert (rows[b].state, rows[b].reason, rows[b].pruned_at_job) == ("pruned", "cancelled by the user", 0)
    assert (rows[c].state, rows[c].reason) == ("failed", "job 0 failed 3 times: CUDA out of memory")
    assert search.best()[0] == a and search.done() and search.open_slots() == 0
    with pytest.raises(SearchError, match="started all its 3 trials"):
        search.ask()
    with pytest.raises(SearchError, match="no trial 9"):
        search.report(9, 0, 0.1)


def test_ask_refuses_samples_the_training_job_refuses(tmp_path):
    search = Search.create(f"sqlite:///{tmp_path / 's.db'}", "v", SearchConfig(space={"r": [4, 8]}, trials=2, jobs=1))

    def validate(hparams):
        raise ValueError("r: too small")

    with pytest.raises(SearchSpaceError, match="refused by the training job: r: too small"):
        search.ask(validate=validate)
    assert search.summary()[0].state == "failed" and search.best() is None


def test_running_trials_survive_a_restart_with_their_hparams(tmp_path):
    """What the sensor reconciles after a crash between asking a trial and writing its run."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    search = Search.create(url, "c", SearchConfig(space=SPACE, trials=3, jobs=2, parallelism=2))
    a, hparams_a = search.ask()
    b, _ = search.ask()
    search.finish(b, 0.3)
    search.close()
    with Search.open(url, "c") as again:  # a new process
        assert again.running() == {a: hparams_a} and isinstance(again.running()[a]["r"], int)
        assert again.has_trial(a) and again.has_trial(b) and not again.has_trial(7)
        assert again.open_slots() == 1  # the running trial still holds its slot
