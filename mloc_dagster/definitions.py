"""The code location: merges each domain's Definitions; nothing else."""

import dagster as dg

from mloc_dagster.assets import datasets
from mloc_dagster.resources.artifacts import ArtifactStore
from mloc_dagster.sensors import incoming

defs = dg.Definitions.merge(
    datasets.defs,
    incoming.defs,
    dg.Definitions(resources={"artifacts": ArtifactStore()}),
)
