"""One run's decision in a sensor tick, isolated: an error deciding it ends at that run, with the
reason, and the tick goes on with the other runs (its cursor moves).

- An invalid stored definition (hparams, a pipeline spec: written around ``mloc run start``,
  which refuses them) *fails* the run: the same row fails the same way on every tick, and
  nothing can be resumed.
- Anything else (a bug, a corrupt value the checks do not know, a file that cannot be read)
  *pauses* the run, and a search's trials or a pipeline's stage runs with it: nothing is lost,
  and ``mloc run resume`` continues once a person has looked.
"""

from collections.abc import Callable
from typing import Any, TypeVar

import dagster as dg

from mloc_dagster.assets.training.hparams import InvalidHParams
from mloc_dagster.core.state import StateStore
from mloc_dagster.core.state.schema import ACTIVE, FAILED, PAUSED
from mloc_dagster.core.training.pipeline import PipelineSpecError

DEFINITION_ERRORS = (InvalidHParams, PipelineSpecError)
T = TypeVar("T")


def isolated(context: dg.SensorEvaluationContext, store: StateStore, run_id: str | None, fallback: T,
             decide: Callable[..., T], *args: Any) -> T:
    """``decide(*args)``, or ``fallback`` when it raised and the run was failed or paused."""
    try:
        return decide(*args)
    except Exception as exc:  # noqa: BLE001 -- one run's error must never stop the others
        if run_id is None:  # a Dagster run launched by hand, outside any training run
            context.log.exception(f"could not read a Dagster run outside any training run: {exc}")
            return fallback
        if isinstance(exc, DEFINITION_ERRORS):
            if store.transition_run(run_id, (ACTIVE, PAUSED), FAILED, f"invalid run: {exc}"[:2000]):
                context.log.error(f"training run {run_id} failed: {exc}")
            return fallback
        reason = (f"the training chain could not decide on it ({type(exc).__name__}: {exc}); "
                  f"`mloc run resume {run_id}` once fixed")[:2000]
        if store.transition_run(run_id, ACTIVE, PAUSED, reason):
            for child in store.list_runs(status=ACTIVE, parent_run_id=run_id, limit=None):
                store.transition_run(child.run_id, ACTIVE, PAUSED, f"{run_id} was paused: {reason}"[:2000])
        context.log.exception(f"training run {run_id} paused: {reason}")
        return fallback
