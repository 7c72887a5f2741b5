"""The code location loads, and its shape is what reviewers expect (a snapshot, as DOP does)."""

import json
from pathlib import Path

import dagster as dg

from mloc_dagster.definitions import defs

SNAPSHOT = Path(__file__).parent / "snapshots" / "definitions.json"


def shape() -> dict:
    repo = defs.get_repository_def()
    return {
        "assets": sorted(k.to_user_string() for k in repo.asset_graph.get_all_asset_keys()),
        "asset_checks": sorted(f"{c.asset_key.to_user_string()}:{c.name}" for c in repo.asset_graph.asset_check_keys),
        "jobs": sorted(j.name for j in repo.get_all_jobs() if not j.name.startswith("__")),
        "sensors": sorted(s.name for s in repo.sensor_defs),
        "resources": sorted(defs.resources or {}),
    }


def test_definitions_load():
    dg.Definitions.validate_loadable(defs)


def test_definitions_snapshot():
    current = shape()
    if not SNAPSHOT.exists():  # writes it and fails: review the new file, commit it, re-run
        SNAPSHOT.parent.mkdir(exist_ok=True)
        SNAPSHOT.write_text(json.dumps(current, indent=2) + "\n")
        raise AssertionError(f"wrote {SNAPSHOT}; review and commit it")
    assert current == json.loads(SNAPSHOT.read_text()), (
        "definitions changed; if intended, delete tests/snapshots/definitions.json and re-run")


def test_every_asset_points_at_its_source():
    """Code references (the UI shows them on the asset page): the file and line of each asset's body."""
    graph = defs.resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        refs = graph.get(key).metadata["dagster/code_references"].code_references
        path = Path(refs[0].file_path)
        assert path.is_file() and "mloc_dagster" in path.parts, (key, path)
        assert refs[0].line_number and key.path[-1] in path.read_text(), (key, path)
