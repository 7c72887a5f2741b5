"""Dagster's own verdicts on a run that ended badly, as the training chain reads them.

A candidate job (``candidate_job``, ``tts_candidate_job``) has a verdict when it succeeded or
when its candidate's gate decided (a failed gate fails the Dagster run on its blocking checks:
that is a decision, not a crash). One that failed for good or was canceled without a verdict
(``handle_ended_candidate``):

- its candidate, if the merge recorded one, is **released**: its adapters go back to the pool
  for the next candidate (the candidate stays, marked ``released``; nothing gates or promotes
  it). Re-gating it instead would need the job that just failed; a fresh merge on resume gates
  the same adapters (and any newer one of the run, which contains them);
- its training run, if live, is **paused** with the reason; ``mloc run resume`` requests the
  candidate job again under a new run key.

A candidate that passed its gate but whose promotion failed keeps its adapters; the run is paused
with the reason and ``mloc run replay`` of that Dagster run promotes it.
"""

import dagster as dg

from mloc_dagster.core.state import StateStore
from mloc_dagster.core.state.candidates import Candidate
from mloc_dagster.core.state.schema import ACTIVE, PAUSED


def will_retry(instance: dg.DagsterInstance, run: dg.DagsterRun) -> bool:
    """Dagster's verdict (``dagster/will_retry``, set when the run failed); computed the same way
    while the tag is not written yet."""
    tag = run.tags.get("dagster/will_retry")
    if tag is not None:
        return tag == "true"
    if not instance.run_retries_enabled or run.tags.get("dagster/retry_on_asset_or_op_failure") == "false":
        return False
    max_retries = int(run.tags.get("dagster/max_retries", instance.run_retries_max_retries))
    return int(run.tags.get("dagster/retry_number", "0")) < max_retries


def failure_reason(instance: dg.DagsterInstance, dagster_run_id: str) -> str:
    for record in instance.all_logs(dagster_run_id, of_type=dg.DagsterEventType.STEP_FAILURE)[-1:]:
        error = record.dagster_event.step_failure_data.error
        if error is not None:
            first = error.message.strip().splitlines()[0]
            # A dg.Failure's description is the message meant for users: drop the class path.
            return (first.partition(": ")[2] if error.cls_name == "Failure" else first)[:500]
    return "the Dagster run failed (see its logs)"


def merged_by(store: StateStore, run: dg.DagsterRun) -> Candidate | None:
    """The candidate a candidate-job run merged (by its root run: a re-execution keeps it)."""
    return store.candidate_of_dagster_run(run.root_run_id or run.run_id)


def has_verdict(store: StateStore, run: dg.DagsterRun) -> bool:
    """A finished candidate-job run ended with a verdict: it succeeded (promoted, or nothing new
    to merge), or its candidate's gate decided."""
    if run.status == dg.DagsterRunStatus.SUCCESS:
        return True
    candidate = merged_by(store, run)
    return candidate is not None and candidate.gate_decision in ("passed", "failed")


def release(store: StateStore, candidate: Candidate, reason: str) -> int:
    """Release an ungated candidate and its experimental companion; how many adapters went back."""
    companion = (candidate.details or {}).get("experimental_candidate")
    return sum(store.release_claims(cid, reason) or 0 for cid in filter(None, (candidate.candidate_id, companion)))


def handle_ended_candidate(context: dg.SensorEvaluationContext, store: StateStore, run: dg.DagsterRun,
                           live_ids: set[str]) -> None:
    """A candidate job that failed for good or was canceled: unless its gate spoke, release its
    candidate's adapters and pause its training run (if live) with the reason."""
    if run.status == dg.DagsterRunStatus.FAILURE and will_retry(context.instance, run):
        return
    candidate = merged_by(store, run)
    if candidate is not None and candidate.gate_decision == "failed":
        return  # the gate spoke; a TTS run's stop-loss pauses it (sensors/stop_loss.py)
    how = "was canceled" if run.status == dg.DagsterRunStatus.CANCELED else \
        f"failed ({failure_reason(context.instance, run.run_id)})"
    what = f"the candidate job after job {run.tags.get('mloc/job_index', '?')} (Dagster run {run.run_id[:8]}) {how}"
    if candidate is None:
        where, again = "before it recorded a candidate", " (it requests the candidate job again)"
    elif candidate.gate_decision == "passed":
        where = (f"after {candidate.candidate_id} passed its gate, before its promotion; "
                 f"`mloc run replay {run.run_id}` promotes it")
        again = ""
    else:
        released = release(store, candidate, f"never gated: {what}")
        where = (f"before the gate of {candidate.candidate_id} decided: it is released, its {released} adapter(s) "
                 "go into the next candidate")
        again = " (it merges and gates them again)"
        context.log.warning(f"candidate {candidate.candidate_id} released: {what}")
    training_run_id = run.tags.get("mloc/run_id")
    if training_run_id not in live_ids:
        return
    reason = f"{what}, {where}; `mloc run resume {training_run_id}` continues the run{again}"
    if store.transition_run(training_run_id, ACTIVE, PAUSED, reason):
        context.log.warning(f"training run {training_run_id} paused: {reason}")
