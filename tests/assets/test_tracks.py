"""The track registry (assets/tracks.py) names what exists: each track's jobs, its training asset
and base asset are in the code location, its job config is that asset's config, and the chain's
cursor keys are the ones stored cursors already hold."""

from dataclasses import fields

import dagster as dg
import pytest

from mloc_dagster.assets.tracks import TRACKS, track_of
from mloc_dagster.assets.training.hparams import core_hparams
from mloc_dagster.core.state import schema
from mloc_dagster.definitions import defs
from mloc_dagster.sensors.training_chain import CANDIDATE_JOBS, FAILURE_CURSORS

GRAPH = defs.resolve_asset_graph()


@pytest.mark.parametrize("name", sorted(TRACKS))
def test_every_name_in_a_track_exists_in_the_code_location(name):
    track = TRACKS[name]
    train = defs.resolve_job_def(track.train_job)
    assert track.train_op in {node.name for node in train.graph.node_defs}
    assert defs.resolve_job_def(track.candidate_job) is not None
    assert dg.AssetKey(track.base_asset) in GRAPH.get_all_asset_keys()
    config_class = GRAPH.get(dg.AssetKey(track.train_op)).assets_def.op.config_schema.config_type
    assert set(track.job_config.model_fields) == set(config_class.fields)


def test_the_store_and_the_registry_know_the_same_tracks():
    assert set(TRACKS) == set(schema.TRACKS)
    assert track_of(None) is TRACKS[schema.ASR]  # rows from before tracks are asr
    with pytest.raises(ValueError, match="not one of asr, tts"):
        track_of("video")


def test_the_chain_cursor_keys_stay_what_stored_cursors_hold():
    assert FAILURE_CURSORS == {"train_adapter_job": "failures_after", "round_merge_job": "merge_failures_after",
                               "tts_train_adapter_job": "tts_failures_after",
                               "candidate_job": "candidate_failures_after",
                               "tts_candidate_job": "tts_candidate_failures_after"}
    assert CANDIDATE_JOBS == {"candidate_job", "tts_candidate_job"}


def test_a_tracks_hparams_are_checked_by_its_own_rule():
    assert "rehearsal_fraction" in TRACKS["asr"].hparam_keys and "rehearsal_fraction" not in TRACKS["tts"].hparam_keys
    assert TRACKS["tts"].validate({"dropout": -1.0}) == {"dropout": -1.0}  # < 0: the TTS model's default
    with pytest.raises(ValueError, match="dropout must be within"):
        TRACKS["asr"].validate({"dropout": -1.0})
    assert TRACKS["tts"].pin({})["r"] == 8 and TRACKS["asr"].pin({})["r"] == 16


@pytest.mark.parametrize("name", sorted(TRACKS))
def test_the_job_config_takes_every_hparam_and_default_from_the_core(name):
    track = TRACKS[name]
    declared = {f.name: f.default for f in fields(track.hparams)}
    config_fields = track.job_config.model_fields
    assert set(declared) <= set(track.hparam_keys)
    assert {k: config_fields[k].get_default(call_default_factory=True) for k in declared} == declared
    assert core_hparams(track.job_config(run_id="r"), track.hparams) == track.hparams()


def test_an_empty_optional_hparam_of_an_old_pinned_run_is_the_models_default():
    config = TRACKS["tts"].job_config(run_id="r", target_modules=[], train_limit=0, r=4)
    hparams = core_hparams(config, TRACKS["tts"].hparams)
    assert (hparams.target_modules, hparams.train_limit, hparams.r) == (None, None, 4)
