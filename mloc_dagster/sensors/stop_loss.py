"""The TTS stop-loss, as the training chain applies it: a TTS run whose candidate failed its
gate (``assets/tts_candidates.py: tts_gate_report``) is paused, with the reason, and resumes only
by a user's decision (``mloc run resume``).

Identity: only candidates the run's own chain asked for count (``training_run_id``), and only
those merged in the run's current generation -- after a resume the failed candidate that paused
it is history, not a reason to pause again. A TTS run's last candidate is judged before the run
may complete, so a failure at the end pauses the run too.
"""

import json
from pathlib import Path

import dagster as dg

from mloc_dagster.assets.tts_candidates import tts_candidate_job
from mloc_dagster.core.state import ACTIVE, PAUSED, TTS, Candidate, StateStore, TrainingRun


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


def verdict_pending(context: dg.SensorEvaluationContext, run: TrainingRun, just_requested: bool) -> bool:
    """A TTS run completes only once its last candidate's stop-loss has spoken (a failure pauses
    it instead): True while that candidate job is requested or in flight."""
    if run.track != TTS:
        return False
    return just_requested or bool(context.instance.get_run_records(
        dg.RunsFilter(job_name=tts_candidate_job.name, tags={"mloc/run_id": run.run_id}, statuses=IN_FLIGHT),
        limit=1))


def apply_stop_loss(context: dg.SensorEvaluationContext, store: StateStore, run: TrainingRun) -> bool:
    """Pause ``run`` if its newest gated candidate of this generation failed; True if it did."""
    if run.track != TTS or run.status != ACTIVE:
        return False
    for candidate in store.list_candidates(run.dialect, limit=5, training_run_id=run.run_id):
        if candidate.gate_decision is None:
            continue  # merged, not judged yet
        if candidate.gate_decision != "failed" or (candidate.details or {}).get("run_generation") != run.generation:
            return False
        reason = (f"stop-loss: TTS candidate {candidate.candidate_id} failed its gate ({gate_summary(candidate)}); "
                  f"`mloc run resume {run.run_id}` continues the run")
        if store.transition_run(run.run_id, ACTIVE, PAUSED, reason):
            context.log.warning(f"training run {run.run_id} paused: {reason}")
            return True
        return False
    return False
