"""Hyper-parameter search over chained training jobs: an Optuna study in the project's database.

The plain core of the ``hyperparameter`` run kind (no Dagster here). A search is an Optuna study
whose trials are training runs of kind ``single``; each trial is a chain of timeboxed jobs, and
**one job is one unit of resource**: after every job the caller reports the trial's dev CER, and
the pruner decides whether the next job is worth requesting.

**Where the study lives.** ``optuna.storages.RDBStorage`` on the same SQLAlchemy URL as the state
store (``core.state.StateStore``), SQLite or PostgreSQL. Optuna's tables (``studies``, ``trials``,
``trial_values``, ``trial_intermediate_values``, ``version_info``, ``alembic_version``, ...) share no
name with the state store's (``training_runs``, ``training_jobs``, ``round_slices``, ``candidates``,
``promotions``, ``nodes``), so both sit in one file/database side by side (checked by the tests).
The study's name is the search's run id; its configuration (space, trials, jobs, pruner, seed) is a
study user attribute (JSON), so a new ``Search.open(url, run_id)`` after a daemon restart sees the
same trials, the same per-job dev CERs and the same pruning decisions. Nothing is pickled.

**Sampler.** TPE by default (``constant_liar`` so parallel trials do not all sample the same
point), re-seeded at every ``ask`` with ``seed + number of trials so far``: the sample depends on
the study's history only, never on how often the process restarted. ``sampler="random"`` is the
baseline.

**Pruner.** Asynchronous successive halving (ASHA, ``SuccessiveHalvingPruner``) with
``min_resource=1`` job and ``reduction_factor=3``: rungs after job 1, 3, 9, ...; at a rung a trial
continues only when its dev CER is in the best third of the trials that reached that rung (while
fewer than three have, only the best so far continues). Why ASHA and not the median rule: with
hour-long jobs and 3-10 jobs per trial the saving must come from the *first* job, and the median
rule stops at most half of the trials there (≤ 1.5× less compute on a 3-job budget), ASHA two
thirds; it is asynchronous (no waiting for a full rung, trials run at any parallelism), and it
needs no warm-up count of trials. ``pruner="median"`` (``MedianPruner``: 2 start-up trials, judged
from job 1) and ``pruner="none"`` are there to compare. A trial is never pruned at its last job:
the job is paid for, the caller finishes it.

**Two stores, one order.** A trial is asked here first (Optuna's ``trials`` table, RUNNING, with
its sampled hparams) and its training run is written by the caller afterwards, named by the trial
number. A crash between the two leaves a running trial without a run: ``running()`` lists what the
caller must reconcile, and everything needed to write the run again is in the study.

**Rules the caller relies on.** Everything minimises dev CER. ``report`` stores the job's dev CER
as the trial's intermediate value at step ``job_index + 1`` (jobs done) and, when the pruner says
stop, marks the trial PRUNED itself, so the decision is taken once and persists; reporting the
same job again returns the stored decision. ``finish``/``prune``/``fail`` are idempotent.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

CONFIG_ATTR = "mloc_search"  # study user attribute holding SearchConfig as JSON
PRUNERS = ("asha", "median", "none")
SAMPLERS = ("tpe", "random")
STATE_WORDS = {TrialState.RUNNING: "running", TrialState.WAITING: "pending", TrialState.COMPLETE: "completed",
               TrialState.PRUNED: "pruned", TrialState.FAIL: "failed"}


class SearchSpaceError(ValueError):
    """A search space the user must fix; the message names the key and what was expected."""


class SearchError(ValueError):
    """A call that does not fit the search's state (unknown trial, job out of range, ...)."""


# -- the space ------------------------------------------------------------------------------------

SearchSpace = dict[str, BaseDistribution]


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _range(key: str, low: Any, high: Any, log: bool) -> BaseDistribution:
    """``[low, high]`` or ``[low, high, "log"]``: ints when both bounds are ints, else floats."""
    shown = f"[{low}, {high}{', log' if log else ''}]"
    if low >= high:
        raise SearchSpaceError(f"{key}: range {shown} needs low < high")
    if log and low <= 0:
        raise SearchSpaceError(f"{key}: log range {shown} needs low > 0")
    if isinstance(low, int) and isinstance(high, int):
        return IntDistribution(low, high, log=log)
    return FloatDistribution(float(low), float(high), log=log)


