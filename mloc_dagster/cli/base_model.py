"""`mloc base-model add DIR`: register a local checkpoint as the base model. One in-process run of
`base_model_job` (it shows in the UI with its materialization): the family is checked, the
directory copied under its content hash and evaluated on the base dialect's dev and test splits."""

from __future__ import annotations

import uuid
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

base_model_app = typer.Typer(no_args_is_help=True, help="Base models: register a local checkpoint.")
console = Console()


def _fail(message: str) -> None:
    console.print(f"[red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(1)


def _failure_message(result) -> str:
    """What the failed step said: a ``dg.Failure``'s description, or the innermost error."""
    for event in result.all_events:
        if event.is_step_failure:
            data = event.step_failure_data
            if data.user_failure_data and data.user_failure_data.description:
                return data.user_failure_data.description
            error = data.error
            while error is not None and error.cause is not None:
                error = error.cause
            if error is not None:
                return error.message.strip()
    return "base_model_job failed"


@base_model_app.command("add")
def add(
    checkpoint_dir: Path = typer.Argument(..., metavar="DIR", help="A local Hugging Face checkpoint directory "
                                          "of a supported family (docs/models.md)."),
    base_dialect: str = typer.Option(None, "--base-dialect",
                                     help="The dialect whose dev/test splits evaluate it (default: en-us, "
                                          "base_model's default); its dataset_version must exist."),
) -> None:
    """Register DIR as the base model, pinned by content hash (the same directory, the same version)."""
    from mloc_dagster.partitions import is_valid_dialect

    checkpoint_dir = checkpoint_dir.expanduser().resolve()
    if not checkpoint_dir.is_dir():
        _fail(f"{checkpoint_dir}: no such directory")
    if not (checkpoint_dir / "config.json").is_file():
        _fail(f"{checkpoint_dir} is not a model directory (no config.json)")
    if base_dialect is not None and not is_valid_dialect(base_dialect):
        raise typer.BadParameter(f"{base_dialect!r}: dialect keys are lowercase [a-z0-9-], no commas",
                                 param_hint="--base-dialect")

    import dagster as dg

    from mloc_dagster.definitions import defs

    config = {"checkpoint_dir": str(checkpoint_dir), **({"base_dialect": base_dialect} if base_dialect else {})}
    run_id = str(uuid.uuid4())  # known before the run: printed while it works
    console.print(f"[cyan]base_model_job[/] run {run_id}: registering {escape(str(checkpoint_dir))} ...", soft_wrap=True)
    # Quiet console: a failure is printed below as its one-line message; the full log is the run's (UI).
    with dg.DagsterInstance.get() as instance:
        result = defs.resolve_job_def("base_model_job").execute_in_process(
            instance=instance, run_id=run_id, raise_on_error=False,
            run_config={"ops": {"base_model": {"config": config}},
                        "loggers": {"console": {"config": {"log_level": "CRITICAL"}}}})
    if not result.success:
        _fail(_failure_message(result))
    md = {k: v.value for k, v in result.asset_materializations_for_node("base_model")[0].metadata.items()}
    console.print(f"[green]base_model[/] {md['version']}", soft_wrap=True)
    console.print(f"  family {md['family']}, {md['parameters']:,} parameters", soft_wrap=True)
    console.print(f"  {md['base_dialect']} dev CER {md['dev_cer']:.3f}, test CER {md['test_cer']:.3f}", soft_wrap=True)
    console.print(f"  path {escape(str(md['path']))}", soft_wrap=True)
    stale = md.get("stale_production_adapters", "")
    if stale.startswith("- "):
        console.print(f"[yellow]production adapters on another base are now stale:[/]\n{escape(stale)}", soft_wrap=True)
