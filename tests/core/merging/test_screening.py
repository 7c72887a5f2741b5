"""Screening at a merge, on adapters that were actually trained (no Dagster): an honest slice is
accepted, noise is excluded, a scaled update is clipped, a free-rider and a slice whose dev loss
is not sane are refused, and every decision is in the merge's per-source table."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from bench.pool_nodes import forge, shuffled_copy
from mloc_dagster.core.adapters.lora import delta_weights, load_adapter
from mloc_dagster.core.merging.candidates import load_trusted, merge_candidate
from mloc_dagster.core.merging.screening import (
    DEV_LOSS_NOT_SANE,
    EMPTY_UPDATE,
    dev_loss_sane,
    markdown_table,
    reputation_updates,
    train_reference_update,
)
from mloc_dagster.core.pool.reputation import TRUST_BAR
from mloc_dagster.core.training.asr import train_adapter
from mloc_dagster.core.training.spec import AdapterHParams, AdapterJobSpec

HP = AdapterHParams(r=8, alpha=16.0, batch_size=8, warmup_steps=0, seed=3, lr=3e-3)


@dataclass(frozen=True)
class Trained:
    reference: Path
    honest: Path
    shuffled: Path
    root: Path


@pytest.fixture(scope="module")
def trained(pretrained_base, corpus, tmp_path_factory) -> Trained:
    """The server's reference (root set: stream positions 0–64) and two slices of positions
    64–192: one honest, one on shuffled transcripts."""
    base, _ = pretrained_base
    root = tmp_path_factory.mktemp("screening")
    common = dict(base_model_dir=base, timebox_s=900, feature_cache_dir=corpus.feature_cache, hparams=HP)
    train_reference_update(base, corpus.scottish, root / "reference", samples=64, hparams=HP,
                           feature_cache_dir=corpus.feature_cache)
    shuffled = shuffled_copy(corpus.scottish, root / "derived", seed=1, feature_cache=corpus.feature_cache)
    for name, data in (("honest", corpus.scottish), ("shuffled", shuffled)):
        train_adapter(AdapterJobSpec(dataset_version_path=data, out_dir=root / name, segments=[(64, 192)],
                                     node_id=f"node-{name}", **common))
    return Trained(root / "reference", root / "honest", root / "shuffled", root)


def forged(trained: Trained, behaviour: str, out: Path, k: float = 8.0) -> Path:
    honest = load_trusted(trained.honest, "honest")
    return forge(behaviour, out, start=None, own=honest, honest=[honest], dev_cer=0.5, node_id=f"node-{behaviour}",
                 k=k, seed=0, template=honest.config)


def test_honest_accepted_noise_excluded_scaled_clipped_freerider_refused(trained, tmp_path):
    sources = [str(trained.honest), *(str(forged(trained, b, tmp_path / b)) for b in ("noise", "scale", "freeride"))]
    result, _ = merge_candidate(sources, [128, 128, 128, 128], tmp_path / "merged", reference=trained.reference,
                                samples=[128] * 4)
    rows = {r["node_id"]: r for r in result.screening}
    honest, noise, scale, freeride = (rows[f"node-{b}"] for b in ("honest", "noise", "scale", "freeride"))
    assert honest["decision"] == "accepted" and honest["cosine"] > 0.25 and honest["clip"] == 1.0
    assert noise["decision"] == "excluded" and abs(noise["cosine"]) < 0.05 and noise["weight"] == 0
    # The scaled update points the honest way (same cosine) but is cut back to the bound.
    assert scale["decision"] == "accepted" and scale["cosine"] == pytest.approx(honest["cosine"], abs=1e-4)
    assert scale["clipped"] and scale["clip"] * scale["norm"] <= 2.0 * honest["norm"] * 1.001
    assert freeride["decision"] == "refused" and freeride["reason"] == EMPTY_UPDATE
    assert result.sources == [str(trained.honest), sources[2]]  # noise had weight 0, freeride was refused
    assert {r.source for r in result.rejected} == {sources[3]} and Path(sources[3]).is_dir()  # kept on disk
    summary = json.loads(json.dumps(result.summary()))
    assert summary["reference"] == str(trained.reference) and len(summary["screening"]) == 4
    table = markdown_table(result.screening)
    assert "| node-noise |" in table and "excluded: direction: cosine" in table and "norm clipped" in table

    moved = reputation_updates(result.screening)
    after = {n: step.apply(1.0) for n, step in moved.items()}
    assert after["node-honest"] == 1.0
    assert after["node-freeride"] == pytest.approx(0.5)  # refused: untrusted at once
    assert after["node-noise"] == pytest.approx(0.7)  # target 0: below the bar at the second such merge
    assert TRUST_BAR <= after["node-scale"] < 1.0  # clipped: target capped at 0.5


def test_shuffled_transcripts_point_elsewhere_and_hurt_the_dev_loss(trained, tmp_path):
    result, _ = merge_candidate([str(trained.honest), str(trained.shuffled)], [1.0, 1.0], tmp_path / "merged",
                                reference=trained.reference)
    honest, shuffled = result.screening
    assert shuffled["cosine"] < honest["cosine"]
    assert shuffled["dev_cer"] > honest["dev_cer"]
    # Either refused for its dev loss or weighted below what an honest slice gets.
    assert shuffled["decision"] != "accepted" or shuffled["weight"] < honest["weight"]
    step = reputation_updates(result.screening)["node-shuffled"]
    assert step.apply(step.apply(1.0)) < TRUST_BAR  # untrusted within two such merges


def test_updates_are_taken_from_the_start_adapter(trained, pretrained_base, corpus, tmp_path):
    """A slice trained from a start is scored on ΔW − ΔW_start; the merge of one slice is the slice."""
    base, _ = pretrained_base
    start = tmp_path / "start"  # a round's start: the previous round's merged adapter
    merge_candidate([str(trained.honest)], [1.0], start)
    slice_dir = tmp_path / "slice"
    train_adapter(AdapterJobSpec(base_model_dir=base, dataset_version_path=corpus.scottish, out_dir=slice_dir,
                                 init_adapter=start, segments=[(192, 256)], hparams=HP, timebox_s=900,
                                 feature_cache_dir=corpus.feature_cache, node_id="node-next"))
    reference = train_reference_update(base, corpus.scottish, tmp_path / "ref", start_adapter=start,
                                       samples=64, hparams=HP, feature_cache_dir=corpus.feature_cache)
    assert reference.resumed_kind == "warm_start"
    copy = tmp_path / "start-copy"  # the start handed back unchanged
    shutil.copytree(start, copy)
    result, _ = merge_candidate([str(slice_dir), str(copy)], [64, 64], tmp_path / "merged",
                                reference=tmp_path / "ref", start_adapter=start)
    rows = {r["source"]: r for r in result.screening}
    assert rows[str(copy)]["reason"] == EMPTY_UPDATE and rows[str(slice_dir)]["decision"] == "accepted"
    assert rows[str(slice_dir)]["cosine"] > 0.05 and result.start == str(start)
    merged, alone = delta_weights(load_adapter(tmp_path / "merged")), delta_weights(load_trusted(slice_dir, "s"))
    for module, dw in alone.items():
        assert torch.allclose(merged[module], dw, atol=1e-5 * float(dw.abs().max()))


def test_nothing_accepted_and_a_bad_reference_are_clear_errors(trained, tmp_path):
    noise = forged(trained, "noise", tmp_path / "noise")
    with pytest.raises(ValueError, match=r"no adapter accepted by screening .*noise: excluded \(direction"):
        merge_candidate([str(noise)], [1.0], tmp_path / "merged", reference=trained.reference)
    assert not (tmp_path / "merged").exists()
    with pytest.raises(ValueError, match=r"reference adapter .*missing cannot be used"):
        merge_candidate([str(trained.honest)], [1.0], tmp_path / "merged", reference=tmp_path / "missing")
    with pytest.raises(ValueError, match="2 weights for 1 adapters"):
        merge_candidate([str(trained.honest)], [1.0, 2.0], tmp_path / "merged")


def test_a_malformed_result_json_is_a_refused_row_kept_on_disk(trained, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(trained.honest, bad)
    (bad / "result.json").write_text('{"node_id": "node-bad", "dev_cer": 0.1')  # cut short
    result, _ = merge_candidate([str(trained.honest), str(bad)], [1.0, 1.0], tmp_path / "merged",
                                reference=trained.reference)
    rows = {r["source"]: r for r in result.screening}
    assert rows[str(bad)]["decision"] == "refused", rows
    assert rows[str(bad)]["reason"].startswith("result.json is not valid JSON")
    assert rows[str(trained.honest)]["decision"] == "accepted" and result.sources == [str(trained.honest)]
    assert (bad / "result.json").read_text().startswith('{"node_id"')  # kept as the node left it


def test_dev_loss_rule():
    assert dev_loss_sane(0.33, 0.30) and dev_loss_sane(0.37, 0.30)  # within 1.25 × baseline
    assert not dev_loss_sane(0.38, 0.30)
    assert dev_loss_sane(0.14, 0.10) and not dev_loss_sane(0.16, 0.10)  # within baseline + 0.05
    assert dev_loss_sane(0.9, None) and dev_loss_sane(None, 0.1)  # unknown: not checked
    assert DEV_LOSS_NOT_SANE == "dev loss not sane"


def test_the_shuffled_copy_permutes_training_transcripts_only(corpus, tmp_path):
    from mloc_dagster.core.data.datasets import DatasetVersion

    src, dst = DatasetVersion(corpus.scottish), DatasetVersion(shuffled_copy(corpus.scottish, tmp_path, seed=1))
    assert dst.version != src.version and dst.splits == src.splits
    for split in ("dev", "test"):
        assert [(u.utt_id, u.text) for u in src.iter_utterances(split)] == [
            (u.utt_id, u.text) for u in dst.iter_utterances(split)]
    before, after = list(src.iter_utterances("train")), list(dst.iter_utterances("train"))
    assert [u.utt_id for u in before] == [u.utt_id for u in after]  # same audio, same stream positions
    assert sorted(u.text for u in before) == sorted(u.text for u in after)
    assert sum(x.text != y.text for x, y in zip(before, after, strict=True)) > len(before) // 2
