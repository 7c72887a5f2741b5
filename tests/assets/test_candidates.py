"""merged_candidate → gate_report (blocking checks) → production_adapter on a real instance, with
adapters that were actually trained (see conftest.py): a candidate that beats the base model is
promoted, a worse one is not, each run gates and promotes its own candidate, and nothing is merged
or compared across base models."""

import json

import pytest
from safetensors.torch import load_file

from mloc_dagster.core.state import StateStore
from mloc_dagster.core.state.engine import resolve_state_url
from mloc_dagster.definitions import defs
from mloc_dagster.runs.service import StartRequest, start_run
from tests.assets.conftest import DIALECT
from tests.world import register_base

# The pre-trained base is a 150-step model: CER/WER limits sit above what it reaches, the
# improvement and regression gates are the defaults' logic on real numbers.
LENIENT = {"thresholds": {DIALECT: {"max_cer": 0.9, "max_wer": 1.0, "max_base_regression_rel": 0.5}},
           "bootstrap_samples": 500}


def run_with_adapters(instance, store, adapters, node="node-a"):
    """A training run (pinned by start_run, as `mloc run start` does) whose jobs left these adapters."""
    run = start_run(instance, store, StartRequest(DIALECT, jobs=len(adapters), candidate_every=len(adapters), timebox_s=60))
    for i, result in enumerate(adapters):
        store.record_job_started(run.run_id, i, node_id=node)
        store.record_job_finished(run.run_id, i, "succeeded", checkpoint_path=result.path, sha256=result.sha256,
                                  base_model=result.base_model_hash, metrics={"dev_cer": result.dev_cer})
    return run


def run_candidate_job(instance, run, gate_config=LENIENT):
    return defs.resolve_job_def("candidate_job").execute_in_process(
        partition_key=DIALECT, instance=instance, raise_on_error=False, tags={"mloc/run_id": run.run_id},
        run_config={"ops": {"gate_report": {"config": gate_config}}})


def metadata(result, node):
    found = result.asset_materializations_for_node(node)
    return {k: v.value for k, v in found[0].metadata.items()} if found else None


