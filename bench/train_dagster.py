"""bench/train.py with the adapter job run through Dagster: every job of the benchmark is a Dagster
run (in-process executor, a real instance) whose step leases the device from the GpuArbiter
resource and calls the training loop, as `adapter_checkpoint` does.

    .venv/bin/python bench/train_dagster.py [bench/train.py options]
"""


import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import dagster as dg

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import train as train_bench  # noqa: E402

from mloc_dagster.core.training.asr import train_adapter  # noqa: E402
from mloc_dagster.core.training.spec import AdapterJobResult, AdapterJobSpec
from mloc_dagster.resources.gpu import GpuArbiter  # noqa: E402

STATE = Path(tempfile.mkdtemp(prefix="mloc-bench-dagster-"))


def run_through_dagster(spec: AdapterJobSpec) -> AdapterJobResult:
    results: list[AdapterJobResult] = []

    @dg.op(pool="gpu")
    def adapter_job(context: dg.OpExecutionContext, gpu: GpuArbiter) -> None:
        with gpu.lease("TRAIN", context) as lease:
            results.append(train_adapter(replace(spec, device=lease.torch_device, log=context.log.info)))

    @dg.job(resource_defs={"gpu": GpuArbiter(state_dir=str(STATE / "gpu"))})
    def bench_adapter_job():
        adapter_job()

    with dg.instance_for_test(temp_dir=str(STATE)) as instance:
        assert bench_adapter_job.execute_in_process(instance=instance).success
    return results[0]


if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--out" not in argv:
        argv += ["--out", str(train_bench.REPO / "bench" / "results" / "train_dagster.json")]
    train_bench.main(argv, run_job=run_through_dagster, label="dagster")
