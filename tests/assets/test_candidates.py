"""merged_candidate → gate_report (blocking checks) → production_adapter on a real instance.

Adapters are real peft LoRA adapters of the tiny model, fresh from `get_peft_model` (B = 0), so a
candidate recognizes exactly like the base model: the gate's mechanics (checks, blocking,
promotion branches, improvement over production) are tested without waiting for training.
"""

import pytest
from peft import LoraConfig, get_peft_model

from mloc_dagster.core.model import default_lora_targets
from mloc_dagster.core.state import StateStore, resolve_state_url
from mloc_dagster.definitions import defs

DIALECT = "en-gb-scotland"
LENIENT = {"thresholds": {DIALECT: {"max_cer": 10.0, "max_wer": 10.0}}, "bootstrap_samples": 200}


def make_adapter(base_dir, out, seed):
    import torch

    from mloc_dagster.core.model import load_base_model

    torch.manual_seed(seed)
    bm = load_base_model(base_dir)
    peft_model = get_peft_model(bm.model, LoraConfig(r=4, lora_alpha=8, target_modules=default_lora_targets(bm.model)))
    peft_model.save_pretrained(out)
    return out


@pytest.fixture()
def world(registered_base, tmp_path):
    """A training run with two succeeded jobs (adapters on disk) in the state store."""
    instance, base_dir = registered_base
    store = StateStore(resolve_state_url())
    run = store.create_run(dialect=DIALECT, dataset_version="/d", base_model_version=str(base_dir),
                           timebox_s=60, max_jobs=2, candidate_every=2)
    for i in range(2):
        adapter = make_adapter(base_dir, tmp_path / f"adapter-{i}", seed=i)
        store.record_job_started(run.run_id, i, node_id="node-a")
        store.record_job_finished(run.run_id, i, "succeeded", checkpoint_path=str(adapter), sha256=f"s{i}")
    return instance, store, run, base_dir


def run_candidate_job(instance, gate_config):
    return defs.resolve_job_def("candidate_job").execute_in_process(
        partition_key=DIALECT, instance=instance, raise_on_error=False,
        run_config={"ops": {"gate_report": {"config": gate_config}}})


def check_results(result):
    return {e.asset_check_evaluation_data.check_name: e.asset_check_evaluation_data.passed
            for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"}


def test_passing_gate_promotes_to_stable(world):
    instance, store, run, _ = world
    result = run_candidate_job(instance, LENIENT)
    assert result.success
    assert check_results(result) == {"cer_gate": True, "wer_gate": True, "improvement_gate": True,
                                     "regression_gate": True}
    merged = result.asset_materializations_for_node("merged_candidate")[0].metadata
    assert merged["adapters"].value == 1  # the run's newest checkpoint contains its older ones
    gate = result.asset_materializations_for_node("gate_report")[0].metadata
    assert gate["decision"].value == "passed" and "Gate decision" in gate["report"].value
    assert gate["base_dialect_regression_rel"].value == pytest.approx(0.0, abs=1e-6)
    promoted = result.asset_materializations_for_node("production_adapter")[0].metadata
    assert promoted["branch"].value == "stable"
    assert store.production(DIALECT, "stable").candidate_id == merged["candidate_id"].value


def test_failed_gate_materializes_report_and_blocks_promotion(world):
    instance, store, run, _ = world
    result = run_candidate_job(instance, {"bootstrap_samples": 200})  # default CER 0.15: untrained model fails
    assert not result.success
    assert check_results(result)["cer_gate"] is False
    gate = result.asset_materializations_for_node("gate_report")[0].metadata
    assert gate["decision"].value == "failed"
    assert result.asset_materializations_for_node("production_adapter") == []
    assert store.production(DIALECT, "stable") is None
    assert store.latest_candidate(DIALECT).gate_decision == "failed"


def test_untrusted_node_goes_to_experimental(world):
    instance, store, run, _ = world
    store.set_node_reputation("node-a", 0.5)
    result = run_candidate_job(instance, LENIENT)
    assert result.success
    assert result.asset_materializations_for_node("merged_candidate")[0].metadata["trusted"].value is False
    assert result.asset_materializations_for_node("production_adapter")[0].metadata["branch"].value == "experimental"


def test_no_new_adapters_is_a_clear_failure(world):
    instance, store, run, _ = world
    assert run_candidate_job(instance, LENIENT).success
    again = run_candidate_job(instance, LENIENT)
    assert not again.success
    error = again.get_step_failure_events()[0].step_failure_data.error
    assert "no new adapter for en-gb-scotland since its last candidate" in error.message


def test_thresholds_from_the_gates_file(world, mloc_home):
    instance = world[0]
    (mloc_home / "gates.json").write_text('{"en-gb-scotland": {"max_cer": 10.0, "max_wer": 10.0}}')
    result = run_candidate_job(instance, {"bootstrap_samples": 200})
    assert result.success and check_results(result)["cer_gate"] is True