def check_results(result):
    return {e.asset_check_evaluation_data.check_name: e.asset_check_evaluation_data.passed
            for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"}


@pytest.fixture()
def store(line_instance):
    return StateStore(resolve_state_url())


def test_a_trained_candidate_beats_the_base_model_and_is_promoted(line, line_instance, store):
    run = run_with_adapters(line_instance, store, [line.adapters["weak"], line.adapters["good"]])
    result = run_candidate_job(line_instance, run)
    assert result.success, result.get_step_failure_events()
    assert check_results(result) == dict.fromkeys(("cer_gate", "wer_gate", "improvement_gate", "regression_gate"),
                                                  True)
    merged, gate, promoted = (metadata(result, n) for n in ("merged_candidate", "gate_report", "production_adapter"))
    assert merged["adapters"] == 1  # the run's newest checkpoint contains its older ones
    weights = load_file(f"{merged['path']}/adapter_model.safetensors")
    assert any(float(t.abs().max()) > 0 for k, t in weights.items() if "lora_B" in k)  # it learned something
    # One identity from merge to gate to promotion.
    assert merged["candidate_id"] == gate["candidate_id"] == promoted["candidate_id"]
    assert set(merged["reputation_after"]) == {"node-a"} and set(gate["reputation_after"]) == {"node-a"}
    assert gate["compared_with"] == "base model" and gate["test_speakers"] >= 5
    assert "### Learning curve of the sources" in gate["report"] and f"| {run.run_id} | 0 |" in gate["report"]
    assert gate["cer_candidate"] < gate["cer_base_model"] and gate["p_better"] >= 0.95
    assert promoted["branch"] == "stable" and not promoted["stale"]
    candidate = store.get_candidate(merged["candidate_id"])
    assert candidate.training_run_id == run.run_id and candidate.gate_decision == "passed"
    assert candidate.base_model == line.adapters["good"].base_model_hash
    assert {j.candidate_id for j in store.jobs_for_run(run.run_id)} == {candidate.candidate_id}
    assert store.production(DIALECT, "stable").candidate_id == candidate.candidate_id


def test_default_thresholds_fail_and_block_promotion(line, line_instance, store):
    run = run_with_adapters(line_instance, store, [line.adapters["good"]])
    result = run_candidate_job(line_instance, run, {"bootstrap_samples": 500})  # CER ≤ 0.15: out of reach
    assert not result.success
    assert check_results(result)["cer_gate"] is False
    assert metadata(result, "gate_report")["decision"] == "failed"
    assert metadata(result, "production_adapter") is None and store.production(DIALECT, "stable") is None


def test_a_worse_candidate_is_not_promoted_and_each_run_gates_its_own(line, line_instance, store):
    good_run = run_with_adapters(line_instance, store, [line.adapters["good"]])
    first = run_candidate_job(line_instance, good_run)
    assert first.success
    weak_run = run_with_adapters(line_instance, store, [line.adapters["weak"]])
    second = run_candidate_job(line_instance, weak_run)
    assert not second.success
    gate = metadata(second, "gate_report")
    assert check_results(second)["improvement_gate"] is False and gate["compared_with"] == "production"
    assert gate["cer_candidate"] > gate["cer_production"]
    assert metadata(second, "production_adapter") is None
    good_id, weak_id = metadata(first, "merged_candidate")["candidate_id"], metadata(second, "merged_candidate")["candidate_id"]
    assert gate["candidate_id"] == weak_id != good_id
    assert store.production(DIALECT, "stable").candidate_id == good_id
    assert [c.gate_decision for c in (store.get_candidate(good_id), store.get_candidate(weak_id))] == ["passed", "failed"]
    sources = [s.key for c in store.list_candidates(DIALECT) for s in c.sources]
    assert sorted(sources) == sorted([f"{good_run.run_id}/0", f"{weak_run.run_id}/0"])  # each adapter once


def test_a_base_model_change_never_merges_or_compares_across_bases(line, line_instance, store, mloc_home):
    old_run = run_with_adapters(line_instance, store, [line.adapters["good"]])
    assert run_candidate_job(line_instance, old_run).success  # promoted on the old base
    leftover = run_with_adapters(line_instance, store, [line.adapters["weak"]])  # old base, not merged yet

    new_version = register_base(line_instance, line.other_base)  # the base model changes
    assert new_version == line.adapters["other-base"].base_model_hash
    new_run = run_with_adapters(line_instance, store, [line.adapters["other-base"]])
    result = run_candidate_job(line_instance, new_run)
    merged, gate = metadata(result, "merged_candidate"), metadata(result, "gate_report")
    assert merged["adapters"] == 1 and merged["base_model"] == new_version
    assert f"{leftover.run_id}/0" in merged["left_for_other_bases"]  # left for a merge on its own base
    candidate = store.get_candidate(merged["candidate_id"])
    assert candidate.base_model_path == new_run.base_model_version
    # Production is on the old base: reported stale, not compared.
    assert gate["production_stale"] is True and gate["compared_with"] == "base model"
    assert store.get_job(leftover.run_id, 0).candidate_id is None

    from typer.testing import CliRunner

    from mloc_dagster.cli.main import app

    listed = json.loads(CliRunner().invoke(app, ["candidate", "list", "--json"]).stdout)
    stale = {c["candidate_id"]: c["stale"] for c in listed}
    assert stale == {candidate.candidate_id: False, store.production(DIALECT).candidate_id: True}


def test_the_gate_uses_what_the_run_pinned_not_the_newest_base(line, line_instance, store):
    """A base model registered after the run started, with another base dialect: the candidate is
    still gated on its own base, and its base-dialect regression on the data its run pinned."""
    run = run_with_adapters(line_instance, store, [line.adapters["good"]])
    assert run.rehearsal_dataset  # the base dialect's dataset, pinned at start
    assert defs.resolve_job_def("base_model_job").execute_in_process(instance=line_instance, run_config={"ops": {
        "base_model": {"config": {"checkpoint_dir": str(line.other_base), "base_dialect": DIALECT}}}}).success
    result = run_candidate_job(line_instance, run)
    merged, gate = metadata(result, "merged_candidate"), metadata(result, "gate_report")
    assert merged["base_model"] == line.adapters["good"].base_model_hash
    assert gate["base_model"] == line.adapters["good"].base_model_hash
    assert gate["base_dialect_dataset"] == run.rehearsal_dataset


def test_an_untrusted_node_goes_to_experimental(line, line_instance, store):
    store.set_node_reputation("node-b", 0.5)
    run = run_with_adapters(line_instance, store, [line.adapters["good"]], node="node-b")
    result = run_candidate_job(line_instance, run)
    assert result.success
    assert metadata(result, "merged_candidate")["trusted"] is False
    assert metadata(result, "production_adapter")["branch"] == "experimental"


def test_an_untrusted_node_no_longer_demotes_the_trusted_ones(line, line_instance, store):
    """Trusted and untrusted adapters in one merge: the run's candidate is stable, built from the
    trusted ones; an experimental companion merges all and claims the untrusted one; both are
    gated, each decision is in the metadata, and reputation moves once per node."""
    store.set_node_reputation("node-b", 0.5)
    trusted_run = run_with_adapters(line_instance, store, [line.adapters["good"]], node="node-a")
    untrusted_run = run_with_adapters(line_instance, store, [line.adapters["weak"]], node="node-b")
    result = run_candidate_job(line_instance, trusted_run)
    assert result.success, result.get_step_failure_events()
    merged, gate, promoted = (metadata(result, n) for n in ("merged_candidate", "gate_report", "production_adapter"))
    stable_id, companion_id = merged["candidate_id"], merged["experimental_candidate"]
    assert merged["trusted"] is True and merged["adapters"] == 1 and merged["untrusted_adapters"] == 1
    assert companion_id == f"{stable_id}-exp"
    stable, companion = store.get_candidate(stable_id), store.get_candidate(companion_id)
    assert [s.key for s in stable.sources] == [f"{trusted_run.run_id}/0"] and stable.trusted
    assert sorted(s.key for s in companion.sources) == sorted([f"{trusted_run.run_id}/0", f"{untrusted_run.run_id}/0"])
    assert not companion.trusted and companion.details["companion_of"] == stable_id
    assert stable.details["experimental_candidate"] == companion_id and companion.dagster_run_id is None
    # Each adapter is claimed once: the trusted one by the stable candidate, the other by the companion.
    assert store.get_job(trusted_run.run_id, 0).candidate_id == stable_id
    assert store.get_job(untrusted_run.run_id, 0).candidate_id == companion_id
    # Every screening decision is in the metadata, per source.
    assert "| node-a |" in merged["screening"] and "node-b" not in merged["screening"]
    assert "| node-b |" in merged["experimental_screening"] and "accepted" in merged["experimental_screening"]
    assert "| stable |" in merged["sources"] and "| experimental |" in merged["sources"]
    assert set(merged["reputation_after"]) == {"node-a", "node-b"}
    [row] = stable.details["screening"]
    assert row["node_id"] == "node-a" and row["decision"] == "accepted" and row["cosine"] is None
    # Both gated; the stable one is promoted on stable, the companion on experimental if it passed.
    assert gate["candidate_id"] == stable_id and gate["experimental_candidate"] == companion_id
    assert store.get_candidate(companion_id).gate_decision == gate["experimental_decision"]
    assert promoted["branch"] == "stable" and store.production(DIALECT, "stable").candidate_id == stable_id
    experimental = store.production(DIALECT, "experimental")
    assert (experimental.candidate_id if experimental else None) == (
        companion_id if gate["experimental_decision"] == "passed" else None)


def test_nothing_new_skips_a_chain_candidate_and_fails_a_manual_one(line, line_instance, store):
    run = run_with_adapters(line_instance, store, [line.adapters["good"]])
    first = run_candidate_job(line_instance, run)
    assert first.success
    # The chain asks again for a run whose adapters another merge already took: skipped, not failed.
    again = run_candidate_job(line_instance, run)
    assert again.success and metadata(again, "merged_candidate") is None and metadata(again, "gate_report") is None
    manual = defs.resolve_job_def("candidate_job").execute_in_process(
        partition_key=DIALECT, instance=line_instance, raise_on_error=False,
        run_config={"ops": {"gate_report": {"config": LENIENT}}})
    assert not manual.success
    error = manual.get_step_failure_events()[0].step_failure_data.error
    assert "no new adapter for en-gb-scotland on base model" in error.message


def test_thresholds_from_the_gates_file(line, line_instance, store, mloc_home):
    (mloc_home / "gates.json").write_text(json.dumps(LENIENT["thresholds"]))
    run = run_with_adapters(line_instance, store, [line.adapters["good"]])
    result = run_candidate_job(line_instance, run, {"bootstrap_samples": 500})
    assert result.success and check_results(result)["cer_gate"] is True


def test_warm_start_continues_from_the_production_adapter(line, line_instance, store):
    from mloc_dagster.runs.requests import train_run_request
    from mloc_dagster.runs.service import TrainingRunError

    with pytest.raises(TrainingRunError, match="has no stable production adapter yet"):
        start_run(line_instance, store, StartRequest(DIALECT, init_from="production"))
    first = run_with_adapters(line_instance, store, [line.adapters["good"]])
    assert run_candidate_job(line_instance, first).success
    promoted = store.production(DIALECT)
    with pytest.raises(TrainingRunError, match="differ from the warm-start adapter"):
        start_run(line_instance, store, StartRequest(DIALECT, hparams={"r": 4}, init_from="production"))

    run = start_run(line_instance, store, StartRequest(DIALECT, jobs=1, timebox_s=120, hparams={"max_steps": 2, "lr": 1e-5},
                    init_from="production:stable"))
    assert run.init_from == f"production:stable ({promoted.candidate_id})" and run.hparams["r"] == 16
    config = train_run_request(run, 0).run_config
    result = defs.resolve_job_def("train_adapter_job").execute_in_process(
        partition_key=DIALECT, instance=line_instance, run_config=config, tags={"mloc/run_id": run.run_id})
    assert result.success
    md = metadata(result, "adapter_checkpoint")
    assert md["resumed_kind"] == "warm_start" and md["resumed_from"] == promoted.adapter_path
    # Two tiny steps from the promoted adapter: it recognizes like the promoted adapter, not like the base.
    assert md["dev_cer"] <= line.adapters["good"].dev_cer + 0.05 < line.adapters["weak"].dev_cer

    register_base(line_instance, line.other_base)  # after a base change the old adapter cannot continue
    with pytest.raises(TrainingRunError, match="an adapter only continues on its own base"):
        start_run(line_instance, store, StartRequest(DIALECT, init_from=promoted.candidate_id))


def test_a_new_base_model_lists_the_production_adapters_it_makes_stale(line, line_instance, store):
    run = run_with_adapters(line_instance, store, [line.adapters["good"]])
    assert run_candidate_job(line_instance, run).success
    register_base(line_instance, line.other_base)
    from mloc_dagster.assets.lineage import latest_metadata

    stale = latest_metadata(line_instance, "base_model")["stale_production_adapters"]
    assert f"{DIALECT} stable: {store.production(DIALECT).candidate_id}" in stale


@pytest.mark.parametrize("asset, file, content, message", [
    ("gate_report", "gates.json", "{not json", "gates.json: not valid JSON"),
    ("gate_report", "gates.json", json.dumps({DIALECT: {"max_cer": "low"}}),
     f"gates.json: key '{DIALECT}': max_cer must be a number, got 'low'"),
    ("tts_gate_report", "tts_gate.json", json.dumps({DIALECT: {"sentences": "many"}}),
     f"tts_gate.json: key '{DIALECT}': sentences: Input should be a valid integer"),
])
def test_a_broken_gate_config_fails_the_gate_checks_with_the_reason(mloc_home, asset, file, content, message):
    import dagster as dg

    from mloc_dagster.core.state.schema import TTS
    from mloc_dagster.partitions import dialect_partitions

    (mloc_home / file).write_text(content)
    instance = dg.DagsterInstance.get()
    instance.add_dynamic_partitions(dialect_partitions.name, [DIALECT])
    store = StateStore(resolve_state_url())
    track = TTS if asset.startswith("tts") else "asr"
    candidate = store.record_candidate(dialect=DIALECT, adapter_path=str(mloc_home / "never-read"), sha256="0" * 64,
                                       sources=[], trusted=True, track=track)
    result = defs.resolve_job_def("tts_candidate_job" if track == TTS else "candidate_job").execute_in_process(
        instance=instance, partition_key=DIALECT, raise_on_error=False, asset_selection=[dg.AssetKey(asset)],
        run_config={"ops": {asset: {"config": {"candidate_id": candidate.candidate_id}}}})
    checks = [e.asset_check_evaluation_data for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"]
    assert len(checks) == (2 if track == TTS else 4) and not any(c.passed for c in checks)
    assert all(message in c.metadata["reason"].value for c in checks)
    gate = metadata(result, asset)  # the asset materialized: a report that judged nothing
    assert gate["decision"] == "failed" and message in gate["config_error"]
    assert store.get_candidate(candidate.candidate_id).gate_decision == "failed"
    instance.dispose()
