"""Peft LoRA adapters on disk: what we accept from a node, how we read it, how we write one.

Adapters come from untrusted nodes, so loading is strict: only ``adapter_model.safetensors`` and
an ``adapter_config.json`` whose keys and feature flags we know; no pickles (``.bin``, ``.pt``,
``.pkl``...), no symlinks, finite tensors with shapes consistent with ``r``. A refused adapter
raises ``InvalidAdapter`` (``load_adapter``) or is reported as a ``Rejection`` (``load_adapters``);
nothing is ever deleted.

``save_adapter`` writes what peft's ``save_pretrained`` writes, atomically, and validates it like
any incoming adapter first, so ``PeftModel.from_pretrained(base, out_dir)`` loads it and we never
write what we would refuse. Combining adapters is ``core/merge.py``; screening them against a
trusted reference is ``core/screening.py``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mloc_dagster.core.publish import publish_dir

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "Adapter",
    "ClipEvent",
    "InvalidAdapter",
    "ModuleShapes",
    "Rejection",
    "adapter_sha256",
    "check_shapes",
    "delta_weights",
    "load_adapter",
    "load_adapters",
    "lora_scale",
    "save_adapter",
    "targeted",
    "validate_adapter_config",
]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# peft's save_pretrained also writes a model card; it is text and never loaded, so it may stay.
_IGNORED_FILES = frozenset({"README.md"})
_PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz"})
_KEY_RE = re.compile(r"^base_model\.model\.(?P<module>[A-Za-z0-9_.]+)\.lora_(?P<which>[AB])\.weight$")
_FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


class InvalidAdapter(ValueError):
    """An adapter we refuse to load or merge; ``reason`` says what to fix."""

    def __init__(self, path: str | os.PathLike[str] | None, reason: str) -> None:
        self.path = str(path) if path is not None else "<in memory>"
        self.reason = reason
        super().__init__(f"invalid adapter {self.path}: {reason}")


# --------------------------------------------------------------------------------------------
# adapter_config.json

_REQUIRED_KEYS = ("peft_type", "r", "lora_alpha", "target_modules")
_NONE = type(None)
# Each of these, switched on, changes what the tensors mean (DoRA magnitudes, trained biases,
# PiSSA/OLoRA-modified base weights, per-module ranks, transposed layouts...) or ships non-LoRA
# weights. We merge plain LoRA only, so they must hold their "off" value.
_MUST_BE_OFF: Mapping[str, tuple[Any, ...]] = {
    "use_dora": (False, None),
    "use_qalora": (False, None),
    "use_bdlora": (False, None),
    "lora_bias": (False, None),
    "bias": ("none",),
    "fan_in_fan_out": (False, None),
    "init_lora_weights": (True, False, "gaussian"),
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
    "modules_to_save": (None, []),
    "trainable_token_indices": (None,),
    "target_parameters": (None, []),
    "layer_replication": (None,),
    "alora_invocation_tokens": (None,),
    "megatron_config": (None,),
    "loftq_config": ({}, None),
    "eva_config": (None,),
    "corda_config": (None,),
    "arrow_config": (None,),
    "kasa_config": (None,),
    "lora_ga_config": (None,),
    "monteclora_config": (None,),
    "velora_config": (None,),
    "runtime_config": (None, {}),
}
# Informational or load-time keys: type-checked, value free.
_FREE_KEYS: Mapping[str, tuple[type, ...]] = {
    "base_model_name_or_path": (str, _NONE),
    "revision": (str, _NONE),
    "task_type": (str, _NONE),
    "inference_mode": (bool,),
    "lora_dropout": (int, float),
    "peft_version": (str,),
    "auto_mapping": (dict, _NONE),
    "layers_to_transform": (int, list, _NONE),
    "layers_pattern": (str, list, _NONE),
    "exclude_modules": (str, list, _NONE),
    "megatron_core": (str, _NONE),
    "qalora_group_size": (int,),
    "ensure_weight_tying": (bool,),
    "use_rslora": (bool,),
}
ALLOWED_CONFIG_KEYS = frozenset(_REQUIRED_KEYS) | frozenset(_MUST_BE_OFF) | frozenset(_FREE_KEYS)


def _same_value(value: Any, allowed: Any) -> bool:
    # Strict: 0 must not pass for False, nor 1 for True.
    return type(value) is type(allowed) and value == allowed


def validate_adapter_config(config: Any, path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Return a copy of ``config`` if it describes a plain LoRA adapter we can merge."""
    if not isinstance(config, dict):
        raise InvalidAdapter(path, f"{ADAPTER_CONFIG} must hold a JSON object")
    unknown = sorted(set(config) - ALLOWED_CONFIG_KEYS)
    if unknown:
        raise InvalidAdapter(path, f"unknown {ADAPTER_CONFIG} keys {unknown} (only reviewed peft LoRA keys are accepted)")
    missing = [k for k in _REQUIRED_KEYS if k not in config]
    if missing:
        raise InvalidAdapter(path, f"{ADAPTER_CONFIG} lacks {missing}")
    if config["peft_type"] != "LORA":
        raise InvalidAdapter(path, f"peft_type is {config['peft_type']!r}, only 'LORA' is merged")
    r = config["r"]
    if type(r) is not int or r < 1:
        raise InvalidAdapter(path, f"r must be a positive integer, got {r!r}")
    alpha = config["lora_alpha"]
    if type(alpha) not in (int, float) or not math.isfinite(alpha) or alpha <= 0:
        raise InvalidAdapter(path, f"lora_alpha must be a positive number, got {alpha!r}")
    targets = config["target_modules"]
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as exc:
            raise InvalidAdapter(path, f"target_modules regex does not compile: {exc}") from exc
    elif not (isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets)):
        raise InvalidAdapter(path, f"target_modules must be a non-empty list of names or a regex, got {targets!r}")
    for key, allowed in _MUST_BE_OFF.items():
        if key in config and not any(_same_value(config[key], a) for a in allowed):
            raise InvalidAdapter(path, f"{key}={config[key]!r} is not supported (allowed: {list(allowed)})")
    for key, types in _FREE_KEYS.items():
        if key in config and type(config[key]) not in types:
            raise InvalidAdapter(path, f"{key} has type {type(config[key]).__name__}, expected {types}")
    dropout = config.get("lora_dropout", 0.0)
    if not 0.0 <= dropout < 1.0:
        raise InvalidAdapter(path, f"lora_dropout must be within [0, 1), got {dropout}")
    return json.loads(json.dumps(config))  # deep copy, JSON-clean


