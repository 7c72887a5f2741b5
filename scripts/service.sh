#!/usr/bin/env bash
# One mloc service in the foreground, for a supervisor (systemd, supervisord) or a terminal:
#
#   scripts/service.sh ENV_FILE code-server|daemon|webserver|metrics
#
# Reads ENV_FILE (deploy/postgres/mloc.env.example), writes $DAGSTER_HOME/workspace.yaml pointing
# at the code server, then execs the service from the checkout's venv, so the supervisor's signals
# reach it directly. SIGINT and SIGTERM are reset to their defaults first: a process started with
# `&` from a non-interactive shell inherits SIGINT *ignored*, and `dagster code-server start` then
# ignores both (Dagster maps SIGTERM to its SIGINT handler).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
env_file=${1:?usage: $0 ENV_FILE code-server|daemon|webserver|metrics}
service=${2:?usage: $0 ENV_FILE code-server|daemon|webserver|metrics}
[ -r "$env_file" ] || { echo "error: cannot read $env_file" >&2; exit 2; }
set -a
# shellcheck disable=SC1090
. "$env_file"
set +a
: "${DAGSTER_HOME:?DAGSTER_HOME is not set in $env_file}"
bin="$here/${VENV:-.venv}/bin"
code_host=${MLOC_CODE_SERVER_HOST:-127.0.0.1}
code_port=${MLOC_CODE_SERVER_PORT:-4266}
mkdir -p "$DAGSTER_HOME" "${PROMETHEUS_MULTIPROC_DIR:-$MLOC_HOME/metrics}"
workspace="$DAGSTER_HOME/workspace.yaml"
cat > "$workspace.tmp" <<YAML
load_from:
  - grpc_server:
      host: $code_host
      port: $code_port
      location_name: mloc_dagster
YAML
mv "$workspace.tmp" "$workspace"
cd "$DAGSTER_HOME"  # dagster warns about a dagster.yaml in any other working directory

case "$service" in
  code-server) cmd=("$bin/dagster" code-server start -m mloc_dagster.definitions -h "$code_host" -p "$code_port") ;;
  daemon)      cmd=("$bin/dagster-daemon" run -w "$workspace") ;;
  webserver)   cmd=("$bin/dagster-webserver" -w "$workspace" -h "${MLOC_WEBSERVER_HOST:-127.0.0.1}"
                    -p "${MLOC_WEBSERVER_PORT:-3000}") ;;
  metrics)     cmd=("$bin/mloc" metrics serve --port "${MLOC_METRICS_PORT:-9464}") ;;
  *) echo "error: unknown service $service (code-server, daemon, webserver, metrics)" >&2; exit 2 ;;
esac
exec "$bin/python" -c 'import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_DFL)
signal.signal(signal.SIGTERM, signal.SIG_DFL)
os.execv(sys.argv[1], sys.argv[1:])' "${cmd[@]}"
