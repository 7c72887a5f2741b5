"""base_model's pre-training path through Dagster: the model lands under its content hash."""

from mloc_dagster.assets.lineage import latest_metadata
from mloc_dagster.core.model import model_dir_hash
from mloc_dagster.definitions import defs


def test_pretrained_base_is_published_under_its_content_hash(registered_base, mloc_home):
    instance, _ = registered_base
    result = defs.resolve_job_def("base_model_job").execute_in_process(
        instance=instance, run_config={"ops": {"base_model": {"config": {"max_steps": 2, "train_seconds": 120}}}})
    assert result.success
    md = latest_metadata(instance, "base_model")
    models = mloc_home / "models" / "base"
    assert md["path"] == str(models / md["version"]) and model_dir_hash(md["path"]) == md["version"]
    assert md["steps"] == 2 and 0 <= md["test_cer"]
    assert not [p for p in models.iterdir() if p.name.startswith(".pretrain-")]  # the temporary directory is gone
