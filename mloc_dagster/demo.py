"""The end-to-end demo on the embedded default. Each step is a real Dagster run on the real instance."""

from __future__ import annotations

import os
import time

from rich.console import Console
from rich.table import Table

from mloc_dagster.paths import MlocPaths

console = Console()

BASE_DIALECT = "en-us"
DEMO_DIALECTS = {BASE_DIALECT: 800, "en-gb-scotland": 240, "en-gb-x-gbclan": 240}


def run_demo(ui: bool = False, utterances: int | None = None) -> int:
    from dagster import DagsterInstance

    from mloc_dagster.core.corpus import synth_dialect
    from mloc_dagster.definitions import defs
    from mloc_dagster.partitions import dialect_partitions

    paths = MlocPaths.from_env()
    console.rule("[bold]mloc_dagster demo")
    console.print(f"MLOC_HOME={paths.home}  DAGSTER_HOME={os.environ.get('DAGSTER_HOME')}")

    t0 = time.time()
    for dialect, n in DEMO_DIALECTS.items():
        n = utterances or n
        if not (paths.incoming / dialect / f"synth-s0-n{n}" / "manifest.jsonl").exists():
            synth_dialect(dialect, n, paths.incoming, seed=0)
        console.print(f"corpus: {dialect}: {n} utterances ({time.time() - t0:.1f} s)")

    summary = []
    with DagsterInstance.get() as instance:
        instance.add_dynamic_partitions(dialect_partitions.name, list(DEMO_DIALECTS))
        job = defs.get_job_def("ingest_job")
        for dialect in DEMO_DIALECTS:
            result = job.execute_in_process(partition_key=dialect, instance=instance)
            mat = result.asset_materializations_for_node("dataset_version")[0]
            md = {k: v.value for k, v in mat.metadata.items()}
            summary.append((dialect, md["version"], md["rows"], md["hours"], md["train_rows"],
                            md["dev_rows"], md["test_rows"], md["quarantined"]))

    table = Table(title="dataset versions")
    for col in ("dialect", "version", "rows", "hours", "train", "dev", "test", "quarantined"):
        table.add_column(col)
    for row in summary:
        table.add_row(*map(str, row))
    console.print(table)
    console.print("Open the UI: [bold]make ui[/] (runs `dagster dev` with this DAGSTER_HOME; http://127.0.0.1:3000)")
    if ui:
        os.execvp("dagster", ["dagster", "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", "3000"])
    return 0