def lora_scale(config: Mapping[str, Any]) -> float:
    """peft's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    r = config["r"]
    return float(config["lora_alpha"]) / (math.sqrt(r) if config.get("use_rslora") else r)


def targeted(module: str, targets: str | list[str]) -> bool:
    # The rule peft uses to decide whether a module gets a LoRA layer.
    if isinstance(targets, str):
        return targets == "all-linear" or re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets)


# --------------------------------------------------------------------------------------------
# Adapters


class _LoraWeights(Protocol):
    lora_a: dict[str, torch.Tensor]
    lora_b: dict[str, torch.Tensor]
    config: dict[str, Any]

    def delta(self, module: str, dtype: torch.dtype = ...) -> torch.Tensor: ...


ModuleShapes = Mapping[str, tuple[int, int]]  # module path -> (out_features, in_features)


@dataclass(frozen=True, eq=False)
class Adapter:
    """A validated LoRA adapter: per module, A (r × in) and B (out × r)."""

    lora_a: dict[str, torch.Tensor]
    lora_b: dict[str, torch.Tensor]
    config: dict[str, Any]
    path: Path | None = None
    sha256: str | None = None  # of adapter_model.safetensors, as stored with the job
    label: str | None = None  # how reports name it; defaults to the path

    @property
    def source(self) -> str:
        return self.label or (str(self.path) if self.path is not None else "<in memory>")

    @property
    def r(self) -> int:
        return int(self.config["r"])

    @property
    def scale(self) -> float:
        return lora_scale(self.config)

    @property
    def modules(self) -> list[str]:
        return sorted(self.lora_a)

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        return {m: (int(self.lora_b[m].shape[0]), int(self.lora_a[m].shape[1])) for m in self.modules}

    def delta(self, module: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """ΔW = scale · B · A for one module."""
        return self.scale * (self.lora_b[module].to(dtype) @ self.lora_a[module].to(dtype))


def delta_weights(adapter: _LoraWeights, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The full update ΔW = scale · B · A of every module (computed in float64) of an adapter or a merge."""
    return {m: adapter.delta(m).to(dtype) for m in sorted(adapter.lora_a)}


