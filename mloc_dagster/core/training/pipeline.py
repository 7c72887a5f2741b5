"""Pipelines: a declared sequence of stages (run kind ``pipeline``), parsed and checked. No Dagster.

A spec is a small JSON or YAML document::

    stages:
      - {name: base, kind: base_model, config: {max_steps: 2000}}
      - {name: adapt, kind: training_run, after: [base], dialect: en-gb-scotland, jobs: 6,
         timebox_s: 3600, hparams: {lr: 0.003}}
      - {name: candidate, kind: candidate, after: [adapt]}

Stage kinds: ``base_model`` (materialize the base model: pre-train, or register ``checkpoint_dir``;
``config`` is ``base_model``'s), ``training_run`` (a single run of ``jobs`` timeboxed jobs on
``dialect``, pinned to the base model its upstream ``base_model`` stage produced, else the
latest), ``candidate`` (merge, gate and promote the adapter of its upstream ``training_run``).
``after`` names the stages a stage waits for (default: the stage before it). A stage starts when
all of them succeeded; a failed stage stops the pipeline with the reason.

Bad input is a ``PipelineSpecError`` naming the stage and field, raised before anything starts:
not a mapping with a non-empty ``stages`` list, a duplicate or malformed name, an unknown kind or
field, a field of the wrong type or out of range (``jobs`` and ``timebox_s`` integers >= 1,
``candidate_every`` within 1..12, ``hparams`` and ``config`` mappings), ``after`` naming an
unknown stage, a cycle, a ``candidate`` without exactly one upstream ``training_run``, a
``training_run`` without a dialect. What only the Dagster layer knows (dialect keys, hparams, a
stage's run config) is checked there too, before anything starts (``sensors/pipeline.py``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

STAGE_KINDS = ("base_model", "training_run", "candidate")
_FIELDS = {
    "base_model": {"name", "kind", "after", "config"},
    "training_run": {"name", "kind", "after", "dialect", "jobs", "timebox_s", "hparams", "candidate_every"},
    "candidate": {"name", "kind", "after", "config"},
}
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")


def _int_within(low: int, high: int | None = None):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low and (high is None or v <= high)


# What each field must hold: a spec that passes here cannot stop the pipeline (or the sensor) later.
_VALUES = {
    "dialect": ("a dialect key (a string)", lambda v: isinstance(v, str)),
    "jobs": ("an integer >= 1", _int_within(1)),
    "timebox_s": ("an integer number of seconds >= 1", _int_within(1)),
    "candidate_every": ("an integer within 1..12", _int_within(1, 12)),
    "hparams": ("a mapping of hparam: value", lambda v: isinstance(v, dict)),
    "config": ("a mapping (the stage's run config)", lambda v: isinstance(v, dict)),
}


class PipelineSpecError(ValueError):
    """A pipeline spec the user must fix; the message names the stage and the field."""


@dataclass(frozen=True)
class Stage:
    name: str
    kind: str
    after: tuple[str, ...]
    fields: dict[str, Any] = field(default_factory=dict)  # the kind's own fields (dialect, jobs, config...)


def load_spec(source: str | Path | dict) -> list[Stage]:
    """The stages of a spec (a dict, JSON/YAML text, or a file), in an order where every stage
    comes after the stages it waits for."""
    raw = source
    if isinstance(source, Path) or (isinstance(source, str) and "\n" not in source and Path(source).is_file()):
        raw = Path(source).read_text()
    if isinstance(raw, str):
        try:
            raw = yaml.safe_load(raw)  # YAML is a superset of JSON
        except yaml.YAMLError as exc:
            raise PipelineSpecError(f"pipeline spec is neither JSON nor YAML: {exc}") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("stages"), list) or not raw["stages"]:
        raise PipelineSpecError('a pipeline spec is a mapping with a non-empty "stages" list')
    stages, previous = [], None
    for i, item in enumerate(raw["stages"]):
        stage = _stage(i, item, previous)
        if stage.name in {s.name for s in stages}:
            raise PipelineSpecError(f"stage {i}: name {stage.name!r} is used twice")
        stages.append(stage)
        previous = stage.name
    return _checked(stages)


def _stage(i: int, item: Any, previous: str | None) -> Stage:
    if not isinstance(item, dict):
        raise PipelineSpecError(f"stage {i}: expected a mapping with name and kind, got {item!r}")
    name, kind = item.get("name"), item.get("kind")
    if not isinstance(name, str) or not _NAME.match(name):
        raise PipelineSpecError(f"stage {i}: name must be lowercase [a-z0-9-] (≤ 32 chars), got {name!r}")
    if kind not in STAGE_KINDS:
        raise PipelineSpecError(f"stage {name}: kind must be one of {', '.join(STAGE_KINDS)}, got {kind!r}")
    unknown = sorted(set(item) - _FIELDS[kind])
    if unknown:
        raise PipelineSpecError(f"stage {name}: unknown field(s) {', '.join(unknown)} for kind {kind}; "
                                f"allowed: {', '.join(sorted(_FIELDS[kind]))}")
    after = item.get("after", [previous] if previous else [])
    if isinstance(after, str):
        after = [after]
    if not isinstance(after, list) or not all(isinstance(a, str) for a in after):
        raise PipelineSpecError(f"stage {name}: after must be a list of stage names, got {after!r}")
    if kind == "training_run" and "dialect" not in item:
        raise PipelineSpecError(f"stage {name}: a training_run needs a dialect")
    for key, value in item.items():
        if key in _VALUES and not _VALUES[key][1](value):
            raise PipelineSpecError(f"stage {name}: {key} must be {_VALUES[key][0]}, got {value!r}")
    return Stage(name, kind, tuple(after), {k: v for k, v in item.items() if k not in ("name", "kind", "after")})


def _checked(stages: list[Stage]) -> list[Stage]:
    by_name = {s.name: s for s in stages}
    for s in stages:
        for a in s.after:
            if a not in by_name:
                raise PipelineSpecError(f"stage {s.name}: after names an unknown stage {a!r}")
        if s.kind == "candidate":
            runs = [a for a in s.after if by_name[a].kind == "training_run"]
            if len(runs) != 1:
                raise PipelineSpecError(f"stage {s.name}: a candidate needs exactly one training_run in after, "
                                        f"got {runs or 'none'}")
    ordered: list[Stage] = []
    state: dict[str, str] = {}

    def visit(s: Stage, path: list[str]) -> None:
        if state.get(s.name) == "done":
            return
        if state.get(s.name) == "visiting":
            raise PipelineSpecError(f"the stages form a cycle: {' -> '.join([*path, s.name])}")
        state[s.name] = "visiting"
        for a in s.after:
            visit(by_name[a], [*path, s.name])
        state[s.name] = "done"
        ordered.append(s)

    for s in stages:
        visit(s, [])
    return ordered


def upstream(stages: list[Stage], stage: Stage, kind: str) -> Stage | None:
    """The nearest stage of ``kind`` that ``stage`` waits for, directly or through others."""
    by_name = {s.name: s for s in stages}
    todo = list(stage.after)
    while todo:
        s = by_name[todo.pop(0)]
        if s.kind == kind:
            return s
        todo += list(s.after)
    return None


def spec_json(stages: list[Stage]) -> dict:
    """The spec as stored with the pipeline's run (what ``load_spec`` reads back)."""
    return json.loads(json.dumps({"stages": [{"name": s.name, "kind": s.kind, "after": list(s.after), **s.fields}
                                             for s in stages]}))
