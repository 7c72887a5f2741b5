"""Shared by the training-chain sensor tests: one evaluation of the sensor on a real instance."""

import dagster as dg
import pytest

from mloc_dagster.core.state import StateStore
from mloc_dagster.definitions import defs
from mloc_dagster.resources.state import StateStoreResource
from mloc_dagster.sensors.training_chain import training_chain_sensor


@pytest.fixture()
def store(tmp_path):
    """A fresh SQLite state store (test files with other needs define their own)."""
    return StateStore(f"sqlite:///{tmp_path / 'state.db'}")


@pytest.fixture()
def instance(mloc_home):
    with dg.instance_for_test() as inst:
        yield inst


def tick(instance, store, cursor=None):
    """One sensor evaluation; returns (SensorResult, its cursor)."""
    ctx = dg.build_sensor_context(instance=instance, cursor=cursor, definitions=defs,
                                  resources={"state": StateStoreResource(url=store.url)})
    result = training_chain_sensor(ctx)
    return result, result.cursor
