"""The `mloc` command: what Dagster has no verb for. Thin over the core and the Dagster instance."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from mloc_dagster.cli.base_model import base_model_app
from mloc_dagster.cli.candidate import candidate_app
from mloc_dagster.cli.demo import BASE_TRAIN_S, DEMO_JOBS, DEMO_TIMEBOX_S
from mloc_dagster.cli.export import export_command
from mloc_dagster.cli.gpu import gpu_app
from mloc_dagster.cli.metrics import metrics_app
from mloc_dagster.cli.node import node_app
from mloc_dagster.cli.ray_node import head as node_head
from mloc_dagster.cli.ray_node import join as node_join
from mloc_dagster.cli.run import run_app
from mloc_dagster.paths import MlocPaths

app = typer.Typer(no_args_is_help=True, help="mloc_dagster: dialect speech models on shared GPUs.")
corpus_app = typer.Typer(no_args_is_help=True, help="Corpora in: the espeak demo corpus, Common Voice and Hugging Face datasets.")
dialect_app = typer.Typer(no_args_is_help=True, help="Dialect partitions.")
app.add_typer(corpus_app, name="corpus")
app.add_typer(dialect_app, name="dialect")
console = Console()


@corpus_app.command("synth")
def corpus_synth(
    dialects: str = typer.Option("en-us,en-gb-scotland,en-gb-x-gbclan", help="Comma-separated espeak dialects."),
    utterances: int = typer.Option(1200, help="Utterances per dialect (1,200 = 30 per speaker: dev and test "
                                                "get ≥ 5 speakers and ≥ 150 utterances each)."),
    out: Path = typer.Option(None, help="Incoming root (default $MLOC_HOME/incoming)."),
    seed: int = typer.Option(0),
    speakers: int = typer.Option(40, help="Speakers per dialect (voice variant × pitch × speed × word gap; "
                                          "at most 1,360)."),
    batch_id: str = typer.Option(None, help="Batch id (default synth-s<seed>-n<utterances>)."),
) -> None:
    """Synthesize a deterministic demo corpus, written as normal incoming batches."""
    from mloc_dagster.core.data.corpus import synth_dialect

    out = out or MlocPaths.from_env().incoming
    for dialect in [d.strip() for d in dialects.split(",") if d.strip()]:
        path = synth_dialect(dialect, utterances, out, seed=seed, speakers=speakers, batch_id=batch_id)
        console.print(f"[green]wrote[/] {path} ({utterances} utterances)")


@corpus_app.command("import")
def corpus_import(
    src: Path = typer.Argument(..., help="The corpus directory."),
    fmt: str = typer.Option(..., "--format", help="commonvoice (clips/ + validated.tsv) or hf (a save_to_disk "
                                                  "directory, or an audiofolder with metadata.csv)."),
    dialect: str = typer.Option(..., help="The dialect the batch belongs to."),
    batch_id: str = typer.Option(None, help="Batch id (default <format>-<directory name>)."),
    tsv: str = typer.Option("validated.tsv", help="commonvoice: the release's TSV to read."),
    text_column: str = typer.Option(None, help="hf: the transcript column (default: sentence, text, transcription...)."),
    speaker_column: str = typer.Option(None, help="hf: the speaker column (default: client_id, speaker_id, speaker)."),
    out: Path = typer.Option(None, help="Incoming root (default $MLOC_HOME/incoming)."),
) -> None:
    """Write a Common Voice release or a Hugging Face datasets directory as an incoming batch: the
    ingest validates it like any other (bad rows are quarantined with their reason)."""
    from mloc_dagster.core.data.imports import CorpusImportError, import_corpus
    from mloc_dagster.partitions import is_valid_dialect

    if not is_valid_dialect(dialect):
        raise typer.BadParameter(f"{dialect!r}: dialect keys are lowercase [a-z0-9-], no commas", param_hint="--dialect")
    try:
        summary = import_corpus(fmt, src, out or MlocPaths.from_env().incoming, dialect, batch_id, tsv=tsv,
                                text_column=text_column, speaker_column=speaker_column)
    except CorpusImportError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    console.print(f"[green]wrote[/] {summary.batch_dir} ({summary.rows} rows, {summary.audio_files} audio files); "
                  "the incoming sensor ingests it, or: dagster job launch -j ingest_job")


@dialect_app.command("add")
def dialect_add(dialect: str) -> None:
    """Add a dialect partition (normally the incoming sensor does this)."""
    from dagster import DagsterInstance

    from mloc_dagster.partitions import dialect_partitions, is_valid_dialect

    if not is_valid_dialect(dialect):
        raise typer.BadParameter(f"{dialect!r}: dialect keys are lowercase [a-z0-9-], no commas")
    with DagsterInstance.get() as instance:
        instance.add_dynamic_partitions(dialect_partitions.name, [dialect])
    console.print(f"added dialect {dialect}")


@dialect_app.command("list")
def dialect_list() -> None:
    from dagster import DagsterInstance

    from mloc_dagster.partitions import dialect_partitions

    with DagsterInstance.get() as instance:
        for d in instance.get_dynamic_partitions(dialect_partitions.name):
            console.print(d)


@app.command("demo")
def demo(
    ui: bool = typer.Option(False, "--ui", help="Keep `dagster dev` running at the end for the UI."),
    utterances: int = typer.Option(0, help="Override utterances per dialect (0: demo defaults)."),
    jobs: int = typer.Option(DEMO_JOBS, help="Jobs in the demo's training run."),
    timebox: int = typer.Option(DEMO_TIMEBOX_S, help="Seconds per training job."),
    base_seconds: float = typer.Option(BASE_TRAIN_S, help="Time cap of the base pre-training (it stops at 1,000 steps)."),
    tts: bool = typer.Option(True, "--tts/--no-tts", help="Also run the TTS track (base TTS, one TTS job, stop-loss)."),
) -> None:
    """Run the end-to-end demo on the embedded default (SQLite, local files)."""
    from mloc_dagster.cli.demo import run_demo

    raise typer.Exit(run_demo(ui=ui, utterances=utterances or None, jobs=jobs, timebox_s=timebox,
                              base_seconds=base_seconds, tts=tts))


app.add_typer(run_app, name="run")
app.add_typer(base_model_app, name="base-model")
app.add_typer(candidate_app, name="candidate")
node_app.command("head")(node_head)  # the pool on a Ray cluster
node_app.command("join")(node_join)
app.add_typer(node_app, name="node")
app.add_typer(gpu_app, name="gpu", help="GPU arbiter: leases, queue, devices, counters.")
app.add_typer(metrics_app, name="metrics")
app.command("export")(export_command)


if __name__ == "__main__":
    app()
