"""`mloc base-model add DIR`: a local checkpoint registered as a Dagster run of base_model_job and
pinned by content hash; a family the line cannot train is refused with the supported list, and a
directory that is not there is refused before Dagster starts."""

import dagster as dg

from mloc_dagster.core.publish import model_dir_hash
from tests.cli.test_cli import mloc_in_process
from tests.core.models.families import save_tiny_checkpoint


def base_materializations(instance) -> list:
    return instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=dg.AssetKey("base_model")),
                                           limit=100).records


def test_a_checkpoint_registers_under_its_content_hash(registered_base, tmp_path):
    instance, _ = registered_base
    checkpoint = save_tiny_checkpoint("wav2vec2", tmp_path / "wav2vec2-tiny")
    version = model_dir_hash(checkpoint)

    code, out = mloc_in_process("base-model", "add", str(checkpoint), "--base-dialect", "en-us")
    assert code == 0, out
    assert f"base_model {version}" in out and "family wav2vec2" in out and "parameters" in out
    assert "en-us dev CER" in out and "test CER" in out
    [record] = [r for r in base_materializations(instance)
                if r.asset_materialization.tags.get("dagster/data_version") == version]
    assert record.run_id in out  # the run the command printed, on the instance (and in the UI)
    assert instance.get_run_by_id(record.run_id).job_name == "base_model_job"

    code, again = mloc_in_process("base-model", "add", str(checkpoint))  # the same directory, the same version
    assert code == 0 and f"base_model {version}" in again


def test_a_checkpoint_without_a_ctc_head_is_refused_with_the_supported_list(registered_base, mloc_home, tmp_path):
    instance, _ = registered_base
    before = sorted(p.name for p in (mloc_home / "models" / "base").iterdir())
    materialized = len(base_materializations(instance))

    code, out = mloc_in_process("base-model", "add", str(save_tiny_checkpoint("wav2vec2-no-head", tmp_path / "no-head")))
    assert code != 0
    assert "['Wav2Vec2Model']" in out  # what it holds, then what the line trains
    assert "Supported:" in out and "Wav2Vec2ForCTC" in out and "HubertForCTC" in out
    assert sorted(p.name for p in (mloc_home / "models" / "base").iterdir()) == before  # nothing copied
    assert len(base_materializations(instance)) == materialized


def test_a_missing_or_non_model_directory_is_refused_before_dagster_starts(mloc_home, tmp_path):
    missing = tmp_path / "no-such-model"
    code, out = mloc_in_process("base-model", "add", str(missing))
    assert code != 0 and f"{missing}: no such directory" in out

    (tmp_path / "empty").mkdir()
    code, out = mloc_in_process("base-model", "add", str(tmp_path / "empty"))
    assert code != 0 and "no config.json" in out
    assert [p.name for p in (mloc_home / "dagster").iterdir()] == ["dagster.yaml"]  # no instance was opened
