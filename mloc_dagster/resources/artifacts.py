"""Where artifacts live. Resolved at run time so a run sees the ``MLOC_HOME`` of its process."""

from pathlib import Path

import dagster as dg

from mloc_dagster.paths import MlocPaths, mloc_home


class ArtifactStore(dg.ConfigurableResource):
    """Root directory for incoming batches, datasets, models, adapters and reports."""

    home: str = ""  # empty: $MLOC_HOME, else .mloc in the working directory

    @property
    def paths(self) -> MlocPaths:
        return MlocPaths(Path(self.home).absolute() if self.home else mloc_home())
