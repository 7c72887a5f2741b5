"""Where everything lives. One place, so the embedded default and production agree.

Everything mloc writes sits under ``MLOC_HOME`` (default ``.mloc/`` in the current checkout):
incoming batches, dataset versions, models, adapters, reports, the state database and the GPU
arbiter's lease table. No Dagster imports: the core uses this too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# The checkout (or installed tree) holding the package: workspace.yaml and dagster.yaml sit here.
REPO = Path(__file__).resolve().parent.parent


def mloc_home() -> Path:
    return Path(os.environ.get("MLOC_HOME", ".mloc")).absolute()


@dataclass(frozen=True)
class MlocPaths:
    home: Path

    @classmethod
    def from_env(cls) -> MlocPaths:
        return cls(mloc_home())

    @property
    def incoming(self) -> Path:
        return self.home / "incoming"

    @property
    def datasets(self) -> Path:
        return self.home / "datasets"

    @property
    def models(self) -> Path:
        return self.home / "models"

    @property
    def adapters(self) -> Path:
        return self.home / "adapters"

    @property
    def candidates(self) -> Path:
        return self.home / "candidates"

    @property
    def reports(self) -> Path:
        return self.home / "reports"

    @property
    def gpu(self) -> Path:
        return self.home / "gpu"

    @property
    def state_url(self) -> str:
        return os.environ.get("MLOC_DATABASE_URL") or f"sqlite:///{self.home / 'state.db'}"
