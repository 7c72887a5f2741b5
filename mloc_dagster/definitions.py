"""The code location: merges each domain's Definitions, and points each asset at its source."""

import os
import warnings

import dagster as dg

from mloc_dagster.assets.candidates import gate, merge, promotion
from mloc_dagster.assets.datasets import versions as datasets
from mloc_dagster.assets.models import base_model as models
from mloc_dagster.assets.operations import reports
from mloc_dagster.assets.pool import rounds
from mloc_dagster.assets.training import adapters
from mloc_dagster.assets.tts import candidates as tts_candidates
from mloc_dagster.assets.tts import training as tts_training
from mloc_dagster.resources.artifacts import ArtifactStore
from mloc_dagster.resources.gpu import GpuArbiter
from mloc_dagster.resources.state import StateStoreResource
from mloc_dagster.runs import service as training_runs
from mloc_dagster.sensors import incoming, training_chain, watchdog


def with_code_references(merged: dg.Definitions) -> dg.Definitions:
    """The UI's asset page links each asset to the file and line that defines it (Dagster marks
    the API beta and warns on every load of the code location: that warning is not ours to act on)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.BetaWarning)
        assets = dg.with_source_code_references(list(merged.assets or []))
    return dg.Definitions(
        assets=assets, asset_checks=merged.asset_checks,
        jobs=merged.jobs, sensors=merged.sensors, schedules=merged.schedules, resources=merged.resources,
        executor=merged.executor, loggers=merged.loggers)


defs = with_code_references(dg.Definitions.merge(
    # One process per run: every step runs in the run worker itself, so a job pays the Python
    # start-up (torch, transformers, peft, dagster imports: seconds) once, not once more per step.
    # Steps of one run then run one after another; pools (`gpu`) still apply.
    dg.Definitions(executor=dg.in_process_executor),
    datasets.defs,
    models.defs,
    adapters.defs,
    rounds.defs,
    merge.defs,
    gate.defs,
    promotion.defs,
    tts_training.defs,
    tts_candidates.defs,
    reports.defs,
    training_runs.defs,
    incoming.defs,
    training_chain.defs,
    watchdog.defs,
    dg.Definitions(resources={
        "artifacts": ArtifactStore(),
        "state": StateStoreResource(),
        # CPU-only nodes lease MLOC_CPU_SLOTS "devices" (default 1: CPU training jobs serialize).
        "gpu": GpuArbiter(cpu_slots=int(os.environ.get("MLOC_CPU_SLOTS", "1"))),
    }),
))
