"""Refuse unsafe or broken training checkpoints before anything reads them.

A checkpoint may come from another node, so nothing in it is trusted: ``validate_checkpoint_dir``
reads only JSON and safetensors headers/tensors (neither executes code) and refuses, with a typed
error that says what to fix:

- ``UnsafeCheckpoint``: a pickle-based or code file (``.bin .pt .pth .pkl .pickle .ckpt .py .pyc
  .so``, or any file whose first bytes are a pickle stream or a zip archive as written by
  ``torch.save``), a symlink, an ``adapter_config.json`` key outside the allowed set, or a value
  that makes peft import code (``auto_mapping`` naming a foreign library, ``megatron_core``);
- ``InvalidAdapter``: missing files, tensors that are not LoRA A/B pairs, non-finite values,
  ranks that disagree with the config, target modules or shapes that do not match the base model,
  a train state that does not parse.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
TRAIN_STATE_TENSORS = "train_state.safetensors"
TRAIN_STATE_JSON = "train_state.json"
RESULT_JSON = "result.json"

FORBIDDEN_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".py", ".pyc", ".so")
SAFE_AUTO_MAPPING_LIBRARIES = ("mloc_dagster.core.model",)
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>[A-Za-z0-9_.]+)\.lora_(?P<ab>[AB])\.weight$")
_MODULE_NAME = re.compile(r"^[A-Za-z0-9_.]+$")


class CheckpointError(ValueError):
    """Base class: the checkpoint at ``path`` cannot be used."""

    def __init__(self, path: str | Path, problem: str):
        self.path, self.problem = str(path), problem
        super().__init__(f"{path}: {problem}")


class UnsafeCheckpoint(CheckpointError):
    """The checkpoint contains something that could execute code when loaded."""


class InvalidAdapter(CheckpointError):
    """The checkpoint is well-formed data but not a usable adapter for this base model."""


# --------------------------------------------------------------------------- adapter_config.json rules


def _neutral(v: Any) -> bool:
    return v in (None, False, [], {}, "")


def _is(*allowed: Any) -> Callable[[Any], bool]:
    return lambda v: v in allowed


def _bool(v: Any) -> bool:
    return isinstance(v, bool)


def _opt_str(v: Any) -> bool:
    return v is None or isinstance(v, str)


def _pos_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 4096


def _number(lo: float, hi: float) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and lo <= v <= hi


def _module_list(v: Any) -> bool:
    return (isinstance(v, list) and len(v) > 0
            and all(isinstance(s, str) and _MODULE_NAME.match(s) for s in v))


def _auto_mapping(v: Any) -> bool:
    if v is None:
        return True
    if not isinstance(v, dict) or set(v) - {"base_model_class", "parent_library"}:
        return False
    lib = v.get("parent_library", "")
    return isinstance(lib, str) and (lib in SAFE_AUTO_MAPPING_LIBRARIES or lib.startswith("transformers.models."))


# Every key peft's LoraConfig writes, with the values we accept. Keys not listed are refused.
ALLOWED_ADAPTER_CONFIG: dict[str, Callable[[Any], bool]] = {
    "peft_type": _is("LORA"),
    "r": _pos_int,
    "lora_alpha": _number(1e-6, 1e6),
    "target_modules": _module_list,
    "lora_dropout": _number(0.0, 1.0),
    "bias": _is("none"),
    "fan_in_fan_out": _is(False),
    "use_rslora": _bool,
    "use_dora": _is(False),
    "init_lora_weights": _bool,
    "inference_mode": _bool,
    "task_type": lambda v: v is None or v in ("FEATURE_EXTRACTION", "SEQ_CLS", "TOKEN_CLS"),
    "base_model_name_or_path": _opt_str,
    "revision": _opt_str,
    "peft_version": _opt_str,
    "auto_mapping": _auto_mapping,
    "megatron_core": _is(None, "megatron.core"),
    "qalora_group_size": lambda v: isinstance(v, int),
    "use_qalora": _is(False),
    "use_bdlora": _is(None, False),
    "ensure_weight_tying": _is(False),
    "lora_bias": _is(False),
    "runtime_config": lambda v: v is None or v == {"ephemeral_gpu_offload": False},
    **{k: _neutral for k in (
        "modules_to_save", "rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern",
        "exclude_modules", "megatron_config", "loftq_config", "eva_config", "corda_config",
        "layer_replication", "target_parameters", "trainable_token_indices", "arrow_config",
        "alora_invocation_tokens", "kasa_config", "lora_ga_config", "monteclora_config", "velora_config")},
}
REQUIRED_ADAPTER_CONFIG = ("peft_type", "r", "lora_alpha", "target_modules")


@dataclass
class CheckpointInfo:
    path: Path
    r: int
    lora_alpha: float
    use_rslora: bool
    target_modules: list[str]
    modules: dict[str, tuple[int, int]] = field(default_factory=dict)  # module -> (in, out)
    has_train_state: bool = False

    @property
    def scale(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def _matches(name: str, target: str) -> bool:
    """peft's rule for a list of target modules: exact name or a ``.``-separated suffix."""
    return name == target or name.endswith("." + target)


