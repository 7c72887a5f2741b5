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


