"""Who is served first and what a request does when no device can be had: task types and policies."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class TaskType(enum.StrEnum):
    """Kinds of GPU work in the asset graph. Any other string is accepted too (see ``policy_for``)."""

    TRAIN = "TRAIN"
    EVAL = "EVAL"
    MERGE = "MERGE"
    TTS_SYNTH = "TTS_SYNTH"
    OPTIONAL = "OPTIONAL"


class BusyPolicy(enum.StrEnum):
    """What a request does when no device can be had within ``max_wait_s`` (or the queue is full)."""

    WAIT = "WAIT"  # wait up to max_wait_s, then report TIMEOUT (or QUEUE_FULL)
    SKIP = "SKIP"  # report SKIPPED: the caller should not run the work at all
    FALLBACK_CPU = "FALLBACK_CPU"  # report FALLBACK_CPU: run on the CPU, without a lease


class Outcome(enum.StrEnum):
    ACQUIRED = "ACQUIRED"
    FALLBACK_CPU = "FALLBACK_CPU"
    SKIPPED = "SKIPPED"
    QUEUE_FULL = "QUEUE_FULL"
    TIMEOUT = "TIMEOUT"


class Reason(enum.StrEnum):
    """Why a request did not get a device; reported next to the outcome."""

    BUSY = "busy"  # max_wait_s was 0 and every device was held
    TIMEOUT = "timeout"  # waited max_wait_s
    QUEUE_FULL = "queue_full"  # queue_limit requests were already waiting
    INSUFFICIENT_MEMORY = "insufficient_memory"  # a device was free but had less than min_free_mb


@dataclass(frozen=True)
class TaskPolicy:
    """How one task type competes for devices.

    priority     0-100, higher is served first; equal priorities are served in arrival order.
    max_wait_s   how long to queue before the busy policy applies (0: decide at once).
    queue_limit  answer at once (QUEUE_FULL, or the busy policy) when this many requests already wait.
    busy_policy  WAIT -> TIMEOUT, SKIP -> SKIPPED, FALLBACK_CPU -> run on the CPU.
    max_hold_s   watchdog: a hold longer than this is logged and counted (the lease is kept:
                 killing a training step at minute 61 would waste the hour). None disables it.
    min_free_mb  a device qualifies only with this much free memory (NVML devices only).
    """

    priority: int = 50
    max_wait_s: float = 600.0
    queue_limit: int = 32
    busy_policy: BusyPolicy = BusyPolicy.WAIT
    max_hold_s: float | None = 3600.0
    min_free_mb: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "busy_policy", BusyPolicy(str(self.busy_policy).upper()))
        if not 0 <= self.priority <= 100:
            raise ValueError(f"priority must be in 0..100, got {self.priority}")
        if self.max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {self.max_wait_s}")
        if self.queue_limit < 1:
            raise ValueError(f"queue_limit must be >= 1, got {self.queue_limit}")
        if self.max_hold_s is not None and self.max_hold_s <= 0:
            raise ValueError(f"max_hold_s must be > 0 or None, got {self.max_hold_s}")
        if self.min_free_mb < 0:
            raise ValueError(f"min_free_mb must be >= 0, got {self.min_free_mb}")

    def replace(self, **changes: Any) -> TaskPolicy:
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


# Defaults for the asset graph. Training is the product: it waits its turn (a step that gives up
# after minutes would just be retried). Evaluation and merging are short and also fine on a CPU, so
# they fall back rather than sit an hour behind a training job. Optional work never waits long.
DEFAULT_POLICIES: dict[str, TaskPolicy] = {
    TaskType.TRAIN: TaskPolicy(
        priority=50,
        max_wait_s=7200.0,
        queue_limit=32,
        busy_policy=BusyPolicy.WAIT,
        max_hold_s=4200.0,
        min_free_mb=2048,
    ),
    TaskType.EVAL: TaskPolicy(
        priority=70,
        max_wait_s=60.0,
        queue_limit=32,
        busy_policy=BusyPolicy.FALLBACK_CPU,
        max_hold_s=1800.0,
        min_free_mb=1024,
    ),
    TaskType.MERGE: TaskPolicy(
        priority=60,
        max_wait_s=30.0,
        queue_limit=32,
        busy_policy=BusyPolicy.FALLBACK_CPU,
        max_hold_s=900.0,
        min_free_mb=1024,
    ),
    TaskType.TTS_SYNTH: TaskPolicy(
        priority=65,
        max_wait_s=120.0,
        queue_limit=32,
        busy_policy=BusyPolicy.FALLBACK_CPU,
        max_hold_s=1800.0,
        min_free_mb=1024,
    ),
    TaskType.OPTIONAL: TaskPolicy(
        priority=10,
        max_wait_s=1.0,
        queue_limit=4,
        busy_policy=BusyPolicy.SKIP,
        max_hold_s=600.0,
        min_free_mb=512,
    ),
}
# Unknown task types behave like a patient, mid-priority job.
OTHER_POLICY = TaskPolicy(priority=50, max_wait_s=600.0, queue_limit=32, busy_policy=BusyPolicy.WAIT)


def normalize_task_type(task_type: TaskType | str) -> str:
    name = str(task_type).strip().upper()
    if not name:
        raise ValueError("task type must be a non-empty string")
    return name


def resolve_policies(
    overrides: Mapping[str, TaskPolicy | Mapping[str, Any]] | None = None,
) -> dict[str, TaskPolicy]:
    """Defaults with per-task-type overrides; a mapping override changes only the fields it names."""
    policies = dict(DEFAULT_POLICIES)
    for name, override in (overrides or {}).items():
        key = normalize_task_type(name)
        if isinstance(override, TaskPolicy):
            policies[key] = override
        else:
            policies[key] = policies.get(key, OTHER_POLICY).replace(**dict(override))
    return policies


def policy_json(policy: TaskPolicy) -> dict[str, Any]:
    data = dataclasses.asdict(policy)
    data["busy_policy"] = policy.busy_policy.value
    return data
