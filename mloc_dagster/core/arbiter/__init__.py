"""Node-local GPU arbiter: device leases shared by every process on one node.

Dagster runs every step in its own process, and Dagster's concurrency pool only counts slots. This
package decides *which* device a step gets, *whether* it gets one at all, and what happens when it
cannot have one. A file per responsibility, in the order a request meets them:

- ``policy``    task types, their priority, wait limit, queue limit, busy policy and watchdog
- ``devices``   what there is to lease: NVML GPUs, simulated devices, or CPU slots
- ``store``     the lease store: one SQLite file per node, every change one locked transaction
- ``acquire``   ``Arbiter``: queue a request, wait for the grant, release
- ``granting``  who gets a free device, and reclaiming devices from holders that died
- ``wakeup``    the named pipe that wakes a waiter the moment its grant is written
- ``lease``     the ``Lease`` the caller holds, and the thread that heartbeats it
- ``snapshot``  what ``mloc gpu status`` shows
- ``metrics``   Prometheus metrics (seed 004's names), multiprocess mode

No Dagster imports here: the resource in ``mloc_dagster.resources.gpu`` is a thin shell over this.
"""

from mloc_dagster.core.arbiter.acquire import Arbiter
from mloc_dagster.core.arbiter.devices import NVML_ERRORS, Device, MemoryInfo, NvmlBackend, PynvmlBackend
from mloc_dagster.core.arbiter.lease import Lease
from mloc_dagster.core.arbiter.metrics import metrics_text, write_textfile
from mloc_dagster.core.arbiter.policy import (
    DEFAULT_POLICIES,
    OTHER_POLICY,
    BusyPolicy,
    Outcome,
    Reason,
    TaskPolicy,
    TaskType,
    normalize_task_type,
    resolve_policies,
)
from mloc_dagster.core.arbiter.snapshot import read_snapshot
from mloc_dagster.core.arbiter.store import DB_NAME, default_node_id

__all__ = [
    "DB_NAME",
    "DEFAULT_POLICIES",
    "NVML_ERRORS",
    "OTHER_POLICY",
    "Arbiter",
    "BusyPolicy",
    "Device",
    "Lease",
    "MemoryInfo",
    "NvmlBackend",
    "Outcome",
    "PynvmlBackend",
    "Reason",
    "TaskPolicy",
    "TaskType",
    "default_node_id",
    "metrics_text",
    "normalize_task_type",
    "read_snapshot",
    "resolve_policies",
    "write_textfile",
]
