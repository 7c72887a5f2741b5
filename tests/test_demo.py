"""The demo's gate is production's, with relative CER/WER limits in place of absolute ones."""

from __future__ import annotations

from types import SimpleNamespace

from mloc_dagster.cli.demo import DEMO_GATES, TARGET_DIALECT, describe_thresholds, learning_curve
from mloc_dagster.core.gates.gate import GateThresholds


def test_demo_gate_is_relative_and_not_looser_than_production() -> None:
    demo, production = GateThresholds.from_mapping(DEMO_GATES[TARGET_DIALECT]), GateThresholds()
    assert demo.max_cer_rel_base is not None and demo.max_cer_rel_base <= 0.8
    assert demo.max_wer_rel_base is not None and demo.max_wer_rel_base <= 0.8
    assert demo.max_base_regression_rel <= production.max_base_regression_rel
    assert demo.min_p_better >= production.min_p_better
    assert demo.min_test_speakers >= production.min_test_speakers
    assert describe_thresholds(DEMO_GATES[TARGET_DIALECT]) == (
        "CER ≤ 0.80 × base model, WER ≤ 0.80 × base model, P(better) ≥ 0.95, en-us regression ≤ 5%")


def test_learning_curve_rows() -> None:
    jobs = [SimpleNamespace(job_index=i, status="succeeded",
                            metrics={"dev_cer": cer, "train_loss": 0.5, "samples": 3200, "total_samples": 3200 * (i + 1)})
            for i, cer in enumerate([0.25, 0.22, None])]  # None: a non-finite figure, stored as null
    assert learning_curve(jobs) == [
        ("learning curve: job 1", "dev CER 0.250, train loss 0.500, 3,200 samples seen (succeeded)"),
        ("  job 2", "dev CER 0.220, train loss 0.500, 6,400 samples seen (succeeded)"),
        ("  job 3", "dev CER -, train loss 0.500, 9,600 samples seen (succeeded)"),
    ]
