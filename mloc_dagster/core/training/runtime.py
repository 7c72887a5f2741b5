"""What both training loops share: the step, the timebox, the loss log, and the runtime setup.

``train_step`` is the one optimizer step (forward, backward, clip, step) of the base pre-training
and of every adapter job. ``Timebox`` decides before every step whether one more step plus the
work the job must still do (evaluate, save) fits the time budget. ``LossLog`` collects per-step
losses without a device sync per step on CUDA. The rest sets up a deterministic run: seeds, the
CPU thread count, deterministic kernels, the device and node identity.
"""

from __future__ import annotations

import contextlib
import os
import random
import resource
import socket
import time
from collections import deque
from collections.abc import Callable, Iterator

import numpy as np
import torch

# --------------------------------------------------------------------------- runtime


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_node_id() -> str:
    if os.environ.get("MLOC_NODE_ID"):
        return os.environ["MLOC_NODE_ID"]
    node = socket.gethostname()
    if torch.cuda.is_available():
        uuid = getattr(torch.cuda.get_device_properties(0), "uuid", None)
        if uuid is not None:
            node += f"-GPU-{uuid}"
    return node


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


SMALL_MODEL_PARAMS = 20_000_000


def auto_cpu_threads(model: torch.nn.Module, device: str) -> int | None:
    """Intra-op CPU threads for a job: 1 for small models on CPU, else torch's default (None).

    The tiny GRU's per-timestep matmuls are far too small to split: OpenMP synchronisation costs
    more than a second core gains, and spinning OpenMP threads collapse when the cores are shared
    with other processes (measured on 2 shared cores: 1 thread ~90 samples/s, 2 threads 9–16)."""
    if device != "cpu":
        return None
    return 1 if sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMS else None