def adapter_sha256(adapter_dir: str | os.PathLike[str]) -> str:
    """sha256 of the adapter's weights file: the adapter's identity in the state store."""
    digest = hashlib.sha256()
    with open(Path(adapter_dir) / ADAPTER_WEIGHTS, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_tensors(
    lora_a: Mapping[str, torch.Tensor],
    lora_b: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    path: str | os.PathLike[str] | None,
    reference: ModuleShapes | None,
) -> None:
    r = config["r"]
    if not lora_a:
        raise InvalidAdapter(path, "no LoRA tensors")
    if set(lora_a) != set(lora_b):
        odd = sorted(set(lora_a) ^ set(lora_b))
        raise InvalidAdapter(path, f"modules without both lora_A and lora_B: {odd}")
    for module in sorted(lora_a):
        a, b = lora_a[module], lora_b[module]
        if not targeted(module, config["target_modules"]):
            raise InvalidAdapter(path, f"module {module} is not matched by target_modules {config['target_modules']!r}")
        for name, t in (("lora_A", a), ("lora_B", b)):
            if t.dtype not in _FLOAT_DTYPES:
                raise InvalidAdapter(path, f"{module}.{name} has dtype {t.dtype}, expected a float type")
            if t.ndim != 2:
                raise InvalidAdapter(path, f"{module}.{name} has {t.ndim} dimensions; only linear layers are merged")
            if not bool(torch.isfinite(t).all()):
                raise InvalidAdapter(path, f"{module}.{name} contains NaN or infinite values")
        if a.shape[0] != r or b.shape[1] != r:
            raise InvalidAdapter(
                path, f"{module}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not match r={r}"
            )
    if reference is not None:
        shapes = {m: (int(lora_b[m].shape[0]), int(lora_a[m].shape[1])) for m in lora_a}
        check_shapes(shapes, reference, path)


def check_shapes(shapes: ModuleShapes, reference: ModuleShapes, path: str | os.PathLike[str] | None) -> None:
    missing, extra = sorted(set(reference) - set(shapes)), sorted(set(shapes) - set(reference))
    if missing or extra:
        raise InvalidAdapter(path, f"target modules differ from the expected ones: missing {missing}, unexpected {extra}")
    wrong = {m: (shapes[m], tuple(reference[m])) for m in shapes if tuple(shapes[m]) != tuple(reference[m])}
    if wrong:
        detail = ", ".join(f"{m}: {got} (expected {exp})" for m, (got, exp) in sorted(wrong.items()))
        raise InvalidAdapter(path, f"ΔW shapes (out, in) differ from the expected ones: {detail}")


def load_adapter(
    adapter_dir: str | os.PathLike[str],
    *,
    reference: ModuleShapes | None = None,
    label: str | None = None,
) -> Adapter:
    """Load and validate a peft LoRA adapter directory; raise ``InvalidAdapter`` if refused.

    ``reference`` ({module: (out_features, in_features)}, e.g. from the base model) additionally
    requires exactly these modules with these shapes.
    """
    root = Path(adapter_dir)
    if not root.is_dir():
        raise InvalidAdapter(root, "not a directory")
    entries = sorted(root.iterdir())
    for entry in entries:
        if entry.is_symlink():
            raise InvalidAdapter(root, f"{entry.name} is a symlink; adapters must be plain files")
        if entry.suffix.lower() in _PICKLE_SUFFIXES:
            raise InvalidAdapter(root, f"{entry.name}: pickle-based files are refused, ship {ADAPTER_WEIGHTS} only")
        if entry.is_dir():
            raise InvalidAdapter(root, f"unexpected directory {entry.name}/")
        if entry.name not in (ADAPTER_WEIGHTS, ADAPTER_CONFIG) and entry.name not in _IGNORED_FILES:
            raise InvalidAdapter(root, f"unexpected file {entry.name}: only {ADAPTER_WEIGHTS} and {ADAPTER_CONFIG}")
    for needed in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        if not (root / needed).is_file():
            raise InvalidAdapter(root, f"missing {needed}")

    try:
        raw_config = json.loads((root / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidAdapter(root, f"{ADAPTER_CONFIG} is not valid JSON: {exc}") from exc
    config = validate_adapter_config(raw_config, root)

    lora_a: dict[str, torch.Tensor] = {}
    lora_b: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(root / ADAPTER_WEIGHTS), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open handles have keys(), not iteration
                match = _KEY_RE.match(key)
                if match is None:
                    raise InvalidAdapter(root, f"unexpected tensor {key!r}: only base_model.model.<module>.lora_A/B.weight")
                target = lora_a if match["which"] == "A" else lora_b
                target[match["module"]] = f.get_tensor(key)
    except SafetensorError as exc:
        raise InvalidAdapter(root, f"{ADAPTER_WEIGHTS} is not a valid safetensors file: {exc}") from exc
    _check_tensors(lora_a, lora_b, config, root, reference)
    return Adapter(lora_a, lora_b, config, path=root, sha256=adapter_sha256(root), label=label)


@dataclass(frozen=True)
class Rejection:
    source: str
    reason: str


@dataclass(frozen=True)
class ClipEvent:
    source: str
    module: str
    norm: float
    bound: float


def load_adapters(
    adapter_dirs: Iterable[str | os.PathLike[str]], *, reference: ModuleShapes | None = None
) -> tuple[list[Adapter], list[Rejection]]:
    """Load many adapters; a refused one is reported, not fatal (one bad node must not block)."""
    loaded: list[Adapter] = []
    rejected: list[Rejection] = []
    for d in adapter_dirs:
        try:
            loaded.append(load_adapter(d, reference=reference))
        except InvalidAdapter as exc:
            rejected.append(Rejection(exc.path, exc.reason))
    return loaded, rejected


# --------------------------------------------------------------------------------------------
# Saving


def save_adapter(
    adapter: _LoraWeights,
    out_dir: str | os.PathLike[str],
    config: Mapping[str, Any] | None = None,
    *,
    overwrite: bool = False,
) -> str:
    """Write a peft-loadable adapter directory atomically; return its sha256 (``adapter_sha256``).

    ``config`` entries override the adapter's own config (e.g. ``base_model_name_or_path``); the
    result is validated like any incoming adapter, so we never write what we would refuse.
    """
    out = Path(out_dir)
    final_config = validate_adapter_config({**adapter.config, **(config or {})}, out)
    _check_tensors(adapter.lora_a, adapter.lora_b, final_config, out, None)
    tensors: dict[str, torch.Tensor] = {}
    for module in sorted(adapter.lora_a):
        tensors[f"base_model.model.{module}.lora_A.weight"] = adapter.lora_a[module].detach().contiguous().cpu()
        tensors[f"base_model.model.{module}.lora_B.weight"] = adapter.lora_b[module].detach().contiguous().cpu()

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        with open(tmp / ADAPTER_CONFIG, "w", encoding="utf-8") as f:
            json.dump(final_config, f, indent=2, sort_keys=True)

    # core/publish.py: readers never see a half-written adapter; a taken name is refused.
    publish_dir(out, write, replace=overwrite)
    return adapter_sha256(out)
