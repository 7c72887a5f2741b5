#!/usr/bin/env bash
# The test suite, on its own temporary MLOC_HOME/DAGSTER_HOME (tests make their own).
set -euo pipefail
cd "$(dirname "$0")/.."
MLOC_WITH_POSTGRES=1 MLOC_WITH_BROWSER=1 bash scripts/setup.sh
unset DAGSTER_HOME MLOC_HOME MLOC_DATABASE_URL
export MLOC_REQUIRE_POSTGRES=1
# Test files run in parallel (pytest-xdist), a file's tests on one worker so its module fixtures are
# built once: most of the suite waits on daemons, sensors and subprocesses (one process used ~0.6 of
# the 2 cores). MLOC_TEST_WORKERS=0 runs everything in this process.
exec .venv/bin/python -m pytest -q -p no:cacheprovider --timeout=900 -n "${MLOC_TEST_WORKERS:-3}" --dist loadfile "$@"
