"""tts_candidate → tts_gate_report (the stop-loss, blocking checks) → tts_production_adapter.

The TTS track's candidates follow the ASR ones (``assets/candidates/``): a candidate is the
merge of the dialect's unclaimed TTS adapters on the run's TTS base, recorded under the Dagster
run that merged it, and gated and promoted by that identity.

The stop-loss (seed 000, issue 11): the candidate speaks the dialect's test sentences (Griffin-Lim
audio), and a **frozen judge ASR** transcribes them. The judge is pinned by content hash in the
gate settings (default: the base ASR the candidate's TTS base was aligned with) and is never the
candidate (``core.tts.judge.load_judge`` refuses it). Two blocking checks:

- ``tts_intelligibility_gate``: judge CER on the candidate's audio ≤ the judge's CER on the real
  recordings of the same sentences (the floor) + ``max_cer_over_floor``;
- ``tts_collapse_gate``: share of sentences with judge CER > 0.5 ≤ ``max_collapse_share``.

The report puts floor, base TTS and candidate side by side, with the mel-cepstral distortion
(after DTW) of base TTS and candidate against the real recordings, and links a few wav samples.
A failed gate stops the promotion; the training chain then pauses the TTS run that asked for the
candidate and says why (``sensors/stop_loss.py``): it resumes only by a user's decision. A broken
``tts_gate.json`` (or run config) judges nothing: both checks fail with the reason, so the run
pauses with it too.
"""

from typing import Any

import dagster as dg
import pydantic

from mloc_dagster.assets.candidates.gate import config_refusal, gate_candidate
from mloc_dagster.assets.candidates.merge import (
    MIN_TRUSTED_REPUTATION,
    already_merged,
    discard_unrecorded,
    pinned_inputs,
    root_run_id,
)
from mloc_dagster.assets.candidates.promotion import promote
from mloc_dagster.assets.tts.training import aligner_of, tts_adapter_checkpoint
from mloc_dagster.core.gates.config import dialect_settings
from mloc_dagster.core.gates.gate import GateConfigError
from mloc_dagster.core.merging.candidates import merge_candidate
from mloc_dagster.core.publish import unique_id
from mloc_dagster.core.state.candidates import AdapterClaimConflict
from mloc_dagster.core.state.schema import TTS
from mloc_dagster.partitions import dialect_partitions
from mloc_dagster.resources.artifacts import ArtifactStore
from mloc_dagster.resources.gpu import GpuArbiter
from mloc_dagster.resources.state import StateStoreResource

TTS_GATES = ("tts_intelligibility_gate", "tts_collapse_gate")
TTS_GATE_FILE = "tts_gate.json"  # $MLOC_HOME/tts_gate.json: {"<dialect>": {"max_cer_over_floor": 0.3, ...}}
CLAIM_ATTEMPTS = 3
SAMPLES_KEPT = 3  # wav samples per candidate in the report


class TtsMergeConfig(dg.Config):
    method: str = "weighted_mean"


class TtsGateSettings(pydantic.BaseModel, extra="forbid"):
    """Per dialect, from run config over $MLOC_HOME/tts_gate.json over these defaults."""

    judge_dir: str = ""  # an ASR model directory; empty: the aligner ASR of the candidate's TTS base
    judge_version: str = ""  # its content hash; empty: pinned now (the report names it)
    max_cer_over_floor: float = 0.3
    max_collapse_share: float = 0.5
    collapse_cer: float = 0.5
    split: str = "test"
    sentences: int = 20
    gl_iterations: int = 32


class TtsGateConfig(dg.Config):
    settings: dict[str, Any] = {}  # {"<dialect>": {"max_cer_over_floor": 0.2, ...}}
    candidate_id: str = ""  # re-gate a named TTS candidate instead of the one this run merged


@dg.asset(partitions_def=dialect_partitions, deps=[tts_adapter_checkpoint], group_name="tts",
          kinds={"pytorch", "safetensors"}, pool="gpu", output_required=False,
          description="Every unclaimed TTS adapter of the dialect on the run's TTS base, merged in ΔW space "
                      "(reputation-weighted, screened). Skipped when a chain's adapters were merged by another run.")
