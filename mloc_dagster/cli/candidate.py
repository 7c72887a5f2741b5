"""`mloc candidate list|show`: the story of every candidate -- what went in, on which base, how
the gate decided, whether it was promoted, and whether its base model is still the current one."""

import json

import typer
from rich.console import Console
from rich.table import Table

candidate_app = typer.Typer(no_args_is_help=True, help="Candidates: merged adapters, their gate and promotion.")
console = Console()


def _context():
    from dagster import DagsterInstance

    from mloc_dagster.core.state import StateStore
    from mloc_dagster.core.state.engine import resolve_state_url

    return DagsterInstance.get(), StateStore(resolve_state_url())


def _story(store, candidate, current_bases: dict[str, str | None]) -> dict:
    current_base = current_bases.get(candidate.track)
    promotions = [p for p in store.list_promotions(candidate.dialect, limit=None)
                  if p.candidate_id == candidate.candidate_id]
    return {
        "candidate_id": candidate.candidate_id, "dialect": candidate.dialect, "track": candidate.track,
        "created_at": candidate.created_at.isoformat(), "training_run_id": candidate.training_run_id,
        "dagster_run_id": candidate.dagster_run_id, "base_model": candidate.base_model,
        "stale": bool(current_base and candidate.base_model != current_base),
        "sources": [s.to_dict() for s in candidate.sources], "trusted": candidate.trusted,
        "gate_decision": candidate.gate_decision, "gate_report": candidate.gate_report_path,
        "promotions": [{"branch": p.branch, "promoted_at": p.promoted_at.isoformat()} for p in promotions],
        "adapter_path": candidate.adapter_path, "sha256": candidate.sha256, "merge": candidate.details,
    }


def _current_base(instance) -> dict[str, str | None]:
    """The current base model's version per track (a candidate on another is stale)."""
    from mloc_dagster.assets.lineage import latest_metadata

    bases = {"asr": latest_metadata(instance, "base_model"), "tts": latest_metadata(instance, "tts_base_model")}
    return {track: base["version"] if base else None for track, base in bases.items()}


@candidate_app.command("list")
def list_candidates(dialect: str = typer.Option(None, "--dialect"), limit: int = typer.Option(50),
                    as_json: bool = typer.Option(False, "--json")) -> None:
    """Candidates, newest first: sources, base model, gate decision, promotion."""
    instance, store = _context()
    current = _current_base(instance)
    stories = [_story(store, c, current) for c in store.list_candidates(dialect, limit=limit)]
    if as_json:
        print(json.dumps(stories, indent=2))
        return
    table = Table()
    for col in ("candidate", "dialect", "track", "run", "sources", "base model", "gate", "promoted", "created"):
        table.add_column(col, no_wrap=col in ("candidate", "dialect"))
    for s in stories:
        base = (s["base_model"] or "?")[:12] + (" (stale)" if s["stale"] else "")
        promoted = ", ".join(p["branch"] for p in s["promotions"]) or "-"
        sources = ", ".join(f"{x['run_id']}/{x['job_index']}@{x['node_id']}" for x in s["sources"])
        table.add_row(s["candidate_id"], s["dialect"], s["track"], s["training_run_id"] or "(by hand)", sources, base,
                      s["gate_decision"] or "not gated", promoted, s["created_at"][:19])
    console.print(table)


@candidate_app.command("show")
def show(candidate_id: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """One candidate in full."""
    instance, store = _context()
    candidate = store.get_candidate(candidate_id)
    if candidate is None:
        console.print(f"[red]error:[/] no candidate {candidate_id}", soft_wrap=True)
        raise typer.Exit(1)
    story = _story(store, candidate, _current_base(instance))
    if as_json:
        print(json.dumps(story, indent=2))
        return
    for key, value in story.items():
        if key not in ("sources", "merge", "promotions"):
            console.print(f"[bold]{key}[/]: {value}")
    console.print("[bold]promotions[/]: " + (", ".join(f"{p['branch']} at {p['promoted_at'][:19]}"
                                                      for p in story["promotions"]) or "none"))
    table = Table(title="sources")
    for col in ("run", "job", "node", "base model", "sha256", "path"):
        table.add_column(col)
    for x in story["sources"]:
        table.add_row(x["run_id"], str(x["job_index"]), x["node_id"] or "", (x["base_model"] or "")[:12],
                      (x["sha256"] or "")[:12], x["path"])
    console.print(table)
