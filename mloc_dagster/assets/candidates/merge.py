"""merged_candidate: the adapters of a dialect, screened and merged into a candidate (then
``gate.py``: gate_report, ``promotion.py``: production_adapter and candidate_job).

Identity, not recency: the candidate a run merges is the one that run gates and promotes. The
merge records the candidate under the run's root Dagster run id (a re-execution from failure
keeps it), and the gate and the promotion look it up by that id. A candidate is built from the
adapters of one base model, evaluated on that base, and compared with production only where
production is on the same base.

Trust (SPEC §5, issue 10): every merge screens its adapters (``core/merging/screening.py``: refused if
unreadable, empty or with a dev loss that is not sane; weighted by direction against a trusted
reference update when ``MergeConfig.reference_adapter`` names one; norm-bounded) and moves each
node's reputation once (``core.pool.reputation``). Adapters of nodes below ``min_trusted_reputation``
(0.7) never enter a stable candidate:

- every node trusted: one candidate, ``trusted``, promoted to branch ``stable``;
- no node trusted: one candidate of all adapters, not trusted, promoted to ``experimental``;
- both: the run's candidate (its identity, what its gate checks guard) is the **stable** one,
  built from the trusted adapters only and claiming them; beside it an **experimental
  companion** ``<candidate id>-exp`` merges all the adapters and claims only the untrusted ones
  (its ``details.companion_of`` and the stable one's ``details.experimental_candidate`` link
  them). The gate evaluates both (the companion's outcome moves only the untrusted nodes: it is
  how they climb back) and the promotion puts the companion, if it passed, on ``experimental``.
  A stable candidate that fails its blocking checks stops the promotion of both.

So one low-reputation node no longer demotes everyone else's work to experimental.

A distributed round's adapter has no node of its own: the nodes inside it are those its round
merges recorded (``StateStore.adapter_nodes``, its start adapters' included), its reputation the
mean of theirs by merged samples. It is trusted as its round merges judged it (``judge``): every
slice inside came from a node at or above the bar when it was merged. A slice of a node below the
bar went into its round's experimental sibling only, so the stable candidate is built without it
and the experimental companion merges the sibling in the round adapter's place.
"""

import shutil
from dataclasses import dataclass
from pathlib import Path

import dagster as dg

from mloc_dagster.assets.lineage import require_metadata
from mloc_dagster.assets.tracks import track_of
from mloc_dagster.assets.training.adapters import adapter_checkpoint
from mloc_dagster.core.merging.candidates import merge_candidate
from mloc_dagster.core.merging.merge import MergeResult
from mloc_dagster.core.merging.screening import markdown_table, reputation_updates
from mloc_dagster.core.pool.reputation import source_shares
from mloc_dagster.core.publish import unique_id
from mloc_dagster.core.state import StateStore
from mloc_dagster.core.state.candidates import AdapterClaimConflict, AdapterRef
from mloc_dagster.core.state.schema import ASR
from mloc_dagster.partitions import dialect_partitions
from mloc_dagster.resources.artifacts import ArtifactStore
from mloc_dagster.resources.gpu import GpuArbiter
from mloc_dagster.resources.state import StateStoreResource

MIN_TRUSTED_REPUTATION = 0.7
CLAIM_ATTEMPTS = 3



class MergeConfig(dg.Config):
    method: str = "weighted_mean"  # or trimmed_mean, median
    min_trusted_reputation: float = MIN_TRUSTED_REPUTATION
    # A trusted reference update (a checkpoint trained by the server on a trusted root set,
    # core.merging.screening.train_reference_update): adapters are then also scored for direction and
    # dev-loss sanity against it. Empty: screening without a direction score.
    reference_adapter: str = ""


def root_run_id(context: dg.AssetExecutionContext) -> str:
    return context.run.root_run_id or context.run_id


def pinned_inputs(context: dg.AssetExecutionContext, store: StateStore, dialect: str,
                  track: str = ASR) -> dict[str, str]:
    """Base model (hash, path) and dataset version of the training run of ``track`` that asked
    for this candidate (tag ``mloc/run_id``); for a candidate materialized by hand, the current
    ones (the track's base asset: ``base_model``, ``tts_base_model``)."""
    run = store.get_run(context.run.tags.get("mloc/run_id", ""))
    if run is not None and run.track == track:
        hashes = [j.base_model for j in store.jobs_for_run(run.run_id) if j.base_model]
        if hashes:
            return {"base_model": hashes[-1], "base_model_path": run.base_model_version,
                    "dataset_version": run.dataset_version, "training_run_id": run.run_id}
    base = require_metadata(context.instance, track_of(track).base_asset)
    dataset = require_metadata(context.instance, "dataset_version", dialect)
    return {"base_model": base["version"], "base_model_path": base["path"], "dataset_version": dataset["path"],
            "training_run_id": run.run_id if run else None}


