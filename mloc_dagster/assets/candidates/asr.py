"""merged_candidate → gate_report (blocking checks) → production_adapter, per dialect.

Identity, not recency: the candidate a run merges is the one that run gates and promotes. The
merge records the candidate under the run's root Dagster run id (a re-execution from failure
keeps it), and the gate and the promotion look it up by that id. A candidate is built from the
adapters of one base model, evaluated on that base, and compared with production only where
production is on the same base.

Trust (SPEC §5, issue 10): every merge screens its adapters (``core/merging/screening.py``: refused if
unreadable, empty or with a dev loss that is not sane; weighted by direction against a trusted
reference update when ``MergeConfig.reference_adapter`` names one; norm-bounded) and moves each
node's reputation once (``core.reputation``). Adapters of nodes below ``min_trusted_reputation``
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

Gates judge the model, not the node (``core.reputation.evidence_of_harm``): a passed gate raises
the reputation of the nodes inside the candidate, by their share; a failed one lowers it only
with evidence of harm (worse than production or the base model, a base-dialect regression), never
for missing an absolute CER/WER limit alone.
"""


import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import dagster as dg

from mloc_dagster.assets.lineage import latest_metadata, require_metadata
from mloc_dagster.assets.training.adapters import adapter_checkpoint
from mloc_dagster.core.adapters.format import InvalidAdapter, read_node_result
from mloc_dagster.core.gates.config import load_thresholds
from mloc_dagster.core.gates.gate import GateConfigError, GateThresholds, evaluate_gates
from mloc_dagster.core.gates.scoring import score
from mloc_dagster.core.merging.candidates import Recognizer, merge_candidate
from mloc_dagster.core.merging.merge import MergeResult
from mloc_dagster.core.merging.screening import markdown_table, reputation_updates
from mloc_dagster.core.pool.reputation import evidence_of_harm, reputation_from_gate, source_shares
from mloc_dagster.core.publish import publish_copy, unique_id
from mloc_dagster.core.state import StateStore
from mloc_dagster.core.state.candidates import RELEASED, AdapterClaimConflict, AdapterRef, Candidate
from mloc_dagster.core.state.schema import ASR, TTS
from mloc_dagster.partitions import dialect_partitions
from mloc_dagster.resources.artifacts import ArtifactStore
from mloc_dagster.resources.gpu import GpuArbiter
from mloc_dagster.resources.state import StateStoreResource

MIN_TRUSTED_REPUTATION = 0.7
GATES = ("cer_gate", "wer_gate", "improvement_gate", "regression_gate")
CLAIM_ATTEMPTS = 3


class MergeConfig(dg.Config):
    method: str = "weighted_mean"  # or trimmed_mean, median
    min_trusted_reputation: float = MIN_TRUSTED_REPUTATION
    # A trusted reference update (a checkpoint trained by the server on a trusted root set,
    # core.screening.train_reference_update): adapters are then also scored for direction and
    # dev-loss sanity against it. Empty: screening without a direction score.
    reference_adapter: str = ""


def root_run_id(context: dg.AssetExecutionContext) -> str:
    return context.run.root_run_id or context.run_id


def pinned_inputs(context: dg.AssetExecutionContext, store: StateStore, dialect: str,
                  track: str = ASR) -> dict[str, str]:
    """Base model (hash, path) and dataset version of the training run of ``track`` that asked
    for this candidate (tag ``mloc/run_id``); for a candidate materialized by hand, the current
    ones (``base_model``, or ``tts_base_model`` for the TTS track)."""
    run = store.get_run(context.run.tags.get("mloc/run_id", ""))
    if run is not None and run.track == track:
        hashes = [j.base_model for j in store.jobs_for_run(run.run_id) if j.base_model]
        if hashes:
            return {"base_model": hashes[-1], "base_model_path": run.base_model_version,
                    "dataset_version": run.dataset_version, "training_run_id": run.run_id}
    base = require_metadata(context.instance, "tts_base_model" if track == TTS else "base_model")
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


def learning_curves(candidate: Candidate) -> str:
    """Each source run's dev CER per job (from its checkpoint's result.json), as markdown."""
    lines = ["| run | job | samples seen | dev CER |", "|---|---|---|---|"]
    for src in candidate.sources:
        try:
            curve = read_node_result(src.path, required=False).get("learning_curve") or []
        except InvalidAdapter as exc:  # the gate reports on; what is wrong with the file is said here
            lines.append(f"| {src.run_id} | {src.job_index} | – | {exc.reason} |")
            continue
        lines += [f"| {src.run_id} | {p.get('job_index')} | {p.get('total_samples', '')} | "
                  f"{float(p.get('dev_cer', float('nan'))):.4f} |" for p in curve]
    return "\n".join(lines) if len(lines) > 2 else "no learning curve recorded"


