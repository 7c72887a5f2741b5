"""The GPU arbiter core, without Dagster: policies, queueing, crash safety, NVML, metrics.

Multi-process tests use the ``spawn`` start method: each worker is a fresh interpreter, like a
Dagster step process, and shares nothing with the test but the state directory.
"""

from __future__ import annotations

import itertools
import json
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mloc_dagster.core.arbiter import devices as devices_module
from mloc_dagster.core.arbiter import wakeup as wakeup_module
from mloc_dagster.core.arbiter.acquire import Arbiter
from mloc_dagster.core.arbiter.devices import Device, MemoryInfo, PynvmlBackend
from mloc_dagster.core.arbiter.lease import Lease
from mloc_dagster.core.arbiter.metrics import metrics_text
from mloc_dagster.core.arbiter.policy import DEFAULT_POLICIES, BusyPolicy, Outcome, Reason, TaskPolicy, TaskType, resolve_policies
from mloc_dagster.core.arbiter.snapshot import read_snapshot

SPAWN = mp.get_context("spawn")


def wait_until(predicate: Callable[[], bool], timeout_s: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def queue_length(arb: Arbiter) -> int:
    return len(arb.snapshot()["queue"])


@pytest.fixture(autouse=True)
def _metrics_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The arbiter's Prometheus files default to $MLOC_HOME/metrics: keep them out of the checkout.
    monkeypatch.setenv("MLOC_HOME", str(tmp_path / "home"))


def sim(tmp_path: Path, devices: int = 1, **kwargs) -> Arbiter:
    return Arbiter(tmp_path / "gpu", simulated_devices=devices, **kwargs)


# --- policies -------------------------------------------------------------------------------


def test_default_policies_fit_the_asset_graph() -> None:
    assert DEFAULT_POLICIES[TaskType.TRAIN].busy_policy is BusyPolicy.WAIT
    assert DEFAULT_POLICIES[TaskType.EVAL].busy_policy is BusyPolicy.FALLBACK_CPU
    assert DEFAULT_POLICIES[TaskType.MERGE].busy_policy is BusyPolicy.FALLBACK_CPU
    assert DEFAULT_POLICIES[TaskType.OPTIONAL].busy_policy is BusyPolicy.SKIP
    # Evaluation gates a promotion and is short: it goes before a waiting training job.
    assert DEFAULT_POLICIES[TaskType.EVAL].priority > DEFAULT_POLICIES[TaskType.TRAIN].priority


def test_policy_overrides_and_validation() -> None:
    policies = resolve_policies({"eval": {"max_wait_s": 5}, "asr_decode": TaskPolicy(priority=80)})
    assert policies["EVAL"].max_wait_s == 5
    assert policies["EVAL"].busy_policy is BusyPolicy.FALLBACK_CPU  # untouched fields keep defaults
    assert policies["ASR_DECODE"].priority == 80
    assert TaskPolicy(busy_policy="skip").busy_policy is BusyPolicy.SKIP  # type: ignore[arg-type]
    for bad in ({"priority": 101}, {"max_wait_s": -1}, {"queue_limit": 0}, {"min_free_mb": -1}):
        with pytest.raises(ValueError):
            TaskPolicy(**bad)
    with pytest.raises(ValueError):
        TaskPolicy(busy_policy="PANIC")  # type: ignore[arg-type]


def test_extensible_task_type_uses_the_patient_default(tmp_path: Path) -> None:
    arb = sim(tmp_path)
    with arb.acquire("speaker_embedding") as lease:
        assert lease.outcome is Outcome.ACQUIRED
        assert lease.task_type == "SPEAKER_EMBEDDING"
    assert arb.policy_for("speaker_embedding").busy_policy is BusyPolicy.WAIT


def test_priority_then_fifo(tmp_path: Path) -> None:
    arb = sim(tmp_path)
    blocker = arb.acquire(TaskType.TRAIN, "blocker")
    assert blocker.acquired
    granted: list[str] = []

    def waiter(name: str, priority: int) -> None:
        lease = arb.acquire(TaskType.TRAIN, name, priority=priority, max_wait_s=60)
        granted.append(name)
        lease.release()

    threads = []
    # Enqueue one at a time so the arrival order is known.
    for name, priority in [("low-a", 10), ("high-b", 90), ("low-c", 10), ("mid-d", 50), ("high-e", 90)]:
        t = threading.Thread(target=waiter, args=(name, priority))
        t.start()
        threads.append(t)
        expected = len(threads)
        wait_until(lambda n=expected: queue_length(arb) == n, what=f"{name} queued")

    expected_order = ["high-b", "high-e", "mid-d", "low-a", "low-c"]
    assert [w["holder"] for w in arb.snapshot()["queue"]] == expected_order
    blocker.release()
    for t in threads:
        t.join(timeout=60)
    assert granted == expected_order


def test_queue_limit_answers_at_once(tmp_path: Path) -> None:
    arb = sim(tmp_path, policies={"TRAIN": {"queue_limit": 2}, "EVAL": {"queue_limit": 2}})
    blocker = arb.acquire("TRAIN", "blocker")
    results: list[Lease] = []
    threads = [
        threading.Thread(target=lambda: results.append(arb.acquire("TRAIN", max_wait_s=60))) for _ in range(2)
    ]
    for t in threads:
        t.start()
    wait_until(lambda: queue_length(arb) == 2, what="two waiters")

    refused = arb.acquire("TRAIN", "third", max_wait_s=60)
    assert refused.outcome is Outcome.QUEUE_FULL
    assert refused.reason is Reason.QUEUE_FULL
    assert refused.torch_device is None
    assert refused.wait_ms < 5_000  # at once, not after max_wait_s=60

    # A task type that may fall back still falls back when the queue is full.
    evaluation = arb.acquire("EVAL", "eval", max_wait_s=60)
    assert evaluation.outcome is Outcome.FALLBACK_CPU
    assert evaluation.reason is Reason.QUEUE_FULL
    assert evaluation.torch_device == "cpu"

    blocker.release()
    wait_until(lambda: len(results) >= 1, what="first waiter granted")
    results[0].release()
    for t in threads:
        t.join(timeout=30)
    for lease in results:
        lease.release()
    assert [lease.outcome for lease in results] == [Outcome.ACQUIRED, Outcome.ACQUIRED]
    assert arb.snapshot()["totals"]["queue_full"] == 2


@pytest.mark.parametrize(
    ("busy_policy", "outcome", "torch_device"),
    [
        (BusyPolicy.WAIT, Outcome.TIMEOUT, None),
        (BusyPolicy.SKIP, Outcome.SKIPPED, None),
        (BusyPolicy.FALLBACK_CPU, Outcome.FALLBACK_CPU, "cpu"),
    ],
)
def test_max_wait_applies_the_busy_policy(
    tmp_path: Path, busy_policy: BusyPolicy, outcome: Outcome, torch_device: str | None
) -> None:
    arb = sim(tmp_path)
    with arb.acquire("TRAIN", "holder"):
        lease = arb.acquire("EVAL", "late", max_wait_s=0.3, busy_policy=busy_policy)
    assert lease.outcome is outcome
    assert lease.reason is Reason.TIMEOUT
    assert lease.torch_device == torch_device
    assert lease.device_index is None
    assert lease.wait_ms >= 250
    snap = arb.snapshot()
    assert snap["queue"] == []  # the timed-out request left the queue
    assert snap["totals"]["timeouts"] == 1
    assert snap["totals"]["skipped"] == (1 if outcome is Outcome.SKIPPED else 0)
    assert snap["totals"]["fallback_cpu"] == (1 if outcome is Outcome.FALLBACK_CPU else 0)
    with lease:  # a non-acquired lease is still a harmless context manager
        pass
    assert lease.metadata()["gpu/outcome"] == outcome.value


def test_zero_max_wait_decides_at_once(tmp_path: Path) -> None:
    arb = sim(tmp_path)
    with arb.acquire("TRAIN"):
        lease = arb.acquire("OPTIONAL", max_wait_s=0)
    assert lease.outcome is Outcome.SKIPPED
    assert lease.reason is Reason.BUSY


def test_watchdog_records_and_logs_a_long_hold(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    arb = sim(tmp_path)
    fired: list[Lease] = []
    with caplog.at_level(logging.WARNING, logger="mloc_dagster.arbiter"):
        lease = arb.acquire("MERGE", "slow-merge", max_hold_s=0.3, on_watchdog=fired.append)
        wait_until(lambda: lease.watchdog_exceeded, timeout_s=10, what="watchdog")
        # The watchdog reports; it does not take the device away from a running step.
        snap = arb.snapshot()
        assert snap["leases"][0]["holder"] == "slow-merge"
        assert snap["leases"][0]["watchdog_exceeded"] is True
        lease.release()
    assert fired == [lease]
    assert arb.snapshot()["counters"]["watchdog_exceeded"] == {"MERGE": 1}
    assert lease.metadata()["gpu/watchdog_exceeded"] is True
    assert any("max_hold_s" in r.getMessage() for r in caplog.records)


# --- CPU mode and NVML ------------------------------------------------------------------------


def test_no_nvml_means_cpu_mode(tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch) -> None:
    """Real NVML: this machine has no NVML library, so discovery must fail and CPU mode take over."""
    if PynvmlBackend.load()[0] is not None:
        pytest.skip("this machine has a working NVML")
    monkeypatch.setattr(devices_module, "_cpu_mode_announced", False)
    with caplog.at_level(logging.WARNING, logger="mloc_dagster.arbiter"):
        arb = Arbiter(tmp_path / "gpu")
        Arbiter(tmp_path / "gpu")  # a second arbiter in the same process does not repeat it
    assert arb.mode == "cpu"
    assert [d.uuid for d in arb.devices] == ["CPU-0"]
    assert sum("CPU mode" in r.getMessage() for r in caplog.records) == 1

    # Every policy still holds: one CPU slot serializes training, evaluation falls back.
    with arb.acquire("TRAIN") as train:
        assert train.outcome is Outcome.ACQUIRED
        assert (train.torch_device, train.cuda_visible_devices, train.device_uuid) == ("cpu", "", "CPU-0")
        assert arb.acquire("TRAIN", max_wait_s=0).outcome is Outcome.TIMEOUT
        assert arb.acquire("EVAL", max_wait_s=0).outcome is Outcome.FALLBACK_CPU
    assert read_snapshot(tmp_path / "gpu")["mode"] == "cpu"


class FakeNvml:
    """An NVML fake used ONLY to drive the free-memory threshold and device choice logic.

    Real NVML needs a GPU; everything else in these tests runs against the real code paths.
    """

    def __init__(self, memory: dict[int, MemoryInfo]) -> None:
        self.memory_by_index = memory

    def devices(self) -> list[Device]:
        return [
            Device(index=i, uuid=f"GPU-fake-{i}", name="Fake GPU", kind="cuda", total_mb=m.total_mb)
            for i, m in sorted(self.memory_by_index.items())
        ]

    def memory(self, index: int) -> MemoryInfo:
        return self.memory_by_index[index]


def test_memory_threshold_and_fewest_processes(tmp_path: Path) -> None:
    """Uses FakeNvml for the memory figures only (see its docstring)."""
    fake = FakeNvml(
        {
            0: MemoryInfo(total_mb=16_000, free_mb=3_000, processes=0),  # too full for training
            1: MemoryInfo(total_mb=16_000, free_mb=9_000, processes=2),  # fits, but shared with others
            2: MemoryInfo(total_mb=16_000, free_mb=9_000, processes=0),  # fits, nobody on it
        }
    )
    arb = Arbiter(tmp_path / "gpu", nvml=fake, poll_interval_s=0.05)
    assert arb.mode == "nvml"

    first = arb.acquire("TRAIN", min_free_mb=8_000)
    assert (first.device_index, first.torch_device, first.cuda_visible_devices) == (2, "cuda:2", "GPU-fake-2")
    second = arb.acquire("TRAIN", min_free_mb=8_000)
    assert second.device_index == 1

    # Device 0 is free but too small: a training request does not get it ...
    third = arb.acquire("TRAIN", min_free_mb=8_000, max_wait_s=0)
    assert third.outcome is Outcome.TIMEOUT
    assert third.reason is Reason.INSUFFICIENT_MEMORY
    # ... while a small evaluation does.
    with arb.acquire("EVAL", min_free_mb=1_000) as evaluation:
        assert evaluation.device_index == 0

    # Memory frees up while a request waits: the waiter's poll notices and takes the device.
    def free_device_0() -> None:
        time.sleep(0.3)
        fake.memory_by_index[0] = MemoryInfo(total_mb=16_000, free_mb=12_000, processes=0)

    threading.Thread(target=free_device_0).start()
    waited = arb.acquire("TRAIN", min_free_mb=8_000, max_wait_s=20)
    assert waited.outcome is Outcome.ACQUIRED and waited.device_index == 0
    assert waited.wait_ms >= 200
    for lease in (first, second, waited):
        lease.release()
    devices = read_snapshot(tmp_path / "gpu", use_nvml=False)["devices"]
    assert [d["uuid"] for d in devices] == ["GPU-fake-0", "GPU-fake-1", "GPU-fake-2"]


# --- crash safety -------------------------------------------------------------------------------


def _hold(state_dir: str, ttl_s: float, ready: str) -> None:
    """Child process: take the only device, say so, then hang on to it."""
    arb = Arbiter(state_dir, simulated_devices=1, heartbeat_ttl_s=ttl_s)
    lease = arb.acquire("TRAIN", f"child-{os.getpid()}")
    assert lease.acquired
    Path(ready).write_text(str(lease.device_index))
    time.sleep(600)


def _start_holder(tmp_path: Path, ttl_s: float) -> mp.process.BaseProcess:
    ready = tmp_path / "ready"
    proc = SPAWN.Process(target=_hold, args=(str(tmp_path / "gpu"), ttl_s, str(ready)), daemon=True)
    proc.start()
    wait_until(ready.exists, timeout_s=60, what="child holding the device")
    return proc


def test_sigkilled_holder_is_reclaimed_within_ttl(tmp_path: Path) -> None:
    ttl_s = 5.0
    proc = _start_holder(tmp_path, ttl_s)
    arb = sim(tmp_path)
    assert arb.acquire("TRAIN", max_wait_s=0).outcome is Outcome.TIMEOUT
    os.kill(proc.pid, signal.SIGKILL)  # not reaped yet: the arbiter must see through the zombie
    lease = arb.acquire("TRAIN", "survivor", max_wait_s=60)
    assert lease.outcome is Outcome.ACQUIRED
    assert lease.wait_ms < ttl_s * 1000
    assert arb.snapshot()["totals"]["reclaimed"] == 1
    lease.release()
    proc.join(timeout=10)


def test_frozen_holder_is_reclaimed_after_its_ttl(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ttl_s = 1.5
    proc = _start_holder(tmp_path, ttl_s)
    arb = sim(tmp_path)
    os.kill(proc.pid, signal.SIGSTOP)  # alive but silent: only the heartbeat TTL can tell
    try:
        with caplog.at_level(logging.WARNING, logger="mloc_dagster.arbiter"):
            lease = arb.acquire("TRAIN", "survivor", max_wait_s=60)
        assert lease.outcome is Outcome.ACQUIRED
        assert lease.wait_ms < (ttl_s + 10) * 1000
        assert any("heartbeat older" in r.getMessage() for r in caplog.records)
        lease.release()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=10)


def _wait_in_queue(state_dir: str) -> None:
    arb = Arbiter(state_dir, simulated_devices=1)
    arb.acquire("TRAIN", f"doomed-{os.getpid()}", max_wait_s=600)


def test_dead_waiter_is_dropped_from_the_queue(tmp_path: Path) -> None:
    arb = sim(tmp_path)
    blocker = arb.acquire("TRAIN", "blocker")
    proc = SPAWN.Process(target=_wait_in_queue, args=(str(tmp_path / "gpu"),), daemon=True)
    proc.start()
    wait_until(lambda: queue_length(arb) == 1, timeout_s=60, what="child queued")
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(timeout=10)
    blocker.release()  # maintenance runs in this transaction: the ghost is dropped, not granted
    wait_until(lambda: arb.snapshot()["totals"]["dropped_waiters"] == 1, timeout_s=10, what="drop")
    snap = arb.snapshot()
    assert snap["queue"] == [] and snap["leases"] == []
    leftovers = [p.name for p in (tmp_path / "gpu" / "wake").iterdir() if p.name.startswith(f"{proc.pid}-")]
    assert leftovers == []  # its wake-up pipe is gone too


# --- many processes ------------------------------------------------------------------------------


def _stress_worker(state_dir: str, out: str, iterations: int, priority: int, start: Any) -> None:
    arb = Arbiter(state_dir, simulated_devices=2, metrics_interval_s=5.0)
    start.wait(timeout=120)  # start together, so the queue is contended from the first request
    records = []
    for _ in range(iterations):
        lease = arb.acquire("TRAIN", f"w{os.getpid()}", priority=priority, max_wait_s=300)
        assert lease.acquired, lease
        begin = time.monotonic_ns()  # CLOCK_MONOTONIC is system-wide: comparable across processes
        spin_until = begin + 200_000
        while time.monotonic_ns() < spin_until:
            pass
        end = time.monotonic_ns()
        lease.release()
        records.append(
            {
                "device": lease.device_index,
                "begin": begin,
                "end": end,
                "priority": priority,
                "ticket": lease.ticket,
                "enqueued_at": lease.enqueued_at,
                "granted_at": lease.granted_at,
            }
        )
    arb.close()
    Path(out).write_text(json.dumps(records))


def test_stress_many_processes_no_double_grant_and_priority_order(tmp_path: Path) -> None:
    processes, iterations = 16, 200
    state = tmp_path / "gpu"
    Arbiter(state, simulated_devices=2).close()
    start = SPAWN.Barrier(processes)
    procs = []
    for i in range(processes):
        priority = 80 if i % 4 == 0 else 20
        out = tmp_path / f"worker-{i}.json"
        p = SPAWN.Process(target=_stress_worker, args=(str(state), str(out), iterations, priority, start))
        p.start()
        procs.append((p, out))
    for p, _ in procs:
        p.join(timeout=240)
        assert p.exitcode == 0
    records = [r for _, out in procs for r in json.loads(out.read_text())]
    assert len(records) == processes * iterations

    # Zero double grants: on each device the holds never overlap.
    for device in (0, 1):
        holds = sorted((r["begin"], r["end"]) for r in records if r["device"] == device)
        assert holds, f"device {device} was never used"
        overlaps = [(a, b) for a, b in itertools.pairwise(holds) if b[0] < a[1]]
        assert overlaps == []

    # Priority then FIFO: no grant went to a request while a better one was already waiting.
    # Timestamps come from inside the serialized transactions, so they order events exactly.
    enq = np.array([r["enqueued_at"] for r in records])
    granted = np.array([r["granted_at"] for r in records])
    prio = np.array([r["priority"] for r in records])
    ticket = np.array([r["ticket"] for r in records])
    violations = 0
    for g, p, t in zip(granted, prio, ticket, strict=True):
        waiting = (enq < g) & (granted > g)
        better = (prio > p) | ((prio == p) & (ticket < t))
        violations += int(np.count_nonzero(waiting & better))
    assert violations == 0
    high_waits = [r["granted_at"] - r["enqueued_at"] for r in records if r["priority"] == 80]
    low_waits = [r["granted_at"] - r["enqueued_at"] for r in records if r["priority"] == 20]
    assert sum(high_waits) / len(high_waits) < sum(low_waits) / len(low_waits)

    snap = read_snapshot(state, use_nvml=False)
    assert snap["totals"]["acquired"] == processes * iterations
    assert snap["totals"]["released"] == processes * iterations
    assert snap["leases"] == [] and snap["queue"] == []


# --- observability --------------------------------------------------------------------------------


def _three_leases(state_dir: str) -> None:
    arb = Arbiter(state_dir, simulated_devices=1)
    for _ in range(3):
        with arb.acquire("EVAL"):
            pass
    arb.close()


def test_counters_and_textfile_are_node_wide(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = tmp_path / "gpu"
    # Every process on the node adds to one metrics directory (prometheus_client's multiprocess mode).
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "metrics"))
    for _ in range(2):  # two step processes, one after the other
        proc = SPAWN.Process(target=_three_leases, args=(str(state),))
        proc.start()
        proc.join(timeout=60)
        assert proc.exitcode == 0

    snap = read_snapshot(state, use_nvml=False)
    assert snap["counters"]["acquired"] == {"EVAL": 6}
    assert snap["histograms"]["hold_ms"]["EVAL"]["count"] == 6
    assert snap["mode"] == "simulated"
    json.dumps(snap)  # JSON-able

    # The second process's totals include the first's: written by it on close.
    prom = (state / "arbiter.prom").read_text()
    assert 'gpu_arbiter_acquire_total{status="ACQUIRED",task_type="EVAL"} 6.0' in prom
    assert 'gpu_arbiter_queue_wait_ms_count{status="ACQUIRED",task_type="EVAL"} 6.0' in prom
    assert 'gpu_arbiter_hold_ms_bucket{le="+Inf",task_type="EVAL"} 6.0' in prom
    assert 'gpu_arbiter_released_total{task_type="EVAL"} 6.0' in prom
    assert 'gpu_arbiter_queue_length{task_type="EVAL"} 0.0' in prom
    assert 'gpu_arbiter_device_leased{device="0",uuid="SIM-0"} 0.0' in prom
    assert metrics_text(state) == prom  # any process reads the same node totals

    # A process that has just created its metrics file and not yet sized it (the race CI hit
    # with 16 workers): a scrape skips the empty file instead of failing the grant that wrote it.
    (tmp_path / "metrics" / "counter_99999.db").touch()
    assert metrics_text(state) == prom


def test_interrupted_waiter_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arb = sim(tmp_path)
    blocker = arb.acquire("TRAIN", "blocker")

    def interrupted(self: object, timeout_s: float) -> bool:
        raise KeyboardInterrupt  # what a terminated Dagster run raises into its step

    monkeypatch.setattr(wakeup_module.Waker, "wait", interrupted)
    with pytest.raises(KeyboardInterrupt):
        arb.acquire("TRAIN", "interrupted", max_wait_s=60)
    assert arb.snapshot()["queue"] == []
    blocker.release()
    assert arb.snapshot()["leases"] == []  # nothing was granted to the request that went away


def test_corrupt_database_is_moved_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = tmp_path / "gpu"
    state.mkdir()
    (state / "arbiter.sqlite").write_bytes(b"not a database, e.g. after a power cut" * 100)
    with caplog.at_level(logging.ERROR, logger="mloc_dagster.arbiter"):
        arb = Arbiter(state, simulated_devices=1)
    with arb.acquire("TRAIN") as lease:
        assert lease.acquired
    assert [p.name.split(".corrupt-")[0] for p in state.glob("*.corrupt-*")] == ["arbiter.sqlite"]
    assert any("moved aside" in r.getMessage() for r in caplog.records)
