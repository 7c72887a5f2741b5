"""The run launcher of the pool on a Ray cluster (``deploy/ray/dagster.yaml``).

``PoolRayRunLauncher`` is dagster-ray's ``RayRunLauncher`` (every run a Ray job, placed by its
``dagster-ray/config`` tag: ``execution/ray.py``) with one rule of the pool: a chained job's run
whose node Ray no longer has alive (Dagster's retry of a job whose node died, or a run queued for a
node that left) is placed again on an available node before it is submitted (``core/pool/assign.py:
place_job``), so the retry resumes the job from its last checkpoint on the shared ``MLOC_HOME``
elsewhere. A slice keeps its node: the round replaces a silent slice itself (``sensors/rounds.py``).

Every run's entry point goes through the node's warm run worker (``execution/node_worker.py``):
forked from a process that has the heavy libraries imported, as on the embedded default; a node
without one starts the plain ``dagster api`` command.
"""

from __future__ import annotations

from dagster._core.launcher import LaunchRunContext
from dagster._core.storage.dagster_run import DagsterRun
from dagster_ray import RayRunLauncher

from mloc_dagster.core.pool.assign import place_job
from mloc_dagster.core.pool.ray_cluster import pool_ray_table
from mloc_dagster.core.state import StateStore
from mloc_dagster.core.state.engine import resolve_state_url
from mloc_dagster.execution.ray import RAY_CONFIG_TAG, node_ray_config

WARM_ENTRY = "python -m mloc_dagster.execution.node_worker run -- "


class PoolRayRunLauncher(RayRunLauncher):
    def launch_run(self, context: LaunchRunContext) -> None:
        run = context.dagster_run
        moved = self._placed_again(run)
        super().launch_run(context if moved is None else LaunchRunContext(moved, context.workspace))

    def _launch_ray_job(self, submission_id: str, entrypoint: str, run: DagsterRun):
        super()._launch_ray_job(submission_id, WARM_ENTRY + entrypoint, run)

    def _placed_again(self, run: DagsterRun) -> DagsterRun | None:
        node, run_id = run.tags.get("mloc/node"), run.tags.get("mloc/run_id")
        if not node or not run_id or "mloc/slice" in run.tags:
            return None
        table = pool_ray_table()
        if table is None or (table.get(node) is not None and table[node].alive):
            return None
        with StateStore(resolve_state_url()) as store:
            training_run = store.get_run(run_id)
            new = place_job(store, training_run, exclude={node}) if training_run is not None else None
        if new is None:
            return None
        self._instance.add_run_tags(run.run_id, {"mloc/node": new, RAY_CONFIG_TAG: node_ray_config(new),
                                                 "mloc/moved_from": node})
        self._instance.report_engine_event(f"node {node} is not alive in the Ray cluster: placed on {new}", run,
                                           cls=self.__class__)
        return self._instance.get_run_by_id(run.run_id)