GATES_FILE = "gates.json"  # $MLOC_HOME/gates.json: {"<dialect>": {"max_cer": 0.2, ...}}


class GateConfig(dg.Config):
    # Per-dialect overrides of GateThresholds, e.g. {"en-gb-scotland": {"max_cer": 0.2}}; they win
    # over $MLOC_HOME/gates.json, which wins over the defaults (CER 0.15, WER 0.20, ...).
    thresholds: dict[str, dict[str, float]] = {}
    bootstrap_samples: int = 2000
    # Re-gate a named candidate instead of the one this run merged (e.g. after changing thresholds).
    candidate_id: str = ""


def gate_candidate(context: dg.AssetExecutionContext, store: StateStore, candidate_id: str = "",
                   track: str = ASR) -> Candidate:
    """The candidate of ``track`` this run merged (or the one named in config)."""
    candidate = (store.get_candidate(candidate_id) if candidate_id
                 else store.candidate_of_dagster_run(root_run_id(context)))
    job = "tts_candidate_job" if track == TTS else "candidate_job"
    if candidate is None or candidate.track != track:
        raise dg.Failure(f"no {track} candidate {candidate_id}" if candidate_id else
                         f"this run merged no {track} candidate: run the gate with its merge ({job}), "
                         "or name one in config candidate_id")
    if candidate.dialect != context.partition_key:
        raise dg.Failure(f"candidate {candidate.candidate_id} is for {candidate.dialect}, not {context.partition_key}")
    if candidate.gate_decision == RELEASED:  # runs/verdicts.py: its adapters may be in another candidate now
        raise dg.Failure(f"candidate {candidate.candidate_id} was released ({(candidate.details or {}).get('released')}): "
                         "it is never gated or promoted; its adapters go into the next candidate")
    return candidate


def thresholds_for(dialect: str, config: GateConfig, artifacts: ArtifactStore) -> GateThresholds:
    return load_thresholds(artifacts.paths.home / GATES_FILE, dialect, {"bootstrap_samples": config.bootstrap_samples},
                           config.thresholds.get(dialect, {}))