def _distribution(key: str, value: Any) -> BaseDistribution:
    expected = 'a range [low, high] or [low, high, "log"], or a list of at least 2 choices'
    if not isinstance(value, list) or not value:
        raise SearchSpaceError(f"{key}: expected {expected}, got {value!r}")
    if len(value) == 2 and all(_is_number(v) for v in value):
        return _range(key, value[0], value[1], log=False)
    if len(value) == 3 and value[2] == "log" and all(_is_number(v) for v in value[:2]):
        return _range(key, value[0], value[1], log=True)
    if len(value) < 2:
        raise SearchSpaceError(f"{key}: expected {expected}; a fixed value belongs in the run's hparams, got {value!r}")
    bad = [v for v in value if not (v is None or isinstance(v, bool | int | float | str))]
    if bad:
        raise SearchSpaceError(f"{key}: choices must be numbers, strings or booleans, got {bad[0]!r}")
    if len(set(map(json.dumps, value))) < len(value):
        raise SearchSpaceError(f"{key}: choices {value!r} repeat a value")
    return CategoricalDistribution(value)


def _extremes(dist: BaseDistribution) -> list[Any]:
    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)
    return [dist.low, dist.high]  # type: ignore[attr-defined]


def parse_space(raw: str | Mapping[str, Any], allowed: Iterable[str],
                validate: Callable[[dict[str, Any]], Any] | None = None) -> SearchSpace:
    """The search space of ``raw`` (JSON text or a dict) as Optuna distributions, by hparam name.

    Rules: a non-empty JSON object; every key one of ``allowed`` (the hparams a training job
    takes: the lead passes ``assets/tracks.py: Track.hparam_keys``); each value a numeric range
    ``[low, high]`` / ``[low, high, "log"]`` (int when both bounds are ints) or a list of at least 2
    distinct scalar choices (any list that is not a range). ``validate`` (e.g.
    ``assets.adapters.validate_hparams``) is called with ``{key: v}`` for both bounds and every
    choice, so a value of the wrong type for the training job (``r: [0.5, 2.5]``) is refused here,
    not in the trial's first job. Anything else is a ``SearchSpaceError`` naming the key.
    """
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise SearchSpaceError(f"search space is not valid JSON: {exc}") from exc
    if not isinstance(raw, Mapping):
        raise SearchSpaceError(f'search space must be a JSON object like {{"lr": [1e-4, 1e-2, "log"]}}, got {raw!r}')
    if not raw:
        raise SearchSpaceError("search space is empty: give at least one hparam to search")
    allowed = sorted(allowed)
    space: SearchSpace = {}
    for key, value in raw.items():
        if key not in allowed:
            raise SearchSpaceError(f"unknown hparam {key!r} in the search space; allowed: {', '.join(allowed)}")
        space[key] = _distribution(key, value)
        for v in _extremes(space[key]) if validate else []:
            try:
                validate({key: v})
            except (ValueError, TypeError) as exc:
                raise SearchSpaceError(f"{key}: {v!r} is not a valid value for the training job: {exc}") from exc
    return space


def space_json(space: SearchSpace) -> dict[str, list]:
    """The space back in the issue's format (what ``parse_space`` reads)."""
    out: dict[str, list] = {}
    for key, d in space.items():
        if isinstance(d, CategoricalDistribution):
            out[key] = list(d.choices)
        else:
            out[key] = [d.low, d.high, "log"] if d.log else [d.low, d.high]  # type: ignore[attr-defined]
    return out


