"""merged_candidate → gate_report (blocking checks) → production_adapter, per dialect."""


import json
import shutil

import dagster as dg

from mloc_dagster.assets.adapters import adapter_checkpoint
from mloc_dagster.assets.lineage import require_metadata
from mloc_dagster.core.candidates import Recognizer, merge_candidate
from mloc_dagster.core.gates import GateThresholds, evaluate_gates, score
from mloc_dagster.partitions import dialect_partitions
from mloc_dagster.resources.artifacts import ArtifactStore
from mloc_dagster.resources.gpu import GpuArbiter
from mloc_dagster.resources.state import StateStoreResource

MIN_TRUSTED_REPUTATION = 0.7
GATES = ("cer_gate", "wer_gate", "improvement_gate", "regression_gate")


class MergeConfig(dg.Config):
    method: str = "weighted_mean"  # or trimmed_mean, median
    min_trusted_reputation: float = MIN_TRUSTED_REPUTATION


@dg.asset(partitions_def=dialect_partitions, deps=[adapter_checkpoint], group_name="candidates",
          kinds={"pytorch", "safetensors"}, pool="gpu",
          description="Every adapter of the dialect since its last candidate, across runs and nodes, "
                      "merged in ΔW space (norm bound, reputation-weighted, truncated SVD to rank r).")
def merged_candidate(context: dg.AssetExecutionContext, config: MergeConfig, artifacts: ArtifactStore,
                     state: StateStoreResource, gpu: GpuArbiter) -> dg.MaterializeResult:
    dialect = context.partition_key
    store = state.store()
    refs = store.adapters_since_last_candidate(dialect, latest_per_run=True)
    if not refs:
        raise dg.Failure(f"no new adapter for {dialect} since its last candidate")
    reputations = [store.node_reputation(r.node_id) if r.node_id else 1.0 for r in refs]
    trusted = min(reputations) >= config.min_trusted_reputation

    candidate_id = f"cand-{context.run_id[:8]}"
    out = artifacts.paths.candidates / dialect / candidate_id
    with gpu.lease("MERGE", context) as lease:
        try:
            result, sha = merge_candidate([r.path for r in refs], reputations, out, method=config.method)
        except ValueError as exc:
            raise dg.Failure(str(exc)) from exc
    summary = result.summary()
    store.record_candidate(candidate_id=candidate_id, dialect=dialect, adapter_path=str(out), sha256=sha,
                           sources=refs, trusted=trusted, details=summary)
    sources_md = "\n".join(["| run | job | node | reputation |", "|---|---|---|---|"] +
                           [f"| {r.run_id} | {r.job_index} | {r.node_id} | {rep:.2f} |" for r, rep in zip(refs, reputations)])
    return dg.MaterializeResult(
        data_version=dg.DataVersion(sha),
        metadata={
            "candidate_id": candidate_id, "adapters": len(refs), "rejected": len(result.rejected),
            "clipped": len(result.clipped), "max_truncation_error": float(result.max_truncation_error),
            "trusted": trusted, "method": config.method, "sha256": sha,
            "sources": dg.MetadataValue.md(sources_md), "path": dg.MetadataValue.path(str(out)),
            **lease.metadata(),
        },
    )


GATES_FILE = "gates.json"  # $MLOC_HOME/gates.json: {"<dialect>": {"max_cer": 0.2, ...}}


class GateConfig(dg.Config):
    # Per-dialect overrides of GateThresholds, e.g. {"en-gb-scotland": {"max_cer": 0.2}}; they win
    # over $MLOC_HOME/gates.json, which wins over the defaults (CER 0.15, WER 0.20, ...).
    thresholds: dict[str, dict[str, float]] = {}
    bootstrap_samples: int = 2000


@dg.asset(partitions_def=dialect_partitions, deps=[merged_candidate], group_name="candidates",
          kinds={"pytorch"}, pool="gpu",
          check_specs=[dg.AssetCheckSpec(name, asset="gate_report", blocking=True) for name in GATES],
          description="The candidate against production and the base dialect; always materializes "
                      "(a failed gate is a report too). Its blocking checks guard production_adapter.")
