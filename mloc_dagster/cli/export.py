"""`mloc export`: runs, jobs, candidates, gate results, promotions and nodes as Parquet or JSON."""

from __future__ import annotations

import os
from pathlib import Path

import typer


def export_command(
    fmt: str = typer.Option("parquet", "--format", help="parquet or json."),
    out: Path = typer.Option(..., "--out", help="Directory; the export is a new mloc-export-<time>/ inside it."),
) -> None:
    """Export mloc's results (schema: docs/operations.md#export); prints the export's directory."""
    from mloc_dagster.core.state import StateStore
    from mloc_dagster.core.state.engine import StateStoreUnavailable, resolve_state_url
    from mloc_dagster.operations.export import ExportError, export

    dialects: list[str] = []
    if os.environ.get("DAGSTER_HOME"):  # dialects with candidates but no run of this state store
        from dagster import DagsterInstance

        from mloc_dagster.partitions import dialect_partitions

        with DagsterInstance.get() as instance:
            dialects = list(instance.get_dynamic_partitions(dialect_partitions.name))
    try:
        store = StateStore(resolve_state_url())
    except StateStoreUnavailable as exc:  # its message shows the URL without the password
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    try:
        target = export(store, out, fmt.lower(), dialects)
    except ExportError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    finally:
        store.close()
    typer.echo(str(target))
