"""`mloc run replay DAGSTER_RUN_ID`: Dagster's re-execution of a failed run, from the command line.

The same GraphQL mutation the UI's "Re-execute" button sends (``launchRunReexecution``), executed
in this process against the instance and the workspace: the new run is a child of the failed one
(``dagster/parent_run_id``), with its config and tags, submitted through the instance's run
coordinator (queued; the daemon launches it). Nothing is copied by hand.

A training job of a chain whose retries were exhausted failed its training run; replaying that
job re-activates the run (failed → active, the reason recorded: ``training_runs.reactivate_run``)
right after the re-execution is queued, so the job starts on an active run and resumes from the
run's last checkpoint, and the training chain, which sees it in flight, goes on after it.
A replay that cannot continue its run (the run failed elsewhere, or was cancelled or completed)
is refused before anything is launched.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import typer

from mloc_dagster.paths import REPO

REPO_WORKSPACE = REPO / "workspace.yaml"

LAUNCH_REEXECUTION = """
mutation Replay($params: ReexecutionParams!) {
  launchRunReexecution(reexecutionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId status jobName } }
    ... on PythonError { message }
    ... on Error { message }
  }
}
"""

STRATEGIES = ("FROM_FAILURE", "ALL_STEPS", "FROM_ASSET_FAILURE")
TRAINING_JOBS = ("train_adapter_job", "tts_train_adapter_job")


class ReplayError(Exception):
    pass


def failed_chain_job(store, run) -> tuple[str, int] | None:
    """(training run id, job index) when ``run`` is the job its training run failed on: the
    replay re-activates the run. None for any other run; ReplayError when the job cannot start."""
    from mloc_dagster.core.state.schema import ACTIVE, FAILED, PAUSED

    training_run_id, index = run.tags.get("mloc/run_id"), run.tags.get("mloc/job_index")
    if run.job_name not in TRAINING_JOBS or not training_run_id or index is None or "mloc/slice" in run.tags:
        return None
    training = store.get_run(training_run_id)
    if training is None or training.status in (ACTIVE, PAUSED):
        return None  # the job starts (or refuses while paused) as any job of the chain
    if training.status != FAILED:
        raise ReplayError(f"training run {training_run_id} is {training.status}: job {index} would refuse to start; "
                          "start a new run (`mloc run start --from ...`)")
    last = -1 if training.last_finished_job is None else training.last_finished_job
    job = store.get_job(training_run_id, int(index))
    if job is None or job.status != FAILED or int(index) != last + 1:
        raise ReplayError(f"training run {training_run_id} failed ({training.status_reason}), not on job {index}: "
                          "replaying it cannot continue the run")
    return training_run_id, int(index)


def replay(instance, run_id: str, workspace: Path, strategy: str = "FROM_FAILURE", store=None) -> dict:
    """Launch the re-execution of failed run ``run_id``; returns the new run (runId, status, jobName,
    and ``reactivated``: the training run it re-activated, or None)."""
    import dagster as dg
    from dagster._core.workspace.context import WorkspaceProcessContext
    from dagster._core.workspace.load_target import WorkspaceFileTarget
    from dagster_graphql.test.utils import execute_dagster_graphql

    from mloc_dagster.assets.training.step import REPLAY_TAG

    if strategy not in STRATEGIES:
        raise ReplayError(f"strategy must be one of {', '.join(STRATEGIES)}, not {strategy!r}")
    run = instance.get_run_by_id(run_id)
    if run is None:
        raise ReplayError(f"no Dagster run {run_id} on this instance ($DAGSTER_HOME); `dagster run list` shows them")
    if run.status != dg.DagsterRunStatus.FAILURE:
        raise ReplayError(f"run {run_id} ({run.job_name}) is {run.status.value}, not FAILURE: only a failed run is "
                          "replayed (re-execute a finished one from the UI if that is really meant)")
    if run.remote_job_origin is None:
        raise ReplayError(f"run {run_id} was executed in-process (execute_in_process, tests): it has no code "
                          "location to re-execute from; launch its job again instead")
    if not workspace.is_file():
        raise ReplayError(f"no workspace file {workspace}")
    if store is None:
        from mloc_dagster.core.state import StateStore
        from mloc_dagster.core.state.engine import resolve_state_url

        store = StateStore(resolve_state_url())
    chained = failed_chain_job(store, run)
    with WorkspaceProcessContext(instance, WorkspaceFileTarget([str(workspace)])) as process_context:
        context = process_context.create_request_context()
        errors = {name: entry.load_error.message for name, entry in context.get_code_location_entries().items()
                  if entry.load_error is not None}
        if errors:
            raise ReplayError(f"the code location did not load: {errors}")
        # The job a run failed on waits for the re-activation below instead of refusing to start.
        tags = [{"key": REPLAY_TAG, "value": run_id}] if chained else []
        result = execute_dagster_graphql(context, LAUNCH_REEXECUTION, {"params": {
            "parentRunId": run_id, "strategy": strategy, "extraTags": tags}})
        if result.errors:
            raise ReplayError("; ".join(str(e) for e in result.errors))
        answer = result.data["launchRunReexecution"]
        if answer["__typename"] != "LaunchRunSuccess":
            raise ReplayError(f"{answer['__typename']}: {answer.get('message', '')}")
        # At once, not after the code server this process started has shut down (seconds).
        reactivated = chained and reactivate(store, chained, run_id, answer["run"]["runId"])
    return answer["run"] | {"reactivated": reactivated}


def reactivate(store, chained: tuple[str, int], failed_id: str, new_id: str) -> str:
    """Re-activate the training run after its job's re-execution was queued (queued first, so the
    training chain, which then sees the job in flight, never requests it a second time). Should the
    re-execution start before this, it waits for it (its ``mloc/replay_of`` tag; up to 30 s),
    and refuses only if the run stays failed."""
    from mloc_dagster.runs.service import reactivate_run

    training_run_id, index = chained
    before = store.get_run(training_run_id).status_reason
    reason = f"re-activated by `mloc run replay {failed_id}`: job {index} re-executed as {new_id} (it had failed: {before})"
    if not reactivate_run(store, training_run_id, index, reason):
        raise ReplayError(f"{new_id} was queued, but training run {training_run_id} is no longer failed: "
                          f"{store.get_run(training_run_id).status}")
    return training_run_id


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """The code server this process starts logs to the stdout it inherits: keep stdout for the run id."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def replay_command(
    dagster_run_id: str = typer.Argument(..., help="The failed Dagster run (`dagster run list`, the UI's Runs page)."),
    strategy: str = typer.Option("FROM_FAILURE", "--strategy", help="FROM_FAILURE, ALL_STEPS or FROM_ASSET_FAILURE."),
    workspace: Path = typer.Option(REPO_WORKSPACE, "--workspace", "-w", help="Workspace file of the code location."),
) -> None:
    """Re-execute a failed Dagster run with its config and tags; prints the new run id."""
    from dagster import DagsterInstance

    with DagsterInstance.get() as instance, _stdout_to_stderr():
        try:
            new = replay(instance, dagster_run_id, workspace, strategy)
        except ReplayError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from exc
    typer.echo(new["runId"])
    typer.echo(f"{new['jobName']} re-executed ({strategy}) as {new['runId']}: {new['status']}; the daemon launches it",
               err=True)
    if new["reactivated"]:
        typer.echo(f"training run {new['reactivated']} is active again; the job resumes from its last checkpoint",
                   err=True)
