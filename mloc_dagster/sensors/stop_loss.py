"""The TTS stop-loss, as the training chain applies it: a TTS run whose candidate failed its
gate (``assets/tts/candidates.py: tts_gate_report``) is paused, with the reason, and resumes only
by a user's decision (``mloc run resume``).

Identity: only candidates the run's own chain asked for count (``training_run_id``), and only
those merged in the run's current generation -- after a resume the failed candidate that paused
it is history, not a reason to pause again.

The stop-loss fails closed and stops the loss (``verdict_pending``): a TTS run's next training
job is requested only once the candidate before it has a verdict (no job trains past a candidate
nobody judged), and any run completes only once its last candidate has one. A candidate job that
ended without a verdict (crashed or canceled before its gate spoke) never counts as one: the
training chain pauses the run with the reason (``runs/verdicts.py``).
"""

import json
from pathlib import Path

import dagster as dg

from mloc_dagster.assets.tracks import track_of
from mloc_dagster.core.state import StateStore
from mloc_dagster.core.state.candidates import Candidate
from mloc_dagster.core.state.runs import TrainingRun
from mloc_dagster.core.state.schema import ACTIVE, PAUSED
from mloc_dagster.runs.verdicts import has_verdict


def gate_summary(candidate: Candidate) -> str:
    """What failed, from the gate's report (or where the report is, if it cannot be read here)."""
    try:
        report = json.loads(Path(candidate.gate_report_path or "").read_text())
        return "; ".join(f"{g['name']}: {g['description']}" for g in report["gates"] if not g["passed"]) \
            or "the gate failed"
    except (OSError, ValueError, KeyError):
        return f"see {candidate.gate_report_path}"


IN_FLIGHT = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
             dg.DagsterRunStatus.STARTED]


def newest_candidate_run(instance: dg.DagsterInstance, run: TrainingRun) -> dg.DagsterRun | None:
    """The newest Dagster run of the candidate job the run's chain asked for (a replay included)."""
    records = instance.get_run_records(
        dg.RunsFilter(job_name=track_of(run.track).candidate_job, tags={"mloc/run_id": run.run_id}),
        limit=1, order_by="create_timestamp", ascending=False)
    return records[0].dagster_run if records else None


def verdict_pending(context: dg.SensorEvaluationContext, store: StateStore, run: TrainingRun,
                    just_requested: bool) -> bool:
    """True while the candidate asked for after the run's last finished job has no verdict: it
    was requested this tick, is in flight, or ended without one (then its failure pauses the run;
    a resume requests it again)."""
    if just_requested:
        return True
    newest = newest_candidate_run(context.instance, run)
    if newest is None:
        return False
    if not newest.is_finished:
        return True
    return newest.tags.get("mloc/job_index") == str(run.last_finished_job) and not has_verdict(store, newest)


def apply_stop_loss(context: dg.SensorEvaluationContext, store: StateStore, run: TrainingRun) -> bool:
    """Pause ``run`` if its newest gated candidate of this generation failed; True if it did."""
    if not track_of(run.track).stop_loss or run.status != ACTIVE:
        return False
    for candidate in store.list_candidates(run.dialect, limit=5, training_run_id=run.run_id):
        if candidate.gate_decision not in ("passed", "failed"):
            continue  # merged, not judged yet (or released: never judged)
        if candidate.gate_decision != "failed" or (candidate.details or {}).get("run_generation") != run.generation:
            return False
        reason = (f"stop-loss: TTS candidate {candidate.candidate_id} failed its gate ({gate_summary(candidate)}); "
                  f"`mloc run resume {run.run_id}` continues the run")
        if store.transition_run(run.run_id, ACTIVE, PAUSED, reason):
            context.log.warning(f"training run {run.run_id} paused: {reason}")
            return True
        return False
    return False
