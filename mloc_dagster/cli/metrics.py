"""`mloc metrics ...`: the line's Prometheus metrics, served over HTTP or written as a textfile."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import typer

from mloc_dagster.cli.stop_signals import StopSignals
from mloc_dagster.operations import metrics
from mloc_dagster.paths import MlocPaths

metrics_app = typer.Typer(no_args_is_help=True, help="Prometheus metrics: training line, candidates, GPU arbiter.")

GPU_DIR_OPTION = typer.Option(None, "--gpu-state-dir", help="GPU arbiter state directory (default $MLOC_HOME/gpu).")


@metrics_app.callback()
def _metrics() -> None:
    """Prometheus metrics of the line."""


def _sources(gpu_state_dir: Path | None) -> tuple[Any, Any, Path]:
    from mloc_dagster.core.state import StateStore
    from mloc_dagster.core.state.engine import resolve_state_url

    instance = None
    if os.environ.get("DAGSTER_HOME"):
        from dagster import DagsterInstance

        instance = DagsterInstance.get()
    return StateStore(resolve_state_url()), instance, gpu_state_dir or MlocPaths.from_env().gpu


@metrics_app.command("show")
def show(gpu_state_dir: Path = GPU_DIR_OPTION) -> None:
    """Print the exposition once (what a scrape of `mloc metrics serve` returns)."""
    store, instance, gpu = _sources(gpu_state_dir)
    typer.echo(metrics.exposition(metrics.registry(store, instance, gpu)), nl=False)


@metrics_app.command("write")
def write(
    out: Path = typer.Option(..., "--out", help="Textfile to write, e.g. /var/lib/node_exporter/textfile/mloc.prom."),
    gpu_state_dir: Path = GPU_DIR_OPTION,
) -> None:
    """Write the exposition once, atomically, for node-exporter's textfile collector (cron-friendly)."""
    store, instance, gpu = _sources(gpu_state_dir)
    try:
        path = metrics.write_textfile(metrics.registry(store, instance, gpu), out)
    except OSError as exc:
        raise typer.BadParameter(f"cannot write {out}: {exc.strerror or exc}", param_hint="--out") from exc
    typer.echo(f"wrote {path}")


@metrics_app.command("serve")
def serve(
    port: int = typer.Option(metrics.DEFAULT_PORT, "--port", help="Port for GET /metrics."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    textfile: Path = typer.Option(None, "--textfile", help="Also rewrite this textfile every --interval seconds."),
    interval: float = typer.Option(15.0, "--interval", min=1.0, help="Seconds between textfile rewrites."),
    gpu_state_dir: Path = GPU_DIR_OPTION,
) -> None:
    """Serve /metrics until Ctrl-C or SIGTERM."""
    from prometheus_client import start_http_server

    store, instance, gpu = _sources(gpu_state_dir)
    reg = metrics.registry(store, instance, gpu)
    try:
        server, thread = start_http_server(port, addr=host, registry=reg)
    except OSError as exc:
        typer.echo(f"error: cannot listen on {host}:{port}: {exc.strerror or exc} (is another exporter running?)", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"serving http://{host}:{server.server_port}/metrics" + (f", textfile {textfile}" if textfile else ""))
    try:
        with StopSignals() as stop:
            while not stop.requested:
                if textfile is not None:
                    try:
                        metrics.write_textfile(reg, textfile)
                    except OSError as exc:
                        typer.echo(f"warning: cannot write {textfile}: {exc}", err=True)
                stop.wait(interval)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
        with contextlib.suppress(Exception):
            store.close()
        if instance is not None:
            instance.dispose()
