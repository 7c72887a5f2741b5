"""The ``gpu`` resource: Dagster's face of the node-local GPU arbiter (``mloc_dagster.core.arbiter``).

Two layers guard the GPUs. The concurrency pool ``gpu`` caps how many GPU steps the deployment runs;
this resource then leases a concrete device on the node the step landed on, with the task type's
priority, wait limit and busy policy. The decisions live in the core; this class only turns config
into an ``Arbiter``, names the holder after the step, and writes the outcome to the step's log.

    @dg.asset(pool="gpu")
    def adapter_checkpoint(context: dg.AssetExecutionContext, gpu: GpuArbiter) -> dg.MaterializeResult:
        with gpu.lease("TRAIN", context) as lease:
            if not lease.runnable:
                raise dg.Failure(f"no GPU: {lease.outcome}", metadata=lease.metadata())
            metrics = train(device=lease.torch_device)
        return dg.MaterializeResult(metadata={**metrics, **lease.metadata()})
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field, PrivateAttr

from mloc_dagster.core.arbiter.acquire import Arbiter
from mloc_dagster.core.arbiter.lease import Lease
from mloc_dagster.core.arbiter.policy import Outcome, TaskType
from mloc_dagster.paths import MlocPaths


def default_state_dir() -> Path:
    """``MLOC_GPU_STATE_DIR`` (a pool node's own disk: `mloc node join` sets it, since a node's leases
    are its devices' and ``MLOC_HOME`` is shared), else ``$MLOC_HOME/gpu``; ``MLOC_HOME`` defaults to
    ``.mloc`` in the working directory."""
    own = os.environ.get("MLOC_GPU_STATE_DIR")
    return Path(own) if own else MlocPaths.from_env().gpu


class TaskPolicyConfig(dg.Config):
    """Overrides for one task type; fields left unset keep the built-in default for that type."""

    priority: int | None = Field(default=None, description="0-100; higher is served first.")
    max_wait_s: float | None = Field(
        default=None, description="Queue at most this long, then apply busy_policy."
    )
    queue_limit: int | None = Field(
        default=None, description="Answer at once when this many requests already wait on the node."
    )
    busy_policy: str | None = Field(default=None, description="WAIT, SKIP or FALLBACK_CPU.")
    max_hold_s: float | None = Field(
        default=None, description="Watchdog: log and count holds longer than this."
    )
    min_free_mb: int | None = Field(
        default=None, description="Only devices with this much free memory (NVML)."
    )

    def overrides(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class GpuArbiter(dg.ConfigurableResource):
    """Leases a GPU (or a CPU slot, on nodes without one) to a step, by task type policy."""

    state_dir: str | None = Field(
        default=None,
        description="Node-local directory for the lease database and metrics file. Default: $MLOC_HOME/gpu.",
    )
    simulated_devices: int = Field(
        default=0,
        description="> 0: lease this many simulated devices instead of GPUs (tests, GPU-less nodes).",
    )
    cpu_slots: int = Field(default=1, description="Devices to lease in CPU mode (no GPU or no NVML).")
    heartbeat_ttl_s: float = Field(
        default=30.0, description="A lease whose heartbeat is older than this is reclaimed."
    )
    policies: dict[str, TaskPolicyConfig] = Field(
        default_factory=dict, description="Per task type overrides, e.g. {'EVAL': {'max_wait_s': 10}}."
    )
    metrics_textfile: bool = Field(
        default=True, description="Write arbiter.prom next to the database for node-exporter."
    )

    _arbiter: Arbiter | None = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self._arbiter = self._build()

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._arbiter is not None:
            self._arbiter.close()
            self._arbiter = None

    def _build(self) -> Arbiter:
        return Arbiter(
            Path(self.state_dir) if self.state_dir else default_state_dir(),
            simulated_devices=self.simulated_devices,
            cpu_slots=self.cpu_slots,
            heartbeat_ttl_s=self.heartbeat_ttl_s,
            policies={name: policy.overrides() for name, policy in self.policies.items()},
            metrics_textfile=self.metrics_textfile,
        )

    @property
    def arbiter(self) -> Arbiter:
        # Built lazily too, so the resource also works when called outside a Dagster run.
        if self._arbiter is None:
            self._arbiter = self._build()
        return self._arbiter

    @contextmanager
    def lease(
        self,
        task_type: TaskType | str,
        context: dg.OpExecutionContext | dg.AssetExecutionContext | None = None,
        *,
        holder: str | None = None,
        **overrides: Any,
    ) -> Iterator[Lease]:
        """Acquire a device for ``task_type`` for the duration of the ``with`` block.

        Always yields the Lease, whatever its outcome: the asset decides what SKIPPED, TIMEOUT or
        QUEUE_FULL mean for it (raise ``dg.Failure``, skip, or run on ``lease.torch_device``).
        Keyword overrides (``max_wait_s=...``, ``priority=...``) apply to this request only.
        """
        log = context.log if context is not None else None
        on_watchdog = _watchdog_logger(log) if log is not None else None
        lease = self.arbiter.acquire(
            task_type, holder=holder or _holder_name(context), on_watchdog=on_watchdog, **overrides
        )
        if log is not None:
            _log_outcome(log, lease)
        try:
            yield lease
        finally:
            lease.release()
            if log is not None and lease.acquired:
                message = f"GPU lease released: {lease.device_uuid} held {lease.hold_ms / 1000:.1f} s"
                if lease.watchdog_exceeded:
                    log.warning(
                        f"{message}, longer than max_hold_s={lease.policy.max_hold_s:.0f} s (watchdog)"
                    )
                elif lease.lost:
                    log.error(f"{message}, but the lease had been reclaimed (heartbeat older than the TTL)")
                else:
                    log.info(message)

    def snapshot(self) -> dict[str, Any]:
        return self.arbiter.snapshot()


def _holder_name(context: dg.OpExecutionContext | dg.AssetExecutionContext | None) -> str | None:
    """``<run id prefix>/<step>[<partition>]``: what `mloc gpu status` shows as the holder."""
    if context is None:
        return None
    name = f"{context.run_id[:8]}/{context.op_handle}"
    if context.has_partition_key:
        name += f"[{context.partition_key}]"
    return name


def _watchdog_logger(log: Any) -> Callable[[Lease], None]:
    def on_watchdog(lease: Lease) -> None:  # called from the arbiter's heartbeat thread, while held
        log.warning(
            f"GPU watchdog: {lease.task_type} has held {lease.device_uuid} longer than "
            f"max_hold_s={lease.policy.max_hold_s:.0f} s"
        )

    return on_watchdog


def _log_outcome(log: Any, lease: Lease) -> None:
    wait = f"after {lease.wait_ms:.0f} ms"
    if lease.outcome is Outcome.ACQUIRED:
        log.info(
            f"GPU lease {lease.outcome}: {lease.device_uuid} ({lease.torch_device}) for {lease.task_type} {wait}"
        )
    elif lease.outcome is Outcome.FALLBACK_CPU:
        log.warning(f"GPU busy ({lease.reason}): {lease.task_type} falls back to the CPU {wait}")
    else:
        log.warning(f"GPU lease {lease.outcome} ({lease.reason}) for {lease.task_type} {wait}")
