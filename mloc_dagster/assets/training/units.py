"""What one run of ``train_adapter_job`` trains, and where it records itself.

- ``ChainJob``: job ``i`` of a training run -- resumes exactly from job ``i-1``'s checkpoint
  (job 0: the run's warm start, if any) and is recorded in the run's training jobs.
- ``SliceJob``: slice ``s`` of round ``k`` of a distributed run -- trains exactly its ranges of
  the run's sample stream, starting from round ``k-1``'s merged adapter (the run's job ``k-1``),
  on the node it was placed on (``mloc/node``), and is recorded in the round's slices.

Both give the asset the same few verbs (start, beat, training started and ended, succeeded, failed), so
``adapter_checkpoint`` reads as one story whichever it trains.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mloc_dagster.core.state import StateStore
from mloc_dagster.core.state.runs import TrainingRun
from mloc_dagster.core.state.schema import SUCCEEDED

# Simulated nodes on one machine (tests, benchmarks only): {"node-id": slowdown factor >= 1}.
THROTTLE_ENV = "MLOC_SIMULATED_NODE_THROTTLE"


class NotToStart(Exception):
    """The unit must not train (its round dropped or replaced it, its predecessor is missing)."""


def simulated_throttle(node_id: str) -> float:
    raw = os.environ.get(THROTTLE_ENV, "").strip()
    if not raw:
        return 1.0
    try:
        factor = float(json.loads(raw).get(node_id, 1.0))
    except (ValueError, AttributeError) as exc:
        raise ValueError(f"{THROTTLE_ENV} must be a JSON object of node id -> factor >= 1, got {raw!r}") from exc
    if not factor >= 1.0:
        raise ValueError(f"{THROTTLE_ENV}[{node_id!r}] must be >= 1, got {factor}")
    return factor


@dataclass
class ChainJob:
    store: StateStore
    run: TrainingRun
    job_index: int
    node_id: str
    adapters_dir: Path  # $MLOC_HOME/artifacts/adapters/<dialect>

    def __post_init__(self) -> None:
        self.previous = self.store.get_job(self.run.run_id, self.job_index - 1) if self.job_index > 0 else None
        if self.job_index > 0 and (self.previous is None or self.previous.checkpoint_path is None):
            raise NotToStart(f"job {self.job_index} of {self.run.run_id} needs job {self.job_index - 1}'s checkpoint")
        self.out = self.adapters_dir / self.run.run_id / f"job-{self.job_index:04d}"
        self.resume_from = self.previous.checkpoint_path if self.previous else None
        self.init_adapter = self.run.init_adapter if self.job_index == 0 else None  # warm start (--from)
        self.segments, self.throttle, self.label = None, 1.0, f"job {self.job_index}"

    def start(self, dagster_run_id: str, worker_pid: int, worker_host: str) -> None:
        self.store.record_job_started(self.run.run_id, self.job_index, dagster_run_id=dagster_run_id,
                                      node_id=self.node_id, worker_pid=worker_pid, worker_host=worker_host)

    def refuse(self, reason: str) -> None:
        self.store.mark_job_failed(self.run.run_id, self.job_index, reason)

    def beat(self, progress: dict) -> bool:
        return self.store.heartbeat(self.run.run_id, self.job_index, progress)

    def training_started(self) -> None:
        pass

    def training_ended(self) -> None:
        pass

    def failed(self, error: str) -> None:
        self.store.record_job_finished(self.run.run_id, self.job_index, "failed", error=error[:500])

    def succeeded(self, path: str, sha256: str, metrics: dict, base_model: str) -> str:
        return self.store.record_job_finished(self.run.run_id, self.job_index, SUCCEEDED, checkpoint_path=path,
                                              sha256=sha256, metrics=metrics, base_model=base_model).status

    def tags(self) -> dict[str, Any]:
        return {"job_index": self.job_index}


@dataclass
class SliceJob:
    store: StateStore
    run: TrainingRun
    round_index: int
    slice_index: int
    adapters_dir: Path

    def __post_init__(self) -> None:
        run, k = self.run, self.round_index
        placed = self.store.get_slice(run.run_id, k, self.slice_index)
        if placed is None:
            raise NotToStart(f"slice {self.slice_index} of round {k} of {run.run_id} was never placed")
        start = self.store.get_job(run.run_id, k - 1) if k > 0 else None
        if k > 0 and (start is None or start.status != SUCCEEDED or not start.checkpoint_path):
            raise NotToStart(f"round {k} of {run.run_id} needs round {k - 1}'s merged adapter")
        self.placed, self.node_id = placed, placed.node_id
        self.out = self.adapters_dir / run.run_id / f"round-{k:04d}" / f"slice-{self.slice_index:02d}"
        self.resume_from = None
        self.init_adapter = start.checkpoint_path if start else run.init_adapter
        self.segments = [tuple(s) for s in placed.segments]
        self.throttle = simulated_throttle(self.node_id)
        self.label = f"round {k} slice {self.slice_index} on {self.node_id}"

    def start(self, dagster_run_id: str, worker_pid: int, worker_host: str) -> None:
        if not self.store.record_slice_started(self.run.run_id, self.round_index, self.slice_index,
                                               dagster_run_id=dagster_run_id):
            current = self.store.get_slice(self.run.run_id, self.round_index, self.slice_index)
            raise NotToStart(f"{self.label} is {current.status if current else 'gone'} "
                             f"({current.outcome if current else ''}): not training it")

    def refuse(self, reason: str) -> None:
        pass  # stays queued: a resume re-requests it under a new run key

    def beat(self, progress: dict) -> bool:
        return self.store.heartbeat_slice(self.run.run_id, self.round_index, self.slice_index, progress)

    def training_started(self) -> None:
        self.store.slice_training_started(self.run.run_id, self.round_index, self.slice_index)

    def training_ended(self) -> None:
        self.store.slice_training_ended(self.run.run_id, self.round_index, self.slice_index)

    def failed(self, error: str) -> None:
        self.store.record_slice_finished(self.run.run_id, self.round_index, self.slice_index, "failed",
                                         error=error[:500])

    def succeeded(self, path: str, sha256: str, metrics: dict, base_model: str) -> str:
        return self.store.record_slice_finished(self.run.run_id, self.round_index, self.slice_index, SUCCEEDED,
                                                checkpoint_path=path, sha256=sha256,
                                                metrics={**metrics, "base_model": base_model}).status

    def tags(self) -> dict[str, Any]:
        return {"round": self.round_index, "slice": self.slice_index, "segments": json.dumps(self.segments)}