def config_refusal(store: StateStore, candidate: Candidate, checks: Sequence[str], reason: str,
                   path: Path) -> dg.MaterializeResult:
    """A gate whose own configuration is broken judges nothing: every check fails with the
    reason (so promotion is blocked and the run's chain hears of it), nobody's reputation moves,
    and the candidate can be re-gated once the file is fixed (config ``candidate_id``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    gates = [{"name": name, "passed": False, "value": None, "limit": None, "floor": None,
              "description": f"gate configuration: {reason}"} for name in checks]
    path.write_text(json.dumps({"candidate_id": candidate.candidate_id, "decision": "failed",
                                "config_error": reason, "gates": gates}, indent=2))
    store.set_gate_result(candidate.candidate_id, "failed", str(path))
    return dg.MaterializeResult(
        metadata={"candidate_id": candidate.candidate_id, "decision": "failed", "config_error": reason,
                  "path": dg.MetadataValue.path(str(path))},
        check_results=[dg.AssetCheckResult(check_name=name, passed=False, metadata={"reason": reason})
                       for name in checks])


def companion_of(store: StateStore, candidate: Candidate) -> Candidate | None:
    """The experimental companion merged beside this (stable) candidate, if any."""
    companion_id = (candidate.details or {}).get("experimental_candidate")
    return store.get_candidate(companion_id) if companion_id else None


def write_gate_report(artifacts: ArtifactStore, dialect: str, candidate_id: str, report, store: StateStore) -> Path:
    path = artifacts.paths.reports / dialect / f"{candidate_id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(report.to_json())
    store.set_gate_result(candidate_id, report.decision, str(path))
    return path


@dg.asset(partitions_def=dialect_partitions, deps=[merged_candidate], group_name="candidates",
          kinds={"pytorch"}, pool="gpu",
          check_specs=[dg.AssetCheckSpec(name, asset="gate_report", blocking=True) for name in GATES],
          description="The candidate this run merged, on its own base model, against production on that base "
                      "(else the base model) and the base dialect; always materializes (a failed gate is a "
                      "report too). Its blocking checks guard production_adapter.")
def gate_report(context: dg.AssetExecutionContext, config: GateConfig, artifacts: ArtifactStore,
                state: StateStoreResource, gpu: GpuArbiter) -> dg.MaterializeResult:
    dialect = context.partition_key
    store = state.store()
    candidate = gate_candidate(context, store, config.candidate_id)
    try:
        thresholds = thresholds_for(dialect, config, artifacts)
    except GateConfigError as exc:
        return config_refusal(store, candidate, GATES, str(exc),
                              artifacts.paths.reports / dialect / f"{candidate.candidate_id}.json")
    base = require_metadata(context.instance, "base_model")
    dataset_path = candidate.dataset_version or require_metadata(context.instance, "dataset_version", dialect)["path"]
    base_dataset = require_metadata(context.instance, "dataset_version", base["base_dialect"])
    production = store.production(dialect, "stable")
    stale = production is not None and production.base_model != candidate.base_model

    with gpu.lease("EVAL", context) as lease:
        recognize = Recognizer(candidate.base_model_path or base["path"], artifacts.paths.home / "features",
                               lease.torch_device)
        cand = recognize(candidate.adapter_path, dataset_path)
        dialect_base = recognize(None, dataset_path)
        prod = recognize(production.adapter_path, dataset_path) if production and not stale else None
        base_cand = recognize(candidate.adapter_path, base_dataset["path"])
        base_ref = recognize(None, base_dataset["path"])
        companion = None if config.candidate_id else companion_of(store, candidate)
        if companion is not None:
            comp_results = (recognize(companion.adapter_path, dataset_path),
                            recognize(companion.adapter_path, base_dataset["path"]))
    reference_label = "production" if prod is not None else "base model"
    report = evaluate_gates(cand, prod if prod is not None else dialect_base, base_candidate=base_cand,
                            base_reference=base_ref, thresholds=thresholds, reference_label=reference_label,
                            dialect_base=dialect_base)
    path = write_gate_report(artifacts, dialect, candidate.candidate_id, report, store)
    moved = {} if config.candidate_id else store.apply_reputation_updates(reputation_from_gate(  # re-gating: once
        report.decision, source_shares(map(store.adapter_nodes, candidate.sources)), harm=evidence_of_harm(report)))
    experimental: dict = {}
    if companion is not None:  # its gate is the way back for the untrusted nodes: it moves only them
        comp_report = evaluate_gates(comp_results[0], prod if prod is not None else dialect_base,
                                     base_candidate=comp_results[1], base_reference=base_ref, thresholds=thresholds,
                                     reference_label=reference_label, dialect_base=dialect_base)
        write_gate_report(artifacts, dialect, companion.candidate_id, comp_report, store)
        stable_nodes = {n for s in candidate.sources for n in store.adapter_nodes(s)}
        shares = {n: v for n, v in source_shares(map(store.adapter_nodes, companion.sources)).items()
                  if n not in stable_nodes}
        experimental = {
            "experimental_candidate": companion.candidate_id, "experimental_decision": comp_report.decision,
            "cer_experimental": comp_report.candidate.cer,
            "experimental_reputation_after": dg.MetadataValue.json(store.apply_reputation_updates(
                reputation_from_gate(comp_report.decision, shares, harm=evidence_of_harm(comp_report))))}
    base_scores = score(dialect_base)
    return dg.MaterializeResult(
        metadata={
            "candidate_id": candidate.candidate_id, "decision": report.decision,
            "base_model": candidate.base_model or "", "compared_with": report.reference_label,
            "production_candidate": production.candidate_id if production else "",
            "production_stale": stale, "test_speakers": len(report.speakers),
            "reputation_after": dg.MetadataValue.json(moved),
            "harm": dg.MetadataValue.json(evidence_of_harm(report)),
            "cer_base_model": base_scores.cer, "wer_base_model": base_scores.wer,
            "cer_candidate": report.candidate.cer, "wer_candidate": report.candidate.wer,
            "cer_production": report.production.cer if prod is not None else float("nan"),
            "base_dialect_regression_rel": report.base_regression_rel,
            **{k: v for k, v in report.metrics().items() if k not in ("candidate_cer", "candidate_wer")},
            "report": dg.MetadataValue.md(report.to_markdown() + "\n### Learning curve of the sources\n\n"
                                          + learning_curves(candidate) + "\n"),
            "path": dg.MetadataValue.path(str(path)),
            **experimental,
            **lease.metadata(),
        },
        check_results=[
            dg.AssetCheckResult(check_name=g.name, passed=g.passed,
                                metadata={"value": float("nan") if g.value is None else float(g.value),
                                          "threshold": float(g.threshold), "description": g.description})
            for g in report.gates
        ],
    )


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
    parts = ("tts",) if track == TTS else ()
    out = publish_copy(candidate.adapter_path,
                       artifacts.paths.adapters.joinpath("production", *parts, dialect, branch, candidate.candidate_id))
    store.record_promotion(dialect, branch, candidate.candidate_id)
    return out


def discard_unrecorded(*paths: Path) -> None:
    """Directories merged by an attempt whose candidate was never recorded: nothing refers to them."""
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


candidate_job = dg.define_asset_job(
    "candidate_job", selection=[merged_candidate, gate_report, production_adapter],
    partitions_def=dialect_partitions,
    # A failed gate is a decision, not a crash: never retry it.
    tags={"dagster/max_retries": "0"},
    description="Merge the dialect's new adapters, evaluate the candidate at the gate, promote if it passes.",
)

defs = dg.Definitions(assets=[merged_candidate, gate_report, production_adapter], jobs=[candidate_job])
