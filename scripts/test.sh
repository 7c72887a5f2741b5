#!/usr/bin/env bash
# The test suite, on its own temporary MLOC_HOME/DAGSTER_HOME (tests make their own).
set -euo pipefail
cd "$(dirname "$0")/.."
MLOC_WITH_POSTGRES=1 MLOC_WITH_BROWSER=1 bash scripts/setup.sh
unset DAGSTER_HOME MLOC_HOME MLOC_DATABASE_URL
export MLOC_REQUIRE_POSTGRES=1
exec .venv/bin/python -m pytest -q -p no:cacheprovider --timeout=900 "$@"