@contextlib.contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` intra-op threads (None: leave torch's setting), restored afterwards."""
    previous = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def deterministic(device: str, enabled: bool | None = None) -> Iterator[None]:
    """Deterministic kernels for the duration of a job (restored afterwards).

    ``enabled=None`` means on for CUDA (atomics make several kernels nondeterministic there) and off
    for CPU: the CPU kernels of these models are already deterministic at a fixed thread count (the
    exact-resume tests run without the flag), and the flag's sort-based fallbacks cost ~5 % of CPU
    throughput."""
    if enabled is None:
        enabled = device.startswith("cuda")
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    if enabled and device.startswith("cuda"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if enabled:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- the step


def train_step(loss_fn: Callable[[], torch.Tensor], opt: torch.optim.Optimizer, params: list[torch.Tensor],
               max_grad_norm: float | None, sched: torch.optim.lr_scheduler.LRScheduler | None = None,
               scaler: torch.amp.GradScaler | None = None) -> torch.Tensor:
    """One optimizer step on the loss ``loss_fn()`` computes; returns the loss, detached. With an
    enabled ``scaler`` (fp16) the loss is scaled for the backward pass and the step is skipped when
    the gradients overflowed."""
    loss = loss_fn()
    opt.zero_grad(set_to_none=True)
    if scaler is None or not scaler.is_enabled():
        loss.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
    else:
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        scaler.step(opt)
        scaler.update()
    if sched is not None:
        sched.step()
    return loss.detach()


def autocast(device: str, precision: str) -> contextlib.AbstractContextManager:
    """The forward pass's precision (``core/training/spec.py: DeviceOptions``): bf16/fp16 autocast on
    CUDA, fp32 elsewhere."""
    dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in dtypes:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(dtypes)}")
    if dtypes[precision] is None or not device.startswith("cuda"):
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtypes[precision])


def enable_gradient_checkpointing(model: torch.nn.Module, log: Callable[[str], None]) -> bool:
    """transformers' gradient checkpointing, non-reentrant (LoRA weights inside a checkpointed layer
    get their gradients although the layer's inputs do not require any); False, logged, where the
    model has none."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        log(f"gradient_checkpointing: {type(model).__name__} does not support it; training without")
        return False
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return True


class LossLog:
    """Per-step losses. On CPU each loss is read at once; on CUDA they are read every 50 steps
    (reading a loss waits for the GPU)."""

    def __init__(self, device: str, history: list[float] | None = None):
        self.sync_every = 1 if device == "cpu" else 50
        self.pending: list[torch.Tensor] = []
        self.history = history if history is not None else []  # the run's (appended to)
        self.job: list[float] = []  # this job's

    def add(self, loss: torch.Tensor) -> None:
        self.pending.append(loss)
        if len(self.pending) >= self.sync_every:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            values = torch.stack(self.pending).tolist()
            self.pending.clear()
            self.history.extend(values)
            self.job.extend(values)

    @property
    def last(self) -> float:
        self.flush()
        return self.job[-1] if self.job else float("nan")


# --------------------------------------------------------------------------- the timebox


class Timebox:
    """Whether one more step still fits: ``elapsed + 1.5 × slowest recent step + reserve() ≤ budget``.

    ``t0`` is the ``time.monotonic()`` the budget counts from. ``reserve`` is what the job must do
    after the last step (evaluate, save), re-estimated at every check from the measured step and
    frame times. Step times are those of the last 20 steps, so a slow phase (a busy machine) is
    seen quickly and a single slow step is forgotten."""

    def __init__(self, budget_s: float, t0: float | None = None, reserve: Callable[[], float] | None = None):
        self.budget_s = budget_s
        self.t0 = time.monotonic() if t0 is None else t0
        self.reserve = reserve or (lambda: 0.0)
        self.step_times: deque[float] = deque(maxlen=20)
        self.frame_times: deque[float] = deque(maxlen=20)  # seconds per frame (forward + backward)
        self.first_step: float | None = None  # monotonic start of the first step
        self.last_step_end: float | None = None

    def record(self, started: float, frames: int) -> float:
        """Account one step that began at ``started`` (monotonic); returns its end time."""
        end = time.monotonic()
        if self.first_step is None:
            self.first_step = started
        self.last_step_end = end
        self.step_times.append(end - started)
        self.frame_times.append((end - started) / max(1, frames))
        return end

    @property
    def slowest_step_s(self) -> float:
        return max(self.step_times) if self.step_times else 0.0

    @property
    def slowest_frame_s(self) -> float:
        return max(self.frame_times) if self.frame_times else 0.0

    def elapsed(self, now: float | None = None) -> float:
        return (time.monotonic() if now is None else now) - self.t0

    def fits_another_step(self, now: float | None = None) -> bool:
        return self.elapsed(now) + 1.5 * self.slowest_step_s + self.reserve() <= self.budget_s

    def remaining_s(self, now: float | None = None) -> float:
        """Seconds of training left before the loop stops for the timebox."""
        return max(0.0, self.budget_s - self.elapsed(now) - self.reserve())

    @property
    def train_seconds(self) -> float:
        """First step start → last step end."""
        if self.first_step is None or self.last_step_end is None:
            return 0.0
        return self.last_step_end - self.first_step


class StopRule:
    """Why an adapter job (``core/training/job.py``, every track) stops before its next step:
    the job's step budget, then the timebox, then a heartbeat
    (called at most every ``heartbeat_every_s``) that returns False. Built when the loop starts."""

    def __init__(self, timebox: Timebox, max_steps: int | None, heartbeat: Callable[[], bool | None] | None,
                 heartbeat_every_s: float):
        self.timebox, self.max_steps = timebox, max_steps
        self.heartbeat, self.heartbeat_every_s = heartbeat, heartbeat_every_s
        self.last_heartbeat = time.monotonic()

    def reason(self, now: float, job_steps: int) -> str | None:
        if self.max_steps is not None and job_steps >= self.max_steps:
            return "max_steps"
        if not self.timebox.fits_another_step(now):
            return "timebox"
        if self.heartbeat is not None and now - self.last_heartbeat >= self.heartbeat_every_s:
            self.last_heartbeat = now
            if self.heartbeat() is False:
                return "heartbeat"
        return None
