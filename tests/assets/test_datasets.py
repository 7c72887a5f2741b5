"""dataset_version the way a user materializes it: `dagster asset materialize` in a subprocess."""

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg

from mloc_dagster.assets.datasets.versions import dataset_version
from mloc_dagster.partitions import dialect_partitions
from mloc_dagster.resources.artifacts import ArtifactStore
from tests.conftest import copy_batch, write_manifest

REPO = Path(__file__).resolve().parents[2]


def test_materialize_from_the_cli(mloc_home, espeak_batch):
    copy_batch(espeak_batch, mloc_home / "incoming", "en-gb-scotland", "b0001")
    with dg.DagsterInstance.get() as instance:
        instance.add_dynamic_partitions(dialect_partitions.name, ["en-gb-scotland"])
    dagster = Path(sys.executable).parent / "dagster"
    proc = subprocess.run(
        [str(dagster), "asset", "materialize", "--select", "dataset_version", "--partition", "en-gb-scotland",
         "-m", "mloc_dagster.definitions"],
        cwd=REPO, env=os.environ.copy(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    with dg.DagsterInstance.get() as instance:
        event = instance.get_latest_materialization_event(dg.AssetKey("dataset_version"))
        mat = event.asset_materialization
        assert mat.partition == "en-gb-scotland"
        md = mat.metadata
        assert md["rows"].value == 36 and md["quarantined"].value == 0
        assert md["train_rows"].value + md["dev_rows"].value + md["test_rows"].value == 36
        assert Path(md["path"].value, "manifest.json").is_file()
        assert mat.tags["dagster/data_version"] == md["version"].value


def test_bad_rows_are_counted_and_all_invalid_fails_clearly(mloc_home, espeak_batch):
    batch = copy_batch(espeak_batch, mloc_home / "incoming", "en-gb-scotland", "b0001")
    with open(batch / "manifest.jsonl", "a") as f:
        f.write('{"audio": "../../../etc/passwd", "text": "hi", "speaker": "s", "contributor": "c"}\n')
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(dialect_partitions.name, ["en-gb-scotland", "en-029"])
        ok = dg.materialize([dataset_version], partition_key="en-gb-scotland", instance=instance,
                            resources={"artifacts": ArtifactStore()})
        md = ok.asset_materializations_for_node("dataset_version")[0].metadata
        assert md["quarantined"].value == 1
        assert md["quarantined_by_reason"].value == {"path_outside_batch": 1}

        bad = mloc_home / "incoming" / "en-029" / "b1"
        bad.mkdir(parents=True)
        write_manifest(bad, [{"audio": "x.wav", "text": "hi", "speaker": "s", "contributor": "c"}])
        failed = dg.materialize([dataset_version], partition_key="en-029", instance=instance,
                                resources={"artifacts": ArtifactStore()}, raise_on_error=False)
        assert not failed.success
        failure = failed.get_step_failure_events()[0].step_failure_data.error
        assert "no valid rows" in failure.message and "b1 line 1 field 'audio': missing_file" in failure.message
