"""incoming_batches_sensor on a real instance: new batch → one request; re-tick → none."""

import dagster as dg

from mloc_dagster.definitions import defs
from mloc_dagster.partitions import dialect_partitions
from mloc_dagster.sensors.incoming import incoming_batches_sensor
from tests.conftest import copy_batch


def evaluate(instance, cursor):
    ctx = dg.build_sensor_context(instance=instance, cursor=cursor, definitions=defs)
    return incoming_batches_sensor(ctx)


def test_new_batches_request_one_run_per_dialect_then_nothing(mloc_home, espeak_batch):
    incoming = mloc_home / "incoming"
    with dg.instance_for_test() as instance:
        result = evaluate(instance, None)
        assert result.run_requests == [] and result.dynamic_partitions_requests == []

        copy_batch(espeak_batch, incoming, "en-gb-scotland", "b0001")
        (incoming / "en-us" / "half-uploaded").mkdir(parents=True)  # no manifest: not complete
        (incoming / "Bad_Dialect" / "b1").mkdir(parents=True)
        (incoming / "Bad_Dialect" / "b1" / "manifest.jsonl").write_text("")
        result = evaluate(instance, None)
        assert [r.partition_key for r in result.run_requests] == ["en-gb-scotland"]
        assert result.run_requests[0].run_key.startswith("en-gb-scotland:")
        (add,) = result.dynamic_partitions_requests
        assert add.partition_keys == ["en-gb-scotland"] and add.partitions_def_name == "dialect"
        cursor = result.cursor

        instance.add_dynamic_partitions(dialect_partitions.name, ["en-gb-scotland"])
        again = evaluate(instance, cursor)
        assert again.run_requests == [] and again.dynamic_partitions_requests == []
        assert again.cursor == cursor

        # a second batch: one new request with a different run key; the dialect is already known
        copy_batch(espeak_batch, incoming, "en-gb-scotland", "b0002")
        third = evaluate(instance, cursor)
        assert len(third.run_requests) == 1 and third.dynamic_partitions_requests == []
        assert third.run_requests[0].run_key != result.run_requests[0].run_key
