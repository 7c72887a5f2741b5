"""Which devices a node has: GPUs through NVML (``nvidia-ml-py``), simulated tokens, or CPU slots."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Protocol

try:
    from pynvml import NVMLError as _NVMLError
except ImportError:  # pragma: no cover - nvidia-ml-py is a dependency
    _NVMLError = OSError  # type: ignore[assignment,misc]

# What NVML can throw at us: a missing library or driver, a GPU that fell off the bus.
NVML_ERRORS: tuple[type[BaseException], ...] = (_NVMLError, OSError, RuntimeError, ImportError)

log = logging.getLogger("mloc_dagster.arbiter")


@dataclass(frozen=True)
class Device:
    """A leasable device. ``kind`` is ``cuda`` (NVML), ``simulated`` or ``cpu`` (CPU mode slot)."""

    index: int
    uuid: str
    name: str
    kind: str
    total_mb: float | None = None

    @property
    def torch_device(self) -> str:
        # Simulated devices and CPU slots are exclusive tokens; the work itself runs on the CPU.
        return f"cuda:{self.index}" if self.kind == "cuda" else "cpu"

    @property
    def cuda_visible_devices(self) -> str:
        # For a child process: the UUID is stable whatever CUDA_DEVICE_ORDER says; "" hides all GPUs.
        return self.uuid if self.kind == "cuda" else ""


@dataclass(frozen=True)
class MemoryInfo:
    total_mb: float
    free_mb: float
    processes: int  # compute processes NVML sees on the device, ours or not


class NvmlBackend(Protocol):
    """The few NVML calls the arbiter needs; tests substitute a fake for the memory logic only."""

    def devices(self) -> list[Device]: ...

    def memory(self, index: int) -> MemoryInfo: ...


class PynvmlBackend:
    """NVML through ``nvidia-ml-py`` (``import pynvml``)."""

    def __init__(self) -> None:
        import pynvml

        self._nvml = pynvml
        pynvml.nvmlInit()
        self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]

    @classmethod
    def load(cls) -> tuple[PynvmlBackend | None, str]:
        """The backend, or None and the reason it is unavailable (no library, no driver, no GPU)."""
        try:
            backend = cls()
        except NVML_ERRORS as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ImportError, ...
            return None, f"NVML unavailable ({type(exc).__name__}: {exc})"
        if not backend._handles:
            return None, "NVML reports no GPU"
        return backend, "NVML"

    def devices(self) -> list[Device]:
        found = []
        for index, handle in enumerate(self._handles):
            uuid_ = _text(self._nvml.nvmlDeviceGetUUID(handle))
            name = _text(self._nvml.nvmlDeviceGetName(handle))
            total = self._nvml.nvmlDeviceGetMemoryInfo(handle).total / 2**20
            found.append(Device(index=index, uuid=uuid_, name=name, kind="cuda", total_mb=total))
        return found

    def memory(self, index: int) -> MemoryInfo:
        handle = self._handles[index]
        info = self._nvml.nvmlDeviceGetMemoryInfo(handle)
        try:
            processes = len(self._nvml.nvmlDeviceGetComputeRunningProcesses(handle))
        except NVML_ERRORS:  # not supported on some drivers / vGPUs: count nothing rather than fail
            processes = 0
        return MemoryInfo(total_mb=info.total / 2**20, free_mb=info.free / 2**20, processes=processes)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


_cpu_mode_announced = False


def _announce_cpu_mode(reason: str, slots: int) -> None:
    global _cpu_mode_announced
    if not _cpu_mode_announced:
        _cpu_mode_announced = True
        log.warning(
            "GPU arbiter in CPU mode: %s. %d CPU slot(s) are leased instead of GPUs; every policy "
            "still applies and work runs on torch device 'cpu'.",
            reason,
            slots,
        )


def discover_devices(
    simulated_devices: int, cpu_slots: int, nvml: NvmlBackend | None, use_nvml: bool
) -> tuple[str, list[Device], NvmlBackend | None]:
    """``(mode, devices, nvml)``: simulated tokens when asked for, else NVML GPUs, else CPU slots."""
    if simulated_devices > 0:
        devices = [
            Device(index=i, uuid=f"SIM-{i}", name=f"simulated device {i}", kind="simulated")
            for i in range(simulated_devices)
        ]
        return "simulated", devices, None
    reason = "NVML disabled"
    if nvml is not None:
        reason = "NVML (injected)"
    elif use_nvml:
        nvml, reason = PynvmlBackend.load()
    if nvml is not None:
        return "nvml", nvml.devices(), nvml
    _announce_cpu_mode(reason, cpu_slots)
    return "cpu", [Device(index=i, uuid=f"CPU-{i}", name=f"cpu slot {i}", kind="cpu") for i in range(cpu_slots)], None


def read_memory(nvml: NvmlBackend | None, device: Device) -> MemoryInfo | None:
    """Live memory of a CUDA device, or None (not a GPU, or NVML failed: never wedge the arbiter)."""
    if device.kind != "cuda" or nvml is None:
        return None
    try:
        return nvml.memory(device.index)
    except NVML_ERRORS as exc:  # a GPU that fell off the bus must not wedge the arbiter
        log.warning("NVML memory query for device %d failed: %s", device.index, exc)
        return None


def free_torch_cuda_cache() -> None:
    # torch keeps freed blocks cached; without this the next holder's NVML free-memory check sees
    # our memory as still used until this process exits.
    torch = sys.modules.get("torch")
    if torch is None:
        return
    try:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
    except RuntimeError as exc:  # best effort only
        log.debug("torch.cuda.empty_cache failed: %s", exc)