def already_merged(store: StateStore, training_run_id: str | None) -> str | None:
    """Where a chain's adapters went when another run's merge claimed them first, or None."""
    if not training_run_id:
        return None
    claimed = sorted({j.candidate_id for j in store.jobs_for_run(training_run_id) if j.candidate_id})
    return ", ".join(claimed) or None


def merge_refs(refs: list[AdapterRef], reputation: dict[str, float], out: Path, config: MergeConfig):
    """Screen and merge these adapters (base weight: node reputation) into ``out``."""
    try:
        return merge_candidate([r.path for r in refs], [reputation[r.key] for r in refs], out, method=config.method,
                               reference=config.reference_adapter or None,
                               node_of={r.path: r.node_id for r in refs}, overwrite=False)
    except ValueError as exc:
        raise dg.Failure(str(exc)) from exc


def judge(store: StateStore, ref: AdapterRef, contents: dict[str, float], bar: float) -> tuple[float, bool]:
    """An adapter's base weight (its nodes' reputation, by merged samples; 1.0 without a node) and
    whether it may enter a stable candidate: a job's node is at or above the bar now; a round
    adapter was judged trusted by its round merges."""
    if not contents:
        return 1.0, True
    weight = sum(store.node_reputation(n) * a for n, a in contents.items()) / sum(contents.values())
    merge = None if ref.node_id else store.round_merge(ref.run_id, ref.job_index)
    if merge is None:
        return weight, weight >= bar
    return weight, merge.trusted and ref.path != merge.experimental_path


def experimental_sibling(store: StateStore, ref: AdapterRef) -> AdapterRef | None:
    """A round adapter's experimental sibling (its round's slices of nodes below the bar merged in), if any."""
    merge = None if ref.node_id else store.round_merge(ref.run_id, ref.job_index)
    if merge is None or not merge.experimental_path:
        return None
    return AdapterRef(ref.run_id, ref.job_index, None, merge.experimental_sha256, merge.experimental_path,
                      ref.base_model)


def nodes_inside(contents: dict[str, float]) -> str:
    return ", ".join(sorted(contents)) or "–"


def source_table(refs: list[AdapterRef], reputation: dict[str, float], stable: set[str],
                 contents: dict[str, dict[str, float]]) -> str:
    lines = ["| run | job | nodes | reputation | candidate | sha256 |", "|---|---|---|---|---|---|"]
    lines += [f"| {r.run_id} | {r.job_index} | {nodes_inside(contents[r.key])} | {reputation[r.key]:.2f} | "
              f"{'stable' if r.key in stable else 'experimental'} | {(r.sha256 or '')[:12]} |" for r in refs]
    return "\n".join(lines)


@dg.asset(partitions_def=dialect_partitions, deps=[adapter_checkpoint], group_name="candidates",
          kinds={"pytorch", "safetensors"}, pool="gpu", output_required=False,
          description="Every unclaimed adapter of the dialect on the run's base model, across runs and nodes, "
                      "screened and merged in ΔW space (norm bound, reputation-weighted, truncated SVD to rank r). "
                      "Adapters of nodes below the trust bar only enter an experimental companion candidate. "
                      "Skipped (gate and promotion too) when a chain's adapters were already merged by another run.")
