"""Shared output of the benchmarks: a metric/value table on the console and the same as JSON."""

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table


def report(title: str, results: dict, out: Path, console: Console) -> None:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in results.items():
        table.add_row(k, f"{v:.3f}" if isinstance(v, float) else str(v))
    console.print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    console.print(f"wrote {out}")
