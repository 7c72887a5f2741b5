#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian machine with Python 3.11: system packages, venv, torch (CPU
# wheel that lies on disk), then the pinned project. Safe to run again; it skips what is present.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

need_apt=()
command -v espeak-ng >/dev/null 2>&1 || need_apt+=(espeak-ng)
# The browser tests (tests/ui) drive Debian's chromium through playwright: no browser download.
# Only the tests need it (and Postgres): `make test` asks for both, `make demo` for neither.
if [ "${MLOC_WITH_BROWSER:-0}" = 1 ] && ! command -v chromium >/dev/null 2>&1; then
  need_apt+=(chromium)
fi
if [ "${MLOC_WITH_POSTGRES:-0}" = 1 ] && ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then
  need_apt+=(postgresql)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "[setup] apt-get install ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.mloc-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  "$VENV/bin/pip" install -q --disable-pip-version-check --upgrade pip
  # torch first, exactly this version: it is the CPU wheel on this disk; anything else downloads CUDA.
  # --no-compile: byte-compiling every installed file is half of pip's time (112 s → 52 s); the
  # import below compiles what the line loads (~4,000 of ~20,000 files) and writes their .pyc.
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-compile torch==2.13.0
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-compile -e ".[dev]"
  env -u PYTHONDONTWRITEBYTECODE "$VENV/bin/python" -c \
    "import mloc_dagster.definitions, mloc_dagster.cli.main, mloc_dagster.cli.demo, mloc_dagster.execution.launcher, mloc_dagster.core.training.asr, mloc_dagster.core.models.pretrain, mloc_dagster.core.tts.pretrain, dagster._cli, dagster._daemon, pytest"
  touch "$stamp"
fi
echo "[setup] ok: $("$VENV/bin/python" -c 'import dagster, torch; print("dagster", dagster.__version__, "torch", torch.__version__)')"
