"""production_adapter: the candidate this run merged and gated, published on its branch; and
``candidate_job`` (merge, gate, promotion), which never retries: a failed gate is a decision.
"""

from pathlib import Path

import dagster as dg

from mloc_dagster.assets.candidates.gate import companion_of, gate_candidate, gate_report
from mloc_dagster.assets.candidates.merge import merged_candidate
from mloc_dagster.assets.lineage import latest_metadata
from mloc_dagster.assets.tracks import track_of
from mloc_dagster.core.publish import publish_copy
from mloc_dagster.core.state import StateStore
from mloc_dagster.core.state.candidates import Candidate
from mloc_dagster.core.state.schema import ASR
from mloc_dagster.partitions import dialect_partitions
from mloc_dagster.resources.artifacts import ArtifactStore
from mloc_dagster.resources.state import StateStoreResource


@dg.asset(partitions_def=dialect_partitions, deps=[gate_report], group_name="candidates",
          kinds={"safetensors"},
          description="The promoted adapter of the dialect: the candidate this run merged and gated, on branch "
                      "stable (experimental when every source node is below the trust bar); its experimental "
                      "companion, when it passed its own gate, on branch experimental.")
def production_adapter(context: dg.AssetExecutionContext, artifacts: ArtifactStore,
                       state: StateStoreResource) -> dg.MaterializeResult:
    dialect = context.partition_key
    store = state.store()
    candidate = gate_candidate(context, store)
    if candidate.gate_decision != "passed":
        raise dg.Failure(f"candidate {candidate.candidate_id} has not passed its gate ({candidate.gate_decision})")
    branch = "stable" if candidate.trusted else "experimental"
    out = promote(artifacts, store, dialect, branch, candidate)
    companion = companion_of(store, candidate)
    experimental = {}
    if companion is not None:
        experimental = {"experimental_candidate": companion.candidate_id,
                        "experimental_decision": companion.gate_decision or "not gated"}
        if companion.gate_decision == "passed":
            experimental["experimental_path"] = dg.MetadataValue.path(
                str(promote(artifacts, store, dialect, "experimental", companion)))
    current = latest_metadata(context.instance, "base_model")
    return dg.MaterializeResult(
        data_version=dg.DataVersion(candidate.sha256),
        metadata={"branch": branch, "candidate_id": candidate.candidate_id, "sha256": candidate.sha256,
                  "base_model": candidate.base_model or "",
                  "stale": bool(current and candidate.base_model != current.get("version")),
                  "path": dg.MetadataValue.path(str(out)), **experimental},
    )


def promote(artifacts: ArtifactStore, store: StateStore, dialect: str, branch: str, candidate: Candidate,
            track: str = ASR) -> Path:
    """Publish the candidate's adapter under production (whole or not at all; a half copy left by a
    crash is rebuilt, core/publish.py) and record the promotion."""
    parts = track_of(track).subdir
    out = publish_copy(candidate.adapter_path,
                       artifacts.paths.adapters.joinpath("production", *parts, dialect, branch, candidate.candidate_id))
    store.record_promotion(dialect, branch, candidate.candidate_id)
    return out


candidate_job = dg.define_asset_job(
    "candidate_job", selection=[merged_candidate, gate_report, production_adapter],
    partitions_def=dialect_partitions,
    # A failed gate is a decision, not a crash: never retry it.
    tags={"dagster/max_retries": "0"},
    description="Merge the dialect's new adapters, evaluate the candidate at the gate, promote if it passes.",
)


defs = dg.Definitions(assets=[production_adapter], jobs=[candidate_job])