def _scan_files(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            rel = p.relative_to(root)
            if p.is_symlink():
                raise UnsafeCheckpoint(root, f"{rel} is a symlink; checkpoints must contain plain files only")
            if name.lower().endswith(FORBIDDEN_SUFFIXES):
                raise UnsafeCheckpoint(root, f"{rel} is a pickle/code file ({Path(name).suffix}); only "
                                             "safetensors + JSON are accepted — re-save with safetensors")
        for name in filenames:
            p = Path(dirpath, name)
            with open(p, "rb") as f:
                head = f.read(9)
            if name.endswith(".safetensors") and len(head) == 9 and head[8:9] == b"{":
                continue  # a safetensors header (its length prefix can look like a pickle opcode)
            if head[:1] == b"\x80" and len(head) > 1 and 1 <= head[1] <= 5:
                raise UnsafeCheckpoint(root, f"{p.relative_to(root)} is a pickle stream; only safetensors + JSON "
                                             "are accepted")
            if head[:4] == b"PK\x03\x04":
                raise UnsafeCheckpoint(root, f"{p.relative_to(root)} is a zip archive (torch.save format); only "
                                             "safetensors + JSON are accepted")


def _read_config(root: Path) -> dict:
    path = root / ADAPTER_CONFIG
    if not path.is_file():
        raise InvalidAdapter(root, f"missing {ADAPTER_CONFIG}")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidAdapter(root, f"{ADAPTER_CONFIG} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise InvalidAdapter(root, f"{ADAPTER_CONFIG} must be a JSON object")
    unknown = sorted(set(config) - set(ALLOWED_ADAPTER_CONFIG))
    if unknown:
        raise UnsafeCheckpoint(root, f"{ADAPTER_CONFIG} has keys outside the allowed set: {unknown}")
    missing = [k for k in REQUIRED_ADAPTER_CONFIG if k not in config]
    if missing:
        raise InvalidAdapter(root, f"{ADAPTER_CONFIG} lacks {missing}")
    for key, ok in ALLOWED_ADAPTER_CONFIG.items():
        if key in config and not ok(config[key]):
            error = UnsafeCheckpoint if key in ("auto_mapping", "megatron_core", "megatron_config") else InvalidAdapter
            raise error(root, f"{ADAPTER_CONFIG}: {key}={config[key]!r} is not accepted")
    return config


def _check_tensors_finite(root: Path, filename: str) -> dict[str, tuple]:
    shapes = {}
    try:
        with safe_open(str(root / filename), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                t = f.get_tensor(key)
                shapes[key] = (tuple(t.shape), t.dtype)
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise InvalidAdapter(root, f"{filename}: tensor {key} has non-finite values (NaN/Inf)")
    except InvalidAdapter:
        raise
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise InvalidAdapter(root, f"{filename} is not a readable safetensors file: {exc}") from exc
    return shapes


def _base_linears(base_model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    if hasattr(base_model, "get_base_model"):  # a PeftModel: look through the LoRA wrappers
        base_model = base_model.get_base_model()
    out = {}
    for name, module in base_model.named_modules():
        module = getattr(module, "base_layer", module)
        if isinstance(module, torch.nn.Linear) and ".base_layer" not in name and ".lora_" not in name:
            out[name] = (module.in_features, module.out_features)
    return out


def validate_checkpoint_dir(path: str | Path, base_model: torch.nn.Module | str | Path | None = None) -> CheckpointInfo:
    """Validate an adapter / training checkpoint directory; raise ``UnsafeCheckpoint`` or
    ``InvalidAdapter``. With ``base_model`` (a module or a model directory) also check that every
    target module exists in it as a linear layer with matching shapes, and that the adapter covers
    every layer its target modules name."""
    root = Path(path)
    if root.is_symlink() or not root.is_dir():
        raise InvalidAdapter(root, "not a checkpoint directory")
    _scan_files(root)
    config = _read_config(root)
    r = config["r"]
    if not (root / ADAPTER_WEIGHTS).is_file():
        raise InvalidAdapter(root, f"missing {ADAPTER_WEIGHTS}")
    shapes = _check_tensors_finite(root, ADAPTER_WEIGHTS)

    pairs: dict[str, dict[str, tuple]] = {}
    for key, (shape, dtype) in shapes.items():
        m = _LORA_KEY.match(key)
        if m is None:
            raise InvalidAdapter(root, f"{ADAPTER_WEIGHTS}: {key!r} is not a LoRA A/B weight "
                                       "(full weights or other parameters are not accepted)")
        if not dtype.is_floating_point or len(shape) != 2:
            raise InvalidAdapter(root, f"{ADAPTER_WEIGHTS}: {key} must be a 2-d float tensor, got {dtype} {shape}")
        pairs.setdefault(m["module"], {})[m["ab"]] = shape
    if not pairs:
        raise InvalidAdapter(root, f"{ADAPTER_WEIGHTS} holds no LoRA weights")
    modules: dict[str, tuple[int, int]] = {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise InvalidAdapter(root, f"{module}: has lora_{''.join(ab)} but not both lora_A and lora_B")
        (ra, fan_in), (fan_out, rb) = ab["A"], ab["B"]
        if ra != r or rb != r:
            raise InvalidAdapter(root, f"{module}: rank {ra}/{rb} in the weights but r={r} in {ADAPTER_CONFIG}")
        if not any(_matches(module, t) for t in config["target_modules"]):
            raise InvalidAdapter(root, f"{module} has LoRA weights but is not among target_modules "
                                       f"{config['target_modules']}")
        modules[module] = (fan_in, fan_out)

    if base_model is not None:
        if isinstance(base_model, (str, Path)):
            from mloc_dagster.core.model import load_base_model
            base_model = load_base_model(base_model).model
        linears = _base_linears(base_model)
        for t in config["target_modules"]:
            if not any(_matches(n, t) for n in linears):
                raise InvalidAdapter(root, f"target module {t!r} matches no linear layer of the base model")
        for module, (fan_in, fan_out) in modules.items():
            if module not in linears:
                raise InvalidAdapter(root, f"{module} is not a linear layer of the base model")
            if linears[module] != (fan_in, fan_out):
                raise InvalidAdapter(root, f"{module}: adapter shape in={fan_in} out={fan_out} but the base "
                                           f"layer has in={linears[module][0]} out={linears[module][1]}")
        expected = {n for n in linears if any(_matches(n, t) for t in config["target_modules"])}
        missing = sorted(expected - set(modules))
        if missing:
            raise InvalidAdapter(root, f"target_modules name {missing} but the adapter has no weights for them")

    has_state = (root / TRAIN_STATE_JSON).exists() or (root / TRAIN_STATE_TENSORS).exists()
    if has_state:
        for name in (TRAIN_STATE_JSON, TRAIN_STATE_TENSORS):
            if not (root / name).is_file():
                raise InvalidAdapter(root, f"train state incomplete: missing {name}")
        try:
            state = json.loads((root / TRAIN_STATE_JSON).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InvalidAdapter(root, f"{TRAIN_STATE_JSON} is not valid JSON: {exc}") from exc
        if not isinstance(state, dict) or "step" not in state:
            raise InvalidAdapter(root, f"{TRAIN_STATE_JSON} is not a train state")
        _check_tensors_finite(root, TRAIN_STATE_TENSORS)
    return CheckpointInfo(root, r, float(config["lora_alpha"]), bool(config.get("use_rslora", False)),
                          list(config["target_modules"]), modules, has_state)
