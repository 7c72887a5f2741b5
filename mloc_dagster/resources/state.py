"""mloc's own state (training runs, jobs, candidates, promotions) as a resource."""

from functools import lru_cache

import dagster as dg

from mloc_dagster.core.state import StateStore
from mloc_dagster.core.state.engine import resolve_state_url


@lru_cache(maxsize=8)
def open_store(url: str) -> StateStore:
    """One engine per URL and process; the schema is created on first open."""
    return StateStore(url)


class StateStoreResource(dg.ConfigurableResource):
    """SQLite under MLOC_HOME by default; any SQLAlchemy URL (Postgres in production)."""

    # Empty: $MLOC_DATABASE_URL, else sqlite:///$MLOC_HOME/state.db. A URL with a password belongs in
    # the environment (or dg.EnvVar), never in run config, which the UI shows as it is.
    url: str = ""

    def store(self) -> StateStore:
        return open_store(self.url or resolve_state_url())
