"""`mloc node list|set-reputation`: how much each node's adapters are trusted."""

import json

import typer
from rich.console import Console
from rich.table import Table

node_app = typer.Typer(no_args_is_help=True, help="Nodes and their reputation.")
console = Console()


def _store():
    from mloc_dagster.core.state import StateStore, resolve_state_url

    return StateStore(resolve_state_url())


@node_app.command("list")
def list_nodes(as_json: bool = typer.Option(False, "--json")) -> None:
    """Nodes the store knows (a node never seen has full reputation)."""
    nodes = _store().list_nodes()
    if as_json:
        print(json.dumps([{"node_id": n.node_id, "reputation": n.reputation,
                           "updated_at": n.updated_at.isoformat() if n.updated_at else None} for n in nodes], indent=2))
        return
    table = Table()
    for col in ("node", "reputation", "updated"):
        table.add_column(col)
    for n in nodes:
        table.add_row(n.node_id, f"{n.reputation:.2f}", n.updated_at.strftime("%Y-%m-%d %H:%M:%S") if n.updated_at else "")
    console.print(table)


@node_app.command("set-reputation")
def set_reputation(node_id: str, reputation: float = typer.Argument(..., min=0.0, max=1.0)) -> None:
    """Below the trust bar (0.7) a node's adapters only reach experimental candidates."""
    value = _store().set_node_reputation(node_id, reputation)
    console.print(f"{node_id}: reputation {value:.2f}")