# -- the search ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SearchConfig:
    """What a search is: stored with the study, so opening it needs only the URL and the run id."""

    space: dict[str, list]  # the format, already validated
    trials: int  # trials to start in total
    jobs: int  # jobs per trial (the budget of a trial that is never pruned)
    parallelism: int = 1  # trials in flight at once
    seed: int = 0
    sampler: str = "tpe"
    pruner: str = "asha"
    reduction_factor: int = 3  # ASHA: the best 1/reduction_factor of a rung continues
    min_jobs: int = 1  # ASHA: first rung after this many jobs; median: no pruning before it

    def __post_init__(self) -> None:
        if self.trials < 1 or self.jobs < 1 or self.parallelism < 1 or self.min_jobs < 1:
            raise SearchError(f"trials, jobs, parallelism and min_jobs must be >= 1: {self}")
        if self.sampler not in SAMPLERS:
            raise SearchError(f"sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if self.pruner not in PRUNERS:
            raise SearchError(f"pruner must be one of {', '.join(PRUNERS)}, got {self.pruner!r}")
        if self.reduction_factor < 2:
            raise SearchError(f"reduction_factor must be >= 2: {self}")


@dataclass
class TrialSummary:
    """One trial as status and the UI show it."""

    trial: int
    state: str  # running | completed | pruned | failed | pending
    hparams: dict[str, Any]
    dev_cer_per_job: list[float] = field(default_factory=list)
    dev_cer: float | None = None  # the final value (completed), the last reported one otherwise
    pruned_at_job: int | None = None  # job index after which the trial was stopped
    reason: str | None = None  # why it stopped, in words

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _storage(url: str) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage on the state store's URL; SQLite waits for the lock like the store."""
    kwargs = {"connect_args": {"timeout": 30}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)


class Search:
    """An Optuna study of one search, by run id, in the project's database (ask-and-tell)."""

    def __init__(self, storage: optuna.storages.RDBStorage, run_id: str, config: SearchConfig) -> None:
        self.storage, self.run_id, self.config = storage, run_id, config
        self.space = parse_space(config.space, config.space)
        self._study = self._load(seed=config.seed)

    @classmethod
    def create(cls, url: str, run_id: str, config: SearchConfig) -> Search:
        """Create the study (or open it when a search of that id exists with the same config)."""
        storage = _storage(url)
        study = optuna.create_study(storage=storage, study_name=run_id, direction="minimize", load_if_exists=True)
        stored = study.user_attrs.get(CONFIG_ATTR)
        if stored is None:
            study.set_user_attr(CONFIG_ATTR, asdict(config))
        elif stored != json.loads(json.dumps(asdict(config))):
            raise SearchError(f"search {run_id!r} exists with another configuration: {stored}")
        return cls(storage, run_id, config)

    @classmethod
    def open(cls, url: str, run_id: str) -> Search:
        """The search of ``run_id`` as stored (after a restart, from another process)."""
        storage = _storage(url)
        try:
            study = optuna.load_study(study_name=run_id, storage=storage)
        except KeyError as exc:
            # not the URL: a PostgreSQL URL may carry a password
            raise SearchError(f"no search {run_id!r} in the project database") from exc
        return cls(storage, run_id, SearchConfig(**study.user_attrs[CONFIG_ATTR]))

    def close(self) -> None:
        """Release the database connections (a sensor opens a search per tick)."""
        self.storage.engine.dispose()

    def __enter__(self) -> Search:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- building blocks --

    def _sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        if self.config.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        startup = max(2, min(10, self.config.trials // 3))  # TPE needs a few random points first
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, constant_liar=True)

    def _pruner(self) -> optuna.pruners.BasePruner:
        c = self.config
        if c.pruner == "asha":
            return optuna.pruners.SuccessiveHalvingPruner(min_resource=c.min_jobs, reduction_factor=c.reduction_factor)
        if c.pruner == "median":
            return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=c.min_jobs - 1)
        return optuna.pruners.NopPruner()

    def _load(self, seed: int) -> optuna.Study:
        return optuna.load_study(study_name=self.run_id, storage=self.storage,
                                 sampler=self._sampler(seed), pruner=self._pruner())

    def _trials(self) -> list[optuna.trial.FrozenTrial]:
        return self._study.get_trials(deepcopy=False)

    def _frozen(self, trial_number: int) -> optuna.trial.FrozenTrial:
        for t in self._trials():
            if t.number == trial_number:
                return t
        raise SearchError(f"search {self.run_id!r} has no trial {trial_number}")

    def _live(self, trial_number: int) -> optuna.trial.Trial:
        study_id = self.storage.get_study_id_from_name(self.run_id)
        return optuna.trial.Trial(self._study, self.storage.get_trial_id_from_study_id_trial_number(study_id, trial_number))

    # -- the calls a sensor makes --

    def open_slots(self) -> int:
        """How many new trials may be asked now: the parallelism left, within the trial budget."""
        trials = self._trials()
        running = sum(t.state == TrialState.RUNNING for t in trials)
        return max(0, min(self.config.parallelism - running, self.config.trials - len(trials)))

    def done(self) -> bool:
        """All trials started and none running: the search has its result (``best``)."""
        trials = self._trials()
        return len(trials) >= self.config.trials and all(t.state.is_finished() for t in trials)

    def running(self) -> dict[int, dict[str, Any]]:
        """The trials Optuna holds as running, by number, with their sampled hparams: what the
        caller reconciles with its own records (a trial asked, its run never written)."""
        return {t.number: dict(t.params) for t in self._trials() if t.state == TrialState.RUNNING}

    def has_trial(self, trial_number: int) -> bool:
        return any(t.number == trial_number for t in self._trials())

    def ask(self, validate: Callable[[dict[str, Any]], Any] | None = None) -> tuple[int, dict[str, Any]]:
        """Start a trial: its number and sampled hparams (JSON types: ints stay ints).

        ``validate`` (the training job's rule) checks the sample; a refused sample fails the trial
        and raises ``SearchSpaceError``. Raises ``SearchError`` past the trial budget.
        """
        n = len(self._trials())
        if n >= self.config.trials:
            raise SearchError(f"search {self.run_id!r} has started all its {self.config.trials} trials")
        study = self._load(seed=self.config.seed + n)
        trial = study.ask(self.space)
        hparams = dict(trial.params)
        if validate is not None:
            try:
                validate(hparams)
            except (ValueError, TypeError) as exc:
                self.fail(trial.number, f"sampled hparams refused: {exc}")
                raise SearchSpaceError(f"sampled hparams {hparams} refused by the training job: {exc}") from exc
        return trial.number, hparams

    def report(self, trial_number: int, job_index: int, dev_cer: float) -> bool:
        """Record job ``job_index``'s dev CER; True: prune (the trial is marked PRUNED already).

        Never True after the trial's last job. A job reported again returns the stored decision.
        """
        if not 0 <= job_index < self.config.jobs:
            raise SearchError(f"job {job_index} is outside the search's {self.config.jobs} jobs per trial")
        frozen = self._frozen(trial_number)
        step = job_index + 1
        if frozen.state.is_finished() or step in frozen.intermediate_values:
            return frozen.state == TrialState.PRUNED and frozen.user_attrs.get("pruned_at_job") == job_index
        live = self._live(trial_number)
        live.report(float(dev_cer), step)
        if step >= self.config.jobs or not live.should_prune():
            return False
        self._tell_pruned(trial_number, job_index, "pruned: dev CER not among the best at this job")
        return True

    def _tell_pruned(self, trial_number: int, job_index: int | None, reason: str) -> None:
        live = self._live(trial_number)
        if job_index is not None:
            live.set_user_attr("pruned_at_job", job_index)
        live.set_user_attr("reason", reason)
        self._study.tell(trial_number, state=TrialState.PRUNED, skip_if_finished=True)

    def finish(self, trial_number: int, dev_cer: float) -> None:
        """The trial ran all its jobs: its value is the last job's dev CER."""
        if not self._frozen(trial_number).state.is_finished():
            self._study.tell(trial_number, float(dev_cer), skip_if_finished=True)

    def prune(self, trial_number: int, reason: str = "stopped by the user") -> None:
        """Stop a trial from outside the pruner (cancelled run); it counts with its last dev CER."""
        frozen = self._frozen(trial_number)
        if not frozen.state.is_finished():
            last = max(frozen.intermediate_values, default=None)
            self._tell_pruned(trial_number, None if last is None else last - 1, reason)

    def fail(self, trial_number: int, reason: str) -> None:
        """The trial's run failed (after its retries); it never becomes the best."""
        if not self._frozen(trial_number).state.is_finished():
            self._live(trial_number).set_user_attr("reason", reason)
            self._study.tell(trial_number, state=TrialState.FAIL, skip_if_finished=True)

    def best(self) -> tuple[int, dict[str, Any], float] | None:
        """The completed trial with the lowest final dev CER: (number, hparams, dev CER); None if
        no trial has completed. Pruned trials never win: their adapter saw fewer jobs."""
        done = [t for t in self._trials() if t.state == TrialState.COMPLETE and t.value is not None]
        if not done:
            return None
        t = min(done, key=lambda t: (t.value, t.number))
        return t.number, dict(t.params), float(t.value)

    def summary(self) -> list[TrialSummary]:
        """Every trial, by number: state in words, hparams, dev CER per job, where it stopped."""
        out = []
        for t in sorted(self._trials(), key=lambda t: t.number):
            curve = [t.intermediate_values[s] for s in sorted(t.intermediate_values)]
            value = t.value if t.state == TrialState.COMPLETE else (curve[-1] if curve else None)
            out.append(TrialSummary(trial=t.number, state=STATE_WORDS.get(t.state, t.state.name.lower()),
                                    hparams=dict(t.params), dev_cer_per_job=curve, dev_cer=value,
                                    pruned_at_job=t.user_attrs.get("pruned_at_job"), reason=t.user_attrs.get("reason")))
        return out