def tts_candidate(context: dg.AssetExecutionContext, config: TtsMergeConfig, artifacts: ArtifactStore,
                  state: StateStoreResource, gpu: GpuArbiter):
    dialect, store, root = context.partition_key, state.store(), root_run_id(context)
    if (done := store.candidate_of_dagster_run(root)) is not None:
        raise dg.Failure(f"this run already merged {done.candidate_id}; launch a new tts_candidate_job")
    pinned = pinned_inputs(context, store, dialect, TTS)
    base_hash, training_run_id = pinned["base_model"], pinned["training_run_id"]
    generation = store.get_run(training_run_id).generation if training_run_id else 0
    candidate_id = unique_id("tts")  # never another candidate's name: its directory is never overwritten
    out = artifacts.paths.candidates / "tts" / dialect / candidate_id
    for attempt in range(1, CLAIM_ATTEMPTS + 1):
        refs = store.unclaimed_adapters(dialect, base_model=base_hash, latest_per_run=True, track=TTS)
        if not refs and (where := already_merged(store, training_run_id)):
            context.log.info(f"nothing new to merge: the adapters of {training_run_id} are in {where}")
            return
        if not refs:
            raise dg.Failure(f"no new TTS adapter for {dialect} on TTS base {base_hash[:12]} since its last candidate")
        reputation = {r.key: store.node_reputation(r.node_id) if r.node_id else 1.0 for r in refs}
        with gpu.lease("MERGE", context) as lease:
            try:
                result, sha = merge_candidate([r.path for r in refs], [reputation[r.key] for r in refs], out,
                                              method=config.method, node_of={r.path: r.node_id for r in refs},
                                              overwrite=False)
            except ValueError as exc:
                raise dg.Failure(str(exc)) from exc
        trusted = all(v >= MIN_TRUSTED_REPUTATION for v in reputation.values())
        try:
            store.record_candidate(
                candidate_id=candidate_id, dialect=dialect, adapter_path=str(out), sha256=sha, sources=refs,
                trusted=trusted, details=result.summary() | {"run_generation": generation},
                dagster_run_id=root, track=TTS, **pinned)
            break
        except AdapterClaimConflict as exc:
            context.log.warning(f"attempt {attempt}: {exc}")
            discard_unrecorded(out)
    else:
        raise dg.Failure(f"TTS adapters kept being claimed by concurrent merges ({CLAIM_ATTEMPTS} attempts)")
    yield dg.MaterializeResult(
        data_version=dg.DataVersion(sha),
        metadata={"candidate_id": candidate_id, "track": TTS, "adapters": len(refs), "trusted": trusted,
                  "rejected": len(result.rejected), "base_model": base_hash, "training_run_id": training_run_id or "",
                  "sha256": sha, "path": dg.MetadataValue.path(str(out)), **lease.metadata()},
    )


def gate_settings(dialect: str, config: TtsGateConfig, artifacts: ArtifactStore) -> TtsGateSettings:
    """A malformed file, entry or value is a ``GateConfigError`` naming the file (or run config) and key."""
    path = artifacts.paths.home / TTS_GATE_FILE
    from_file = dialect_settings(path, dialect)
    for where, settings in ((f"{path}: key {dialect!r}", from_file),
                            (f"TTS gate run config for {dialect}", {**from_file, **config.settings.get(dialect, {})})):
        try:
            checked = TtsGateSettings.model_validate(settings)
        except pydantic.ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']} (got {e['input']!r})" for e in exc.errors())
            raise GateConfigError(f"{where}: {problems}") from exc
    return checked


@dg.asset(partitions_def=dialect_partitions, deps=[tts_candidate], group_name="tts", kinds={"pytorch"}, pool="gpu",
          check_specs=[dg.AssetCheckSpec(name, asset="tts_gate_report", blocking=True) for name in TTS_GATES],
          description="The stop-loss: the TTS candidate speaks the dialect's test sentences, a frozen judge ASR "
                      "(pinned by version, never the candidate) transcribes them; real recordings, base TTS and "
                      "candidate side by side, with mel-cepstral distortion and wav samples. Its blocking checks "
                      "guard tts_production_adapter; a failure pauses the TTS run that asked for it.")
