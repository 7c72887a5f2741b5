"""gate_report: the candidate this run merged, at the gate (four blocking checks), with its
experimental companion beside it; reputations move by the outcome.

Gates judge the model, not the node (``core.pool.reputation.evidence_of_harm``): a passed gate raises
the reputation of the nodes inside the candidate, by their share; a failed one lowers it only
with evidence of harm (worse than production or the base model, a base-dialect regression), never
for missing an absolute CER/WER limit alone.
"""

import json
from collections.abc import Sequence
from pathlib import Path

import dagster as dg

from mloc_dagster.assets.candidates.merge import merged_candidate, root_run_id
from mloc_dagster.assets.lineage import metadata_of_version, require_metadata
from mloc_dagster.assets.tracks import track_of
from mloc_dagster.core.adapters.format import InvalidAdapter, read_node_result
from mloc_dagster.core.gates.config import load_thresholds
from mloc_dagster.core.gates.gate import GateConfigError, GateThresholds, evaluate_gates
from mloc_dagster.core.gates.scoring import score
from mloc_dagster.core.merging.candidates import Recognizer
from mloc_dagster.core.pool.reputation import evidence_of_harm, reputation_from_gate, source_shares
from mloc_dagster.core.state import StateStore
from mloc_dagster.core.state.candidates import RELEASED, Candidate
from mloc_dagster.core.state.schema import ASR
from mloc_dagster.partitions import dialect_partitions
from mloc_dagster.resources.artifacts import ArtifactStore
from mloc_dagster.resources.gpu import GpuArbiter
from mloc_dagster.resources.state import StateStoreResource

GATES = ("cer_gate", "wer_gate", "improvement_gate", "regression_gate")


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
    job = track_of(track).candidate_job
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


def pinned_gate_inputs(instance: dg.DagsterInstance, store: StateStore, candidate: Candidate) -> tuple[str, str]:
    """(base model dir, base-dialect dataset version) the candidate is gated with, from what was
    pinned rather than what is newest: its own base model, and the base dialect's dataset its
    training run pinned at start (the run's rehearsal data; a run on the base dialect itself: its
    own dataset). A candidate without such a run (merged by hand, a run from before pinning) takes
    the base dialect of its own base model's materialization, and that dialect's latest version."""
    run = store.get_run(candidate.training_run_id) if candidate.training_run_id else None
    base = metadata_of_version(instance, "base_model", candidate.base_model or "") \
        or require_metadata(instance, "base_model")
    base_path = candidate.base_model_path or base["path"]
    if run is not None and run.rehearsal_dataset:
        return base_path, run.rehearsal_dataset
    if run is not None and run.dialect == base.get("base_dialect"):
        return base_path, run.dataset_version
    return base_path, require_metadata(instance, "dataset_version", base["base_dialect"])["path"]


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
    base_path, base_dataset = pinned_gate_inputs(context.instance, store, candidate)
    dataset_path = candidate.dataset_version or require_metadata(context.instance, "dataset_version", dialect)["path"]
    production = store.production(dialect, "stable")
    stale = production is not None and production.base_model != candidate.base_model

    with gpu.lease("EVAL", context) as lease:
        recognize = Recognizer(base_path, artifacts.paths.home / "features",
                               lease.torch_device)
        cand = recognize(candidate.adapter_path, dataset_path)
        dialect_base = recognize(None, dataset_path)
        prod = recognize(production.adapter_path, dataset_path) if production and not stale else None
        base_cand = recognize(candidate.adapter_path, base_dataset)
        base_ref = recognize(None, base_dataset)
        companion = None if config.candidate_id else companion_of(store, candidate)
        if companion is not None:
            comp_results = (recognize(companion.adapter_path, dataset_path),
                            recognize(companion.adapter_path, base_dataset))
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
            "base_dialect_dataset": dg.MetadataValue.path(base_dataset),
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


defs = dg.Definitions(assets=[gate_report])
