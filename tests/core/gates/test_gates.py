"""Gate decisions on crafted per-utterance results (SPEC §5)."""

from __future__ import annotations

import json
import random

import jiwer
import pytest

from mloc_dagster.core.gates.config import load_thresholds
from mloc_dagster.core.gates.gate import GATE_NAMES, GateConfigError, GateReport, GateThresholds, evaluate_gates
from mloc_dagster.core.gates.scoring import UttResult, score

# 29 characters, 5 words, no 'x': substituting k letters by 'x' is exactly k character edits.
REF = "abcde fghij klmno pqrst uvwyz"
LETTERS = [i for i, c in enumerate(REF) if c != " "]


def corrupt(ref: str, k: int) -> str:
    chars = list(ref)
    for i in LETTERS[:k]:
        chars[i] = "x"
    return "".join(chars)


def utts(prefix: str, errors_per_speaker: list[int], n_utts: int = 10) -> list[UttResult]:
    """Speakers s00, s01...; speaker j's errors spread one letter per utterance, round robin."""
    out = []
    for j, errors in enumerate(errors_per_speaker):
        for i in range(n_utts):
            k = errors // n_utts + (1 if i < errors % n_utts else 0)
            out.append(UttResult(f"{prefix}-s{j:02d}-{i:03d}", f"s{j:02d}", REF, corrupt(REF, k)))
    return out


def base_sets(reference_errors: int = 580, candidate_errors: int = 580) -> tuple[list[UttResult], list[UttResult]]:
    """Base dialect: 200 utterances = 5800 reference characters (10 % CER at 580 errors)."""
    return utts("base", [candidate_errors], n_utts=200), utts("base", [reference_errors], n_utts=200)


def evaluate(candidate, production=None, *, base=None, **thresholds) -> GateReport:
    base_cand, base_ref = base or base_sets()
    return evaluate_gates(candidate, production, base_candidate=base_cand, base_reference=base_ref,
                          thresholds=GateThresholds(**thresholds))


def test_scores_are_corpus_level_and_agree_with_jiwer() -> None:
    rng = random.Random(0)
    words = ["ach", "aye", "wee", "bairn", "ken", "dinnae", "loch", "braw"]
    results = []
    for i in range(40):
        ref = " ".join(rng.choice(words) for _ in range(rng.randint(1, 9)))
        hyp = " ".join(w if rng.random() > 0.3 else rng.choice(words)[::-1] for w in ref.split())
        results.append(UttResult(str(i), f"spk{i % 4}", ref, hyp))
    s = score(results)
    refs, hyps = [r.ref for r in results], [r.hyp for r in results]
    assert s.cer == pytest.approx(jiwer.cer(refs, hyps))
    assert s.wer == pytest.approx(jiwer.wer(refs, hyps))
    assert s.ref_chars == sum(len(r) for r in refs) and s.n_utts == 40
    # Corpus level, not the mean of per-utterance rates.
    long, short = UttResult("a", "s", "a" * 99 + "b", "a" * 100), UttResult("b", "s", "ab", "aa")
    assert score([long, short]).cer == pytest.approx(2 / 102)
    # Runs of whitespace are not errors.
    assert score([UttResult("c", "s", "a  b ", " a b")]).cer == 0.0
    with pytest.raises(ValueError):
        score([])


def test_no_production_passes_improvement_trivially() -> None:
    report = evaluate(utts("t", [2] * 6))
    gate = report.gate("improvement_gate")
    assert gate.passed and gate.value is None and "no production" in gate.description
    assert report.bootstrap is None and report.passed and report.decision == "passed"
    assert [g.name for g in report.gates] == list(GATE_NAMES)
    assert all(row.cer_production is None for row in report.speakers)


def test_clearly_better_candidate_passes() -> None:
    production = utts("t", [12, 9, 15, 10, 11, 14, 8, 13])
    candidate = utts("t", [3, 2, 4, 1, 3, 2, 2, 3])  # better for every speaker
    report = evaluate(candidate, production)
    gate = report.gate("improvement_gate")
    assert gate.passed and gate.value == 1.0
    b = report.bootstrap
    assert b is not None and b.n_speakers == 8 and b.samples == 2000
    assert b.diff == pytest.approx((20 - 92) / (80 * 29)) and b.ci_low <= b.diff <= b.ci_high < 0
    assert report.passed
    assert report.production is not None and report.production.cer > report.candidate.cer