def tts_gate_report(context: dg.AssetExecutionContext, config: TtsGateConfig, artifacts: ArtifactStore,
                    state: StateStoreResource, gpu: GpuArbiter) -> dg.MaterializeResult:
    from mloc_dagster.core.tts.judge import JudgeError, JudgeSpec, load_judge
    from mloc_dagster.core.tts.stop_loss import judge_candidate

    dialect, store = context.partition_key, state.store()
    candidate = gate_candidate(context, store, config.candidate_id, TTS)
    out = artifacts.paths.reports / "tts" / dialect / candidate.candidate_id
    try:
        settings = gate_settings(dialect, config, artifacts)
    except GateConfigError as exc:
        return config_refusal(store, candidate, TTS_GATES, str(exc), out / "report.json")
    judge_dir = settings.judge_dir or str(aligner_of(candidate.base_model_path, artifacts.paths.models))
    with gpu.lease("EVAL", context) as lease:
        try:
            spec = (JudgeSpec(judge_dir, settings.judge_version) if settings.judge_version
                    else JudgeSpec.pin(judge_dir))
            judge = load_judge(spec, candidate.adapter_path, device=lease.torch_device)
        except (JudgeError, OSError) as exc:
            raise dg.Failure(f"TTS gate of {candidate.candidate_id}: {exc}") from exc
        report = judge_candidate(judge, candidate.base_model_path, candidate.adapter_path, candidate.dataset_version,
                                 out, device=lease.torch_device, samples_kept=SAMPLES_KEPT,
                                 **settings.model_dump(exclude={"judge_dir", "judge_version"}))
    decision = "passed" if report["passed"] else "failed"
    store.set_gate_result(candidate.candidate_id, decision, str(out / "report.json"))
    if decision == "failed" and candidate.training_run_id:
        context.log.warning(f"stop-loss: {candidate.candidate_id} failed; the training chain pauses "
                            f"{candidate.training_run_id}")
    return dg.MaterializeResult(
        metadata={"candidate_id": candidate.candidate_id, "decision": decision, "track": TTS,
                  "training_run_id": candidate.training_run_id or "",
                  "judge_dir": spec.model_dir, "judge_version": spec.version,
                  **{k: v for k, v in report["figures"].items()},
                  "report": dg.MetadataValue.md(report["markdown"]),
                  "path": dg.MetadataValue.path(str(out / "report.json")), **lease.metadata()},
        check_results=[
            dg.AssetCheckResult(check_name=g["name"], passed=g["passed"],
                                metadata={"value": float(g["value"]), "threshold": float(g["limit"]),
                                          "floor": float("nan") if g["floor"] is None else float(g["floor"]),
                                          "judge_version": spec.version, "description": g["description"]})
            for g in report["gates"]
        ],
    )


@dg.asset(partitions_def=dialect_partitions, deps=[tts_gate_report], group_name="tts", kinds={"safetensors"},
          description="The promoted TTS adapter of the dialect: the TTS candidate this run merged and gated, on "
                      "branch stable (experimental when a source node is below the trust bar).")
def tts_production_adapter(context: dg.AssetExecutionContext, artifacts: ArtifactStore,
                           state: StateStoreResource) -> dg.MaterializeResult:
    dialect, store = context.partition_key, state.store()
    candidate = gate_candidate(context, store, track=TTS)
    if candidate.gate_decision != "passed":
        raise dg.Failure(f"TTS candidate {candidate.candidate_id} has not passed its gate ({candidate.gate_decision})")
    branch = "stable" if candidate.trusted else "experimental"
    out = promote(artifacts, store, dialect, branch, candidate, TTS)
    return dg.MaterializeResult(
        data_version=dg.DataVersion(candidate.sha256),
        metadata={"branch": branch, "track": TTS, "candidate_id": candidate.candidate_id,
                  "base_model": candidate.base_model or "", "path": dg.MetadataValue.path(str(out))},
    )


tts_candidate_job = dg.define_asset_job(
    "tts_candidate_job", selection=[tts_candidate, tts_gate_report, tts_production_adapter],
    partitions_def=dialect_partitions, tags={"dagster/max_retries": "0"},
    description="Merge the dialect's new TTS adapters, run the stop-loss gate, promote if it passes.")

defs = dg.Definitions(assets=[tts_candidate, tts_gate_report, tts_production_adapter], jobs=[tts_candidate_job])
