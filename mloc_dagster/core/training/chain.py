"""What a training run needs next. Pure decisions over the state store's records; no Dagster.

A run is a chain of jobs 0..max_jobs-1. After job i succeeds, job i+1 is due while the run is
active; a candidate is due after every ``candidate_every``-th job and after the last one (not for
the trials of a hyperparameter search: the search requests one from its best trial). The
sensor turns these decisions into Dagster run requests whose run keys name the unit of work, so a
decision taken twice still launches once (``jobs.chain_run_key``).
"""

from __future__ import annotations

from dataclasses import dataclass

from mloc_dagster.core.state.runs import TrainingRun
from mloc_dagster.core.state.schema import ACTIVE


@dataclass(frozen=True)
class Due:
    kind: str  # "train" | "candidate" | "complete"
    run_id: str
    job_index: int


def is_candidate_point(run: TrainingRun, job_index: int) -> bool:
    return (job_index + 1) % run.candidate_every == 0 or job_index == run.max_jobs - 1


def next_due(run: TrainingRun, train_requested: int, candidate_requested: int) -> list[Due]:
    """Decisions for one run, given the highest job index already requested for training and
    for a candidate (-1 for none). A failed job is not requested again here: Dagster's run
    retries re-run it under the same run key."""
    if run.status != ACTIVE:
        return []
    last = -1 if run.last_finished_job is None else run.last_finished_job
    due: list[Due] = []
    # A search's trial gets no candidate of its own: the search asks for one from its best trial.
    if last >= 0 and is_candidate_point(run, last) and candidate_requested < last and run.parent_run_id is None:
        due.append(Due("candidate", run.run_id, last))
    nxt = last + 1
    if nxt < run.max_jobs:
        if train_requested < nxt:
            due.append(Due("train", run.run_id, nxt))
    else:
        due.append(Due("complete", run.run_id, last))
    return due