def test_equal_candidate_fails_improvement() -> None:
    same = utts("t", [3, 1, 4, 1, 5, 9])
    report = evaluate(same, list(same))
    gate = report.gate("improvement_gate")
    assert not gate.passed and gate.value == 0.0  # never *strictly* better
    assert not report.passed and report.reasons == [f"improvement_gate: {gate.description}"]
    assert report.bootstrap is not None and report.bootstrap.ci_low == report.bootstrap.ci_high == 0.0


def test_better_on_average_because_of_one_speaker_is_not_enough() -> None:
    # Much better on one speaker, slightly worse on the nine others: the corpus CER is lower,
    # but resampling speakers shows the evidence rests on that single speaker.
    production = utts("t", [30] + [1] * 9)
    candidate = utts("t", [0] + [2] * 9)
    report = evaluate(candidate, production)
    assert report.candidate.cer < report.production.cer  # type: ignore[union-attr]
    p = report.gate("improvement_gate").value
    assert p is not None and 0.2 < p < 0.95 and not report.gate("improvement_gate").passed
    assert report.bootstrap is not None and report.bootstrap.ci_low < 0 < report.bootstrap.ci_high


@pytest.mark.parametrize(
    ("candidate_errors", "passes"),
    [(580, True), (550, True), (608, True), (609, True), (610, False), (700, False)],
)
def test_regression_gate_around_five_percent(candidate_errors: int, passes: bool) -> None:
    # Base model: 580 / 5800 = 10 % CER. 609 errors = exactly +5 % relative, 610 = +5.17 %.
    report = evaluate(utts("t", [2] * 5), base=base_sets(580, candidate_errors))
    gate = report.gate("regression_gate")
    assert gate.value == pytest.approx((candidate_errors - 580) / 580)
    assert gate.passed is passes and report.passed is passes


def test_regression_against_a_perfect_base_model() -> None:
    report = evaluate(utts("t", [2] * 5), base=base_sets(0, 1))
    assert not report.gate("regression_gate").passed  # any error is an infinite relative regression
    assert evaluate(utts("t", [2] * 5), base=base_sets(0, 0)).gate("regression_gate").passed


def test_cer_and_wer_thresholds() -> None:
    # 10 utterances x 29 chars per speaker: 30 errors on 290 chars = CER 0.1034.
    candidate = utts("t", [30] * 5)
    report = evaluate(candidate)
    assert report.gate("cer_gate").passed and report.gate("cer_gate").value == pytest.approx(30 / 290)
    # 3 letters wrong per utterance hit 1 word of 5: WER 0.2 -- exactly at the default limit.
    assert report.gate("wer_gate").value == pytest.approx(0.2) and report.gate("wer_gate").passed
    strict = evaluate(candidate, max_cer=0.10, max_wer=0.19)
    assert not strict.gate("cer_gate").passed and not strict.gate("wer_gate").passed
    assert {r.split(":")[0] for r in strict.reasons} == {"cer_gate", "wer_gate"}
    worse = evaluate(utts("t", [80] * 5))  # 8 letters per utterance: CER 0.276, WER 0.4
    assert not worse.gate("cer_gate").passed and not worse.gate("wer_gate").passed


def test_thresholds_from_config() -> None:
    t = GateThresholds.from_mapping({"max_cer": 0.1, "bootstrap_samples": 500})
    assert (t.max_cer, t.max_wer, t.bootstrap_samples) == (0.1, 0.2, 500)
    assert GateThresholds.from_mapping(None) == GateThresholds()
    with pytest.raises(ValueError, match="max_cre"):
        GateThresholds.from_mapping({"max_cre": 0.1})
    with pytest.raises(ValueError):
        GateThresholds(min_p_better=1.5)
    with pytest.raises(ValueError):
        GateThresholds(bootstrap_samples=0)


