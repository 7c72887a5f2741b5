"""base_model's pre-training path through Dagster: the model lands under its content hash."""

from mloc_dagster.assets.lineage import latest_metadata
from mloc_dagster.core.publish import model_dir_hash
from mloc_dagster.definitions import defs


def test_pretrained_base_is_published_under_its_content_hash(registered_base, mloc_home):
    instance, _ = registered_base
    result = defs.resolve_job_def("base_model_job").execute_in_process(
        instance=instance, run_config={"ops": {"base_model": {"config": {
            "max_steps": 2, "train_seconds": 120, "batch_size": 8, "lr": 0.002, "length_groups": 4}}}})
    assert result.success
    md = latest_metadata(instance, "base_model")
    models = mloc_home / "models" / "base"
    assert md["path"] == str(models / md["version"]) and model_dir_hash(md["path"]) == md["version"]
    assert md["steps"] == 2 and 0 <= md["test_cer"]
    # the recipe reached the loop
    assert md["samples"] == 16 and md["batch_size"] == 8 and md["lr"] == 0.002 and md["length_groups"] == 4
    assert not [p for p in models.iterdir() if p.name.startswith(".pretrain-")]  # the temporary directory is gone


def test_a_half_copy_of_a_registered_base_is_rebuilt_not_trusted(registered_base, mloc_home):
    """What a crash in the middle of the old `copytree` left under the version's name is detected by
    its content hash and copied again; the base then loads and the run succeeds."""
    instance, base_dir = registered_base
    version = model_dir_hash(base_dir)
    published = mloc_home / "models" / "base" / version
    assert model_dir_hash(published) == version
    (published / "model.safetensors").unlink()
    result = defs.resolve_job_def("base_model_job").execute_in_process(
        instance=instance, raise_on_error=False,
        run_config={"ops": {"base_model": {"config": {"checkpoint_dir": str(base_dir)}}}})
    assert result.success, [e.message for e in result.all_events if e.is_failure]
    assert model_dir_hash(published) == version and (published / "model.safetensors").is_file()
    assert latest_metadata(instance, "base_model")["path"] == str(published)
    assert [p.name for p in published.parent.iterdir()] == [version]  # no temporary or old copy left