def gate_report(context: dg.AssetExecutionContext, config: GateConfig, artifacts: ArtifactStore,
                state: StateStoreResource, gpu: GpuArbiter) -> dg.MaterializeResult:
    dialect = context.partition_key
    store = state.store()
    candidate = store.latest_candidate(dialect)
    if candidate is None:
        raise dg.Failure(f"no candidate for {dialect}; materialize merged_candidate first")
    base = require_metadata(context.instance, "base_model")
    dataset = require_metadata(context.instance, "dataset_version", dialect)
    base_dataset = require_metadata(context.instance, "dataset_version", base["base_dialect"])
    production = store.production(dialect, "stable")
    cache = artifacts.paths.home / "features"
    gates_file = artifacts.paths.home / GATES_FILE
    from_file = json.loads(gates_file.read_text()).get(dialect, {}) if gates_file.is_file() else {}
    try:
        thresholds = GateThresholds.from_mapping(
            {"bootstrap_samples": config.bootstrap_samples, **from_file, **config.thresholds.get(dialect, {})})
    except ValueError as exc:
        raise dg.Failure(f"invalid gate thresholds for {dialect} ({gates_file} or run config): {exc}") from exc

    with gpu.lease("EVAL", context) as lease:
        recognize = Recognizer(base["path"], cache, lease.torch_device)
        cand = recognize(candidate.adapter_path, dataset["path"])
        prod = recognize(production.adapter_path, dataset["path"]) if production else None
        base_cand = recognize(candidate.adapter_path, base_dataset["path"])
        base_ref = recognize(None, base_dataset["path"])
        dialect_base = recognize(None, dataset["path"])
    report = evaluate_gates(cand, prod, base_candidate=base_cand, base_reference=base_ref, thresholds=thresholds)

    path = artifacts.paths.reports / dialect / f"{candidate.candidate_id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(report.to_json())
    store.set_gate_result(candidate.candidate_id, report.decision, str(path))
    base_scores = score(dialect_base)
    return dg.MaterializeResult(
        metadata={
            "candidate_id": candidate.candidate_id, "decision": report.decision,
            "cer_base_model": base_scores.cer, "wer_base_model": base_scores.wer,
            "cer_candidate": report.candidate.cer, "wer_candidate": report.candidate.wer,
            "cer_production": report.production.cer if report.production else float("nan"),
            "base_dialect_regression_rel": report.base_regression_rel,
            **{k: v for k, v in report.metrics().items() if k not in ("candidate_cer", "candidate_wer")},
            "report": dg.MetadataValue.md(report.to_markdown()), "path": dg.MetadataValue.path(str(path)),
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
          description="The promoted adapter of the dialect: branch stable, or experimental when any "
                      "source node's reputation is below the trust bar.")
def production_adapter(context: dg.AssetExecutionContext, artifacts: ArtifactStore,
                       state: StateStoreResource) -> dg.MaterializeResult:
    dialect = context.partition_key
    store = state.store()
    candidate = store.latest_candidate(dialect)
    if candidate is None or candidate.gate_decision != "passed":
        raise dg.Failure(f"the latest candidate of {dialect} has not passed its gate")
    branch = "stable" if candidate.trusted else "experimental"
    out = artifacts.paths.adapters / "production" / dialect / branch / candidate.candidate_id
    if not out.exists():
        shutil.copytree(candidate.adapter_path, out)
    store.record_promotion(dialect, branch, candidate.candidate_id)
    return dg.MaterializeResult(
        data_version=dg.DataVersion(candidate.sha256),
        metadata={"branch": branch, "candidate_id": candidate.candidate_id, "sha256": candidate.sha256,
                  "path": dg.MetadataValue.path(str(out))},
    )


candidate_job = dg.define_asset_job(
    "candidate_job", selection=[merged_candidate, gate_report, production_adapter],
    partitions_def=dialect_partitions,
    # A failed gate is a decision, not a crash: never retry it.
    tags={"dagster/max_retries": "0"},
    description="Merge the dialect's new adapters, evaluate the candidate at the gate, promote if it passes.",
)

defs = dg.Definitions(assets=[merged_candidate, gate_report, production_adapter], jobs=[candidate_job])