@pytest.mark.parametrize("content, message", [
    ("{not json", "gates.json: not valid JSON"),
    ('["max_cer", 0.2]', 'gates.json: expected an object {"<dialect>": {"<setting>": value}}'),
    ('{"en-029": 0.2}', "gates.json: key 'en-029': expected an object of settings, got 0.2"),
    ('{"en-029": {"max_cer": "low"}}', "gates.json: key 'en-029': max_cer must be a number, got 'low'"),
    ('{"en-029": {"bootstrap_samples": 2.5}}', "gates.json: key 'en-029': bootstrap_samples must be an integer"),
    ('{"en-029": {"max_cer": true}}', "max_cer must be a number, got True"),
    ('{"en-029": {"min_p_better": 2}}', "gates.json: key 'en-029': min_p_better must be within [0, 1], got 2"),
])
def test_a_malformed_gates_file_names_the_file_and_key(tmp_path, content, message) -> None:
    (tmp_path / "gates.json").write_text(content)
    with pytest.raises(GateConfigError) as refused:
        load_thresholds(tmp_path / "gates.json", "en-029", {}, {})
    assert message in str(refused.value)


def test_thresholds_run_config_over_the_file_over_the_defaults(tmp_path) -> None:
    path = tmp_path / "gates.json"
    assert load_thresholds(path, "en-029", {"bootstrap_samples": 500}, {}) == GateThresholds(bootstrap_samples=500)
    path.write_text(json.dumps({"en-029": {"max_cer": 0.3, "bootstrap_samples": 100}, "en-us": {"max_cer": "x"}}))
    t = load_thresholds(path, "en-029", {"bootstrap_samples": 500}, {"max_wer": 0.4})
    assert (t.max_cer, t.max_wer, t.bootstrap_samples) == (0.3, 0.4, 100)  # another dialect's entry is not read
    with pytest.raises(GateConfigError, match="gate run config for en-029: max_wer must be a number, got 'high'"):
        load_thresholds(path, "en-029", {}, {"max_wer": "high"})


def test_bootstrap_is_deterministic_for_a_seed() -> None:
    production = utts("t", [30] + [1] * 9)
    candidate = utts("t", [0] + [2] * 9)
    a = evaluate(candidate, production, seed=7)
    b = evaluate(candidate, production, seed=7)
    c = evaluate(candidate, production, seed=8)
    assert a.to_json() == b.to_json()
    assert a.bootstrap != c.bootstrap  # the seed is what makes it repeatable


def test_paired_sets_must_match() -> None:
    candidate = utts("t", [1, 2])
    with pytest.raises(ValueError, match="utterance sets differ"):
        evaluate(candidate, candidate[:-1])
    with pytest.raises(ValueError, match="twice"):
        evaluate(candidate + candidate[:1])
    base_cand, base_ref = base_sets()
    with pytest.raises(ValueError, match="base-dialect"):
        evaluate(candidate, base=(base_cand[1:], base_ref))


def test_report_markdown_and_json() -> None:
    production = utts("t", [12, 9, 15, 12, 9])
    candidate = utts("t", [3, 2, 4, 3, 2])
    report = evaluate(candidate, production, bootstrap_samples=300)
    md = report.to_markdown()
    assert "## Gate decision: **PASSED**" in md
    assert "| s00 | 10 | 0.0103 | 0.0414 |" in md  # per-speaker table
    assert "95 % interval" in md and "300 resamples" in md and "### Base dialect" in md
    for name in GATE_NAMES:
        assert f"| {name} |" in md

    data = json.loads(report.to_json())
    assert data["decision"] == "passed" and data["bootstrap"]["samples"] == 300
    assert [g["name"] for g in data["gates"]] == list(GATE_NAMES)
    assert GateReport.from_json(report.to_json()) == report
    metrics = report.metrics()
    assert metrics["p_better"] == 1.0 and metrics["candidate_cer"] == pytest.approx(14 / 1450)

    failed = evaluate(candidate, list(candidate)).to_markdown()
    assert "**FAILED**" in failed and "**FAIL**" in failed and "improvement_gate:" in failed
    assert "no production to compare with" in evaluate(candidate).to_markdown()


def test_too_few_test_speakers_is_insufficient_evidence() -> None:
    production = utts("t", [30, 30])
    candidate = utts("t", [0, 0])  # far better, but on two speakers only
    report = evaluate(candidate, production)
    gate = report.gate("improvement_gate")
    assert not gate.passed and "insufficient evidence: 2 test speakers" in gate.description
    assert not evaluate(candidate).gate("improvement_gate").passed  # not even with nothing to compare
    assert evaluate(candidate, production, min_test_speakers=2).gate("improvement_gate").passed
    assert "insufficient evidence" in report.to_markdown()


