"""Reading a gate's settings: the per-dialect files in $MLOC_HOME (``gates.json`` for the ASR
gate, ``tts_gate.json`` for the TTS stop-loss) under the run config's overrides. A malformed
file, entry or value is a ``GateConfigError`` naming the file (or run config) and the key; the
gate assets turn it into failed gate checks with that reason (``assets/candidates/gate.py``)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mloc_dagster.core.gates.gate import GateConfigError, GateThresholds


def dialect_settings(path: Path, dialect: str) -> dict[str, Any]:
    """The dialect's entry of a settings file (``{"<dialect>": {"<setting>": value}}``); {} when
    there is no file or no entry."""
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GateConfigError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise GateConfigError(f'{path}: expected an object {{"<dialect>": {{"<setting>": value}}}}, got {raw!r}'[:500])
    entry = raw.get(dialect, {})
    if not isinstance(entry, dict):
        raise GateConfigError(f"{path}: key {dialect!r}: expected an object of settings, got {entry!r}"[:500])
    return entry


def load_thresholds(path: Path, dialect: str, defaults: Mapping[str, Any],
                    overrides: Mapping[str, Any]) -> GateThresholds:
    """The dialect's ASR gate thresholds: ``overrides`` (run config) over the file over ``defaults``."""
    from_file = dialect_settings(path, dialect)
    try:
        GateThresholds.from_mapping(from_file)
    except GateConfigError as exc:
        raise GateConfigError(f"{path}: key {dialect!r}: {exc}") from exc
    try:
        return GateThresholds.from_mapping({**defaults, **from_file, **overrides})
    except GateConfigError as exc:
        raise GateConfigError(f"gate run config for {dialect}: {exc}") from exc
