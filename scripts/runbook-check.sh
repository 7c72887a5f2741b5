#!/usr/bin/env bash
# The runbook's checks (docs/operations.md), against services that are running:
#
#   scripts/runbook-check.sh ENV_FILE [--e2e]
#
# 1. Dagster's storages are the ones the instance file names (Postgres when DAGSTER_PG_HOST is set).
# 2. mloc's own database (MLOC_DATABASE_URL) answers, is the expected kind, and has its tables.
# 3. The webserver answers on MLOC_WEBSERVER_HOST:PORT, and says so when it listens beyond loopback.
# 4. With --e2e: a 24-utterance batch of a throw-away dialect goes incoming → sensor → queue →
#    ingest_job → dataset_version materialization (needs the daemon and the code server).
# Prints one line per check; exits 1 if any failed.
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
env_file=${1:?usage: $0 ENV_FILE [--e2e]}
e2e=${2:-}
[ -r "$env_file" ] || { echo "error: cannot read $env_file" >&2; exit 2; }
set -a
# shellcheck disable=SC1090
. "$env_file"
set +a
bin="$here/${VENV:-.venv}/bin"
cd "${DAGSTER_HOME:?DAGSTER_HOME is not set in $env_file}" || exit 2
failed=0
ok() { echo "PASS  $*"; }
ko() { echo "FAIL  $*"; failed=1; }

info=$("$bin/dagster" instance info 2>&1)
storages=$(grep -E "^ *(run|event_log|schedule)_storage:" -A1 <<<"$info" | grep -oE "[A-Za-z]+Storage" | sort -u | tr '\n' ' ')
if [ -n "${DAGSTER_PG_HOST:-}" ]; then
  [ "$(grep -o Postgres <<<"$storages" | wc -l)" -ge 3 ] && ok "Dagster storage on Postgres: $storages" \
    || ko "Dagster storage is not Postgres ($storages): is $DAGSTER_HOME/dagster.yaml deploy/postgres/dagster.yaml?"
else
  [ -n "$storages" ] && ok "Dagster storage: $storages" || ko "dagster instance info failed: ${info:0:300}"
fi

"$bin/python" - <<'PY' && ok "mloc database answers with its tables" || ko "mloc database (MLOC_DATABASE_URL)"
import os, sqlalchemy as sa
from mloc_dagster.core.state import StateStore
from mloc_dagster.core.state.engine import resolve_state_url
url = resolve_state_url()
store = StateStore(url)
engine = sa.create_engine(url)
tables = set(sa.inspect(engine).get_table_names())
want_pg = bool(os.environ.get("DAGSTER_PG_HOST"))
assert (engine.dialect.name == "postgresql") == want_pg, f"{engine.dialect.name} database, expected Postgres: {want_pg}"
missing = {"training_runs", "training_jobs", "candidates", "promotions"} - tables
assert not missing, f"missing tables {missing}"
print(f"      {engine.url.render_as_string(hide_password=True)}: {len(store.list_runs(limit=None))} training runs, "
      f"{len(tables)} tables")
PY

host=${MLOC_WEBSERVER_HOST:-127.0.0.1}; port=${MLOC_WEBSERVER_PORT:-3000}
probe=$host; [ "$probe" = 0.0.0.0 ] && probe=127.0.0.1
if "$bin/python" -c "import urllib.request; urllib.request.urlopen('http://$probe:$port/server_info', timeout=10)" 2>/dev/null; then
  ok "webserver answers on $host:$port"
  case "$host" in 127.*|localhost|::1) ;; *) echo "WARN  the UI listens on $host: it has no authentication (put a proxy in front)";; esac
else
  ko "webserver does not answer on $probe:$port (scripts/service.sh ENV_FILE webserver)"
fi

if [ "$e2e" = --e2e ]; then
  dialect=runbook-check; batch=check-$(date +%s)
  "$bin/mloc" corpus synth --dialects en-gb-scotland --utterances 24 --batch-id "$batch" \
      --out "$MLOC_HOME/incoming-check" >/dev/null &&
    mkdir -p "$MLOC_HOME/incoming/$dialect" &&
    mv "$MLOC_HOME/incoming-check/en-gb-scotland/$batch" "$MLOC_HOME/incoming/$dialect/$batch" &&
    rm -rf "$MLOC_HOME/incoming-check"
  "$bin/python" - "$dialect" <<'PY' && ok "incoming batch → ingest_job → dataset_version[$dialect]" || ko "end to end ingest"
import sys, time
import dagster as dg
dialect = sys.argv[1]
key = dg.AssetKey("dataset_version")
with dg.DagsterInstance.get() as instance:
    before = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=key, asset_partitions=[dialect]), limit=1)
    since = before.records[0].timestamp if before.records else 0.0
    deadline = time.time() + 300
    while time.time() < deadline:  # the sensor ticks every 30 s, then the queue and the run itself
        found = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=key, asset_partitions=[dialect]), limit=1)
        if found.records and found.records[0].timestamp > since:
            rows = found.records[0].asset_materialization.metadata["rows"].value
            print(f"      {rows} rows in run {found.records[0].run_id}")
            sys.exit(0)
        time.sleep(5)
    sys.exit("no new materialization within 300 s: are the daemon and the code server running?")
PY
fi
exit $failed
