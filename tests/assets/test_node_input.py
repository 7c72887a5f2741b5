"""What a node hands in is checked before anything is evaluated (core/adapters/format.py), through
Dagster on a real instance: a slice or adapter whose result.json is malformed is refused with the
reason, kept on disk, and the round merge, the candidate merge and the gate go on without it."""

import dataclasses
import shutil
from pathlib import Path

import pytest

from mloc_dagster.core.state import StateStore
from mloc_dagster.core.state.engine import resolve_state_url
from mloc_dagster.runs.service import StartRequest, TrainingRunError, start_run
from tests.assets.conftest import DIALECT
from tests.assets.test_candidates import metadata, run_candidate_job, run_with_adapters
from tests.assets.test_rounds import came_in, distributed_run, merge_round


def broken_copy(result, out, text: str):
    """The adapter of ``result`` copied to ``out`` with its result.json replaced by ``text``."""
    shutil.copytree(result.path, out)
    (out / "result.json").write_text(text)
    return dataclasses.replace(result, path=str(out))


def test_slices_with_a_malformed_result_json_are_refused_and_the_round_merges(line, line_instance, tmp_path):
    store = StateStore(resolve_state_url())
    run = distributed_run(store, line_instance, "good")
    good = line.adapters["good"]
    cut_short = broken_copy(good, tmp_path / "cut-short", '{"run_id": "good", "job_')  # a node that crashed
    wrong_type = broken_copy(good, tmp_path / "wrong-type", '{"run_id": "good", "job_index": "zero"}')
    came_in(store, run, [good, cut_short, wrong_type])
    result = merge_round(line_instance, run)
    assert result.success, result.all_events[-1]
    outcome = {s.node_id: s.outcome for s in store.round_slices(run.run_id, 0)}
    assert outcome["node-0"].startswith("accepted"), outcome
    assert outcome["node-1"].startswith("refused: result.json is not valid JSON: "), outcome
    assert outcome["node-2"] == "refused: result.json: field 'job_index' is \"zero\", expected an integer ≥ 0 or null"
    assert (tmp_path / "cut-short" / "result.json").read_text() == '{"run_id": "good", "job_'  # kept as left
    assert store.get_job(run.run_id, 0).metrics["accepted"] == 1


def test_an_adapter_with_a_malformed_result_json_is_refused_at_the_merge_and_the_gate_reports(
        line, line_instance, tmp_path):
    store = StateStore(resolve_state_url())
    good_run = run_with_adapters(line_instance, store, [line.adapters["good"]], node="node-a")
    broken = broken_copy(line.adapters["weak"], tmp_path / "weak", '{"node_id": "node-c", "dev_cer": ')
    run_with_adapters(line_instance, store, [broken], node="node-c")  # unclaimed: merged with the good one
    result = run_candidate_job(line_instance, good_run)
    assert result.success, result.get_step_failure_events()
    merged, gate = metadata(result, "merged_candidate"), metadata(result, "gate_report")
    assert merged["rejected"] == 1 and "refused: result.json is not valid JSON" in merged["screening"]
    assert "| node-c |" in merged["screening"]
    assert "result.json is not valid JSON" in gate["report"]  # the gate says so instead of crashing
    assert (tmp_path / "weak" / "result.json").read_text() == '{"node_id": "node-c", "dev_cer": '


def test_a_warm_start_from_an_adapter_outside_the_rules_starts_nothing(line, line_instance):
    store = StateStore(resolve_state_url())
    assert run_candidate_job(line_instance, run_with_adapters(line_instance, store, [line.adapters["good"]])).success
    candidate = store.get_candidate(store.production(DIALECT).candidate_id)  # what --from reads
    before = len(store.list_runs(limit=None))
    pickled = Path(candidate.adapter_path) / "optimizer.pt"
    pickled.write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(TrainingRunError, match=r"--from: .*optimizer.pt is a pickle or code file"):
        start_run(line_instance, store, StartRequest(DIALECT, init_from="production"))
    pickled.unlink()
    shutil.rmtree(candidate.adapter_path)  # a removed candidate: a clear error, not a stack trace
    with pytest.raises(TrainingRunError, match=f"--from {candidate.candidate_id}: .* is gone from .*removed from disk"):
        start_run(line_instance, store, StartRequest(DIALECT, init_from=candidate.candidate_id))
    assert len(store.list_runs(limit=None)) == before