def relative(candidate, *, dialect_base=None, production=None, label="base model", **thresholds) -> GateReport:
    base_cand, base_ref = base_sets()
    return evaluate_gates(candidate, production, base_candidate=base_cand, base_reference=base_ref,
                          thresholds=GateThresholds(**thresholds), reference_label=label, dialect_base=dialect_base)


@pytest.mark.parametrize(("candidate_errors", "passes"), [(10, True), (24, True), (25, False), (30, False)])
def test_relative_cer_limit_is_a_fraction_of_the_base_model(candidate_errors: int, passes: bool) -> None:
    # Base model on the dialect: 30 errors / 290 chars per speaker = CER 0.1034; 0.8 × = 24 errors.
    base_model = utts("t", [30] * 5)
    report = relative(utts("t", [candidate_errors] * 5), production=base_model, max_cer_rel_base=0.8)
    gate = report.gate("cer_gate")
    assert gate.threshold == pytest.approx(0.8 * 30 / 290)
    assert gate.passed is passes
    assert "0.80 × base model 0.1034" in gate.description
    assert report.dialect_base is not None and report.dialect_base.cer == pytest.approx(30 / 290)


def test_relative_limit_replaces_the_absolute_one() -> None:
    # CER 0.2069 is far above the absolute default (0.15) but well under 0.8 × a base at 0.3448.
    base_model, candidate = utts("t", [100] * 5), utts("t", [60] * 5)
    assert not evaluate(candidate).gate("cer_gate").passed
    report = relative(candidate, production=base_model, max_cer_rel_base=0.8, max_wer_rel_base=1.0)
    assert report.gate("cer_gate").passed and report.gate("wer_gate").passed
    assert report.gate("wer_gate").threshold == pytest.approx(report.dialect_base.wer)  # type: ignore[union-attr]


def test_relative_wer_and_regression_fail_together() -> None:
    # Fewer character errors (0.8 × CER) but every utterance still has its first word wrong: WER
    # stays at the base model's, so a 0.8 × WER limit fails; so does a +10 % base regression.
    base_model, candidate = utts("t", [30] * 5), utts("t", [24] * 5)
    base_cand, base_ref = base_sets(580, 638)
    report = evaluate_gates(candidate, base_model, base_candidate=base_cand, base_reference=base_ref,
                            thresholds=GateThresholds(max_cer_rel_base=0.8, max_wer_rel_base=0.8),
                            reference_label="base model")
    assert report.gate("cer_gate").passed and report.gate("improvement_gate").passed
    assert not report.gate("wer_gate").passed and not report.gate("regression_gate").passed
    assert not report.passed and {r.split(":")[0] for r in report.reasons} == {"wer_gate", "regression_gate"}


def test_relative_limit_against_production_needs_the_base_model_results() -> None:
    base_model, production, candidate = utts("t", [30] * 5), utts("t", [26] * 5), utts("t", [20] * 5)
    # The reference is the production adapter: without the base model's results there is no limit.
    blind = relative(candidate, production=production, label="production", max_cer_rel_base=0.8)
    gate = blind.gate("cer_gate")
    assert not gate.passed and "were not given" in gate.description and blind.dialect_base is None
    report = relative(candidate, production=production, label="production", dialect_base=base_model,
                      max_cer_rel_base=0.8)
    assert report.gate("cer_gate").passed and report.gate("cer_gate").threshold == pytest.approx(0.8 * 30 / 290)
    assert report.production is not None and report.production.cer == pytest.approx(26 / 290)
    md = report.to_markdown()
    assert "| base model | 50 | 0.1034 |" in md and "0.80 × base model" in md
    assert GateReport.from_json(report.to_json()) == report
    with pytest.raises(ValueError, match="base-model results"):
        relative(candidate, production=production, label="production", dialect_base=base_model[1:],
                 max_cer_rel_base=0.8)


def test_relative_thresholds_from_config() -> None:
    t = GateThresholds.from_mapping({"max_cer_rel_base": 0.8, "max_wer_rel_base": 0.9})
    assert (t.max_cer_rel_base, t.max_wer_rel_base, t.max_base_regression_rel) == (0.8, 0.9, 0.05)
    assert GateThresholds().max_cer_rel_base is None  # absolute by default
    for bad in (0, -0.5):
        with pytest.raises(ValueError, match="max_cer_rel_base"):
            GateThresholds(max_cer_rel_base=bad)