def merged_candidate(context: dg.AssetExecutionContext, config: MergeConfig, artifacts: ArtifactStore,
                     state: StateStoreResource, gpu: GpuArbiter):
    dialect = context.partition_key
    store = state.store()
    root = root_run_id(context)
    if (done := store.candidate_of_dagster_run(root)) is not None:
        raise dg.Failure(f"this run already merged {done.candidate_id}; launch a new candidate_job for new adapters")
    pinned = pinned_inputs(context, store, dialect)
    candidate_id = unique_id("cand")  # never another candidate's name: its directory is never overwritten
    companion_id = f"{candidate_id}-exp"
    out = artifacts.paths.candidates / dialect / candidate_id
    for attempt in range(1, CLAIM_ATTEMPTS + 1):
        unclaimed = store.unclaimed_adapters(dialect, latest_per_run=True)
        refs = [r for r in unclaimed if r.base_model == pinned["base_model"]]
        other_bases = [r for r in unclaimed if r.base_model != pinned["base_model"]]
        if not refs and (where := already_merged(store, pinned["training_run_id"])):
            context.log.info(f"nothing new to merge: the adapters of {pinned['training_run_id']} are in {where}")
            return
        if not refs:
            raise dg.Failure(f"no new adapter for {dialect} on base model {pinned['base_model'][:12]} since its "
                             f"last candidate ({len(other_bases)} unclaimed on other base models)")
        contents = {r.key: store.adapter_nodes(r) for r in refs}
        judged = {r.key: judge(store, r, contents[r.key], config.min_trusted_reputation) for r in refs}
        reputation = {key: weight for key, (weight, _) in judged.items()}
        trusted_refs = [r for r in refs if judged[r.key][1]]
        untrusted_refs = [r for r in refs if not judged[r.key][1]]
        stable_refs = trusted_refs or refs  # nobody trusted: one experimental candidate, as before
        siblings = {r.key: sib for r in trusted_refs if (sib := experimental_sibling(store, r)) is not None}
        companion_refs = [siblings.get(r.key, r) for r in trusted_refs] + untrusted_refs
        with gpu.lease("MERGE", context) as lease:
            result, sha = merge_refs(stable_refs, reputation, out, config)
            companion = None
            if trusted_refs and (untrusted_refs or siblings):
                try:
                    companion = Companion(companion_id, out.with_name(companion_id), *merge_refs(
                        companion_refs, reputation, out.with_name(companion_id), config))
                except dg.Failure as exc:
                    context.log.warning(f"no experimental companion: {exc.description}")
        details = result.summary() | {"experimental_candidate": companion.candidate_id if companion else None}
        try:
            store.record_candidate(candidate_id=candidate_id, dialect=dialect, adapter_path=str(out), sha256=sha,
                                   sources=stable_refs, trusted=bool(trusted_refs), details=details,
                                   dagster_run_id=root, **pinned)
            break
        except AdapterClaimConflict as exc:  # another merge took some of them first: merge the rest
            context.log.warning(f"attempt {attempt}: {exc}")
            discard_unrecorded(out, out.with_name(companion_id))
    else:
        raise dg.Failure(f"adapters kept being claimed by concurrent merges ({CLAIM_ATTEMPTS} attempts)")
    if companion is not None:
        companion = record_companion(context, store, companion, candidate_id, companion_refs, untrusted_refs,
                                     dialect, pinned)
    # Screening moves reputation (core/pool/reputation.py): each node once, from the merge it was in.
    untrusted_paths = {r.path for r in untrusted_refs}
    rows = result.screening + [row for row in (companion.result.screening if companion else [])
                               if row["source"] in untrusted_paths]
    moved = store.apply_reputation_updates(reputation_updates(rows, {r.path: r.node_id for r in refs}))
    left = ", ".join(f"{r.key} (base {(r.base_model or 'unknown')[:12]})" for r in other_bases) or "none"
    yield dg.MaterializeResult(
        data_version=dg.DataVersion(sha),
        metadata={
            "candidate_id": candidate_id, "adapters": len(stable_refs), "rejected": len(result.rejected),
            "clipped": sum(1 for row in result.screening if row["clipped"]),
            "max_truncation_error": float(result.max_truncation_error),
            "trusted": bool(trusted_refs), "method": config.method, "sha256": sha, "base_model": pinned["base_model"],
            "training_run_id": pinned["training_run_id"] or "", "left_for_other_bases": left,
            "experimental_candidate": companion.candidate_id if companion else "",
            "untrusted_adapters": len(untrusted_refs),
            "stable_nodes": dg.MetadataValue.json(source_shares(contents[r.key] for r in stable_refs)),
            "experimental_only_nodes": dg.MetadataValue.json(sorted(
                {n for r in companion_refs for n in store.adapter_nodes(r)}
                - {n for r in stable_refs for n in contents[r.key]}) if companion else []),
            "sources": dg.MetadataValue.md(source_table(refs, reputation, {r.key for r in stable_refs}, contents)),
            "screening": dg.MetadataValue.md(markdown_table(result.screening)),
            **({"experimental_screening": dg.MetadataValue.md(markdown_table(companion.result.screening))}
               if companion else {}),
            "path": dg.MetadataValue.path(str(out)),
            "reputation_after": dg.MetadataValue.json(moved),
            **lease.metadata(),
        },
    )


@dataclass(frozen=True)
class Companion:
    """The experimental candidate merged beside a stable one: every adapter, untrusted ones included."""

    candidate_id: str
    path: Path
    result: MergeResult
    sha256: str


def record_companion(context: dg.AssetExecutionContext, store: StateStore, companion: Companion, stable_id: str,
                     refs: list[AdapterRef], untrusted: list[AdapterRef], dialect: str,
                     pinned: dict) -> Companion | None:
    """Record the experimental companion: all adapters merged, claiming only the untrusted ones
    (the stable candidate claimed the rest). It is not the run's candidate (no Dagster run id):
    the run's gate and promotion reach it through the stable candidate's ``details``."""
    try:
        store.record_candidate(candidate_id=companion.candidate_id, dialect=dialect, adapter_path=str(companion.path),
                               sha256=companion.sha256, sources=refs, claim=untrusted, trusted=False,
                               details=companion.result.summary() | {"companion_of": stable_id}, **pinned)
    except AdapterClaimConflict as exc:
        context.log.warning(f"experimental companion not recorded: {exc}")
        return None
    return companion


def discard_unrecorded(*paths: Path) -> None:
    """Directories merged by an attempt whose candidate was never recorded: nothing refers to them."""
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


defs = dg.Definitions(assets=[merged_candidate])
