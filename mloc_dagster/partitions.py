"""The one partitioning of the graph: a dynamic partition per dialect."""

import re

import dagster as dg

dialect_partitions = dg.DynamicPartitionsDefinition(name="dialect")

DIALECT_KEY = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")


def is_valid_dialect(key: str) -> bool:
    return bool(DIALECT_KEY.match(key))
