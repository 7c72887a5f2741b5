"""What a node may hand in: the one rulebook for adapter and checkpoint directories.

An adapter directory may come from a node we do not control (a chain job, a distributed slice, a
warm-start source, a candidate the TTS judge loads), so nothing in it is trusted and everything
that reads one goes through ``read_adapter_dir``. It validates the directory *in place* (no
copy) and reads it only as JSON and safetensors, neither of which executes code:

- **files**: plain files only (no symlinks, no subdirectories), named ``ALLOWED_FILES``:
  ``adapter_model.safetensors`` + ``adapter_config.json`` (required), ``train_state.safetensors``
  + ``train_state.json`` (a training checkpoint, both or neither), ``result.json`` (the job's
  report) and peft's ``README.md`` model card. Pickle or code files (``FORBIDDEN_SUFFIXES``) and
  anything whose first bytes are a pickle stream or a zip archive (``torch.save``) are refused;
- **adapter_config.json**: only the keys of peft's ``LoraConfig`` in ``CONFIG_RULES``, each with
  the values we accept: plain LoRA (no DoRA, biases, per-module ranks, modules_to_save, or
  initialisations that change the base weights), target modules as a list of names (no regex),
  and nothing that makes peft import code (``auto_mapping`` outside mloc_dagster/transformers,
  ``megatron_core``). What peft 0.21 writes for our ASR and TTS adapters passes;
- **tensors**: only ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight`` pairs,
  2-d float tensors, finite, with rank ``r``, for modules matched by ``target_modules``; with a
  base model also: every module a linear layer of it with the same shape, every layer the
  targets name covered;
- **result.json** (``read_node_result``): a JSON object with the fields in ``RESULT_FIELDS`` of
  the types given there; unknown fields are ignored.

Every refusal is an ``InvalidAdapter`` whose ``reason`` names the file, the key or field, and
what was expected. Nothing is ever deleted: a refused directory stays where the node left it.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
TRAIN_STATE_TENSORS = "train_state.safetensors"
TRAIN_STATE_JSON = "train_state.json"
RESULT_JSON = "result.json"
MODEL_CARD = "README.md"  # peft's save_pretrained writes it; text, never loaded
ALLOWED_FILES = (ADAPTER_WEIGHTS, ADAPTER_CONFIG, TRAIN_STATE_TENSORS, TRAIN_STATE_JSON, RESULT_JSON, MODEL_CARD)
FORBIDDEN_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz",
                      ".py", ".pyc", ".so")
# peft's AutoPeftModel imports auto_mapping's parent_library: only our model code or transformers'.
SAFE_AUTO_MAPPING_PREFIXES = ("mloc_dagster.", "transformers.models.")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>[A-Za-z0-9_.]+)\.lora_(?P<ab>[AB])\.weight$")
_MODULE_NAME = re.compile(r"^[A-Za-z0-9_.]+$")

ModuleShapes = Mapping[str, tuple[int, int]]  # module path -> (out_features, in_features)


class InvalidAdapter(ValueError):
    """An adapter or checkpoint we refuse; ``reason`` names the file, key and what was expected."""

    def __init__(self, path: str | os.PathLike[str] | None, reason: str) -> None:
        self.path = str(path) if path is not None else "<in memory>"
        self.reason = reason
        super().__init__(f"invalid adapter {self.path}: {reason}")


# --------------------------------------------------------------------------- value predicates


def _same(value: Any, allowed: Any) -> bool:
    return type(value) is type(allowed) and value == allowed  # 0 is not False, 1 is not True


def one_of(*allowed: Any) -> Callable[[Any], bool]:
    return lambda v: any(_same(v, a) for a in allowed)


def _int(v: Any, lo: int = 0, hi: float = math.inf) -> bool:
    return type(v) is int and lo <= v <= hi


def _number(v: Any) -> bool:
    return type(v) in (int, float)


def _str(v: Any) -> bool:
    return type(v) is str


def _opt_str(v: Any) -> bool:
    return v is None or type(v) is str


def _module_list(v: Any) -> bool:
    return type(v) is list and len(v) > 0 and all(type(s) is str and _MODULE_NAME.match(s) for s in v)


def _auto_mapping(v: Any) -> bool:
    if v is None:
        return True
    if type(v) is not dict or set(v) - {"base_model_class", "parent_library"}:
        return False
    lib, cls = v.get("parent_library"), v.get("base_model_class", "")
    return (type(lib) is str and lib.startswith(SAFE_AUTO_MAPPING_PREFIXES) and _MODULE_NAME.match(lib) is not None
            and type(cls) is str)


# --------------------------------------------------------------------------- adapter_config.json

_OFF, _NONE = "false (or null)", "null"
# key -> (accepts, what is expected). Keys not listed are refused; REQUIRED_CONFIG must be present.
CONFIG_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "peft_type": (one_of("LORA"), '"LORA"'),
    "r": (lambda v: _int(v, 1, 4096), "an integer in [1, 4096]"),
    "lora_alpha": (lambda v: _number(v) and math.isfinite(v) and v > 0, "a positive finite number"),
    "target_modules": (_module_list, "a non-empty list of module names (no regex)"),
    "lora_dropout": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "bias": (one_of("none"), '"none"'),
    "use_rslora": (one_of(True, False), "true or false"),
    "inference_mode": (one_of(True, False), "true or false"),
    # pissa/olora/loftq/eva/corda... rewrite the base weights: the adapter alone is not the update.
    "init_lora_weights": (one_of(True, False, "gaussian"), 'true, false or "gaussian"'),
    "task_type": (one_of(None), "null (mloc adapters are saved without a task type)"),
    "base_model_name_or_path": (_opt_str, "a string or null"),
    "revision": (_opt_str, "a string or null"),
    "peft_version": (_str, "a string"),
    "auto_mapping": (_auto_mapping, "null or {base_model_class, parent_library} with parent_library under "
                                    + " or ".join(SAFE_AUTO_MAPPING_PREFIXES)),
    "megatron_core": (one_of(None, "megatron.core"), 'null or "megatron.core"'),
    "qalora_group_size": (_int, "an integer ≥ 0"),
    "ensure_weight_tying": (one_of(False), "false"),
    "runtime_config": (one_of(None, {}, {"ephemeral_gpu_offload": False}), 'null, {} or {"ephemeral_gpu_offload": false}'),
    **{k: (one_of(False, None), _OFF) for k in ("use_dora", "use_qalora", "use_bdlora", "lora_bias", "fan_in_fan_out")},
    **{k: (one_of({}, None), "{} (or null)") for k in ("rank_pattern", "alpha_pattern", "loftq_config")},
    **{k: (one_of(None, []), "null (or [])") for k in (
        "modules_to_save", "target_parameters", "layers_to_transform", "layers_pattern", "exclude_modules")},
    **{k: (one_of(None), _NONE) for k in (
        "trainable_token_indices", "layer_replication", "alora_invocation_tokens", "megatron_config", "eva_config",
        "corda_config", "arrow_config", "kasa_config", "lora_ga_config", "monteclora_config", "velora_config")},
}
REQUIRED_CONFIG = ("peft_type", "r", "lora_alpha", "target_modules")


def validate_adapter_config(config: Any, path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """A JSON-clean copy of ``config`` if it is a plain LoRA config we accept, else ``InvalidAdapter``."""
    if type(config) is not dict:
        raise InvalidAdapter(path, f"{ADAPTER_CONFIG} holds {type(config).__name__}, expected a JSON object")
    unknown = sorted(set(config) - set(CONFIG_RULES))
    if unknown:
        raise InvalidAdapter(path, f"{ADAPTER_CONFIG}: unknown keys {unknown}, expected only reviewed peft LoRA keys "
                                   f"({', '.join(sorted(CONFIG_RULES))})")
    for key in REQUIRED_CONFIG:
        if key not in config:
            raise InvalidAdapter(path, f"{ADAPTER_CONFIG}: missing key {key!r}, expected {CONFIG_RULES[key][1]}")
    for key, value in config.items():
        accepts, expected = CONFIG_RULES[key]
        if not accepts(value):
            raise InvalidAdapter(path, f"{ADAPTER_CONFIG}: {key} is {_show(value)}, expected {expected}")
    return json.loads(json.dumps(config))


def targeted(module: str, targets: list[str]) -> bool:
    """peft's rule for a list of target modules: the exact name or a ``.``-separated suffix."""
    return any(module == t or module.endswith("." + t) for t in targets)


def _show(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _read_json(root: Path, name: str) -> Any:
    try:
        return json.loads((root / name).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidAdapter(root, f"{name} is not valid JSON: {exc}") from exc


# --------------------------------------------------------------------------- files


def check_files(root: Path) -> None:
    """Plain, allowed files only; nothing that is (or hides) a pickle or code."""
    if root.is_symlink() or not root.is_dir():
        raise InvalidAdapter(root, "not an adapter directory")
    for entry in sorted(root.iterdir()):
        name = entry.name
        if entry.is_symlink():
            raise InvalidAdapter(root, f"{name} is a symlink, expected plain files only")
        if name.lower().endswith(FORBIDDEN_SUFFIXES):
            raise InvalidAdapter(root, f"{name} is a pickle or code file, expected safetensors and JSON only "
                                       f"({ADAPTER_WEIGHTS} for the weights)")
        if entry.is_dir():
            raise InvalidAdapter(root, f"{name}/ is a directory, expected only the files {', '.join(ALLOWED_FILES)}")
        if name not in ALLOWED_FILES:
            raise InvalidAdapter(root, f"{name} is not a file a node may hand in, expected only "
                                       f"{', '.join(ALLOWED_FILES)}")
        with open(entry, "rb") as f:
            head = f.read(9)
        if name.endswith(".safetensors") and head[8:9] == b"{":
            continue  # a safetensors header (its length prefix can look like a pickle opcode)
        if head[:1] == b"\x80" and len(head) > 1 and 1 <= head[1] <= 5:
            raise InvalidAdapter(root, f"{name} is a pickle stream, expected safetensors or JSON")
        if head[:4] == b"PK\x03\x04":
            raise InvalidAdapter(root, f"{name} is a zip archive (torch.save format), expected safetensors or JSON")
    for needed in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        if not (root / needed).is_file():
            raise InvalidAdapter(root, f"missing {needed}")


# --------------------------------------------------------------------------- tensors


def read_lora_tensors(root: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(lora_A, lora_B) by module from ``adapter_model.safetensors``; any other tensor is refused."""
    lora_a: dict[str, torch.Tensor] = {}
    lora_b: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(root / ADAPTER_WEIGHTS), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                m = _LORA_KEY.match(key)
                if m is None:
                    raise InvalidAdapter(root, f"{ADAPTER_WEIGHTS}: tensor {key!r} is not a LoRA factor, expected only "
                                               "base_model.model.<module>.lora_A.weight / lora_B.weight")
                (lora_a if m["ab"] == "A" else lora_b)[m["module"]] = f.get_tensor(key)
    except InvalidAdapter:
        raise
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise InvalidAdapter(root, f"{ADAPTER_WEIGHTS} is not a valid safetensors file: {exc}") from exc
    return lora_a, lora_b


def check_lora_tensors(lora_a: Mapping[str, torch.Tensor], lora_b: Mapping[str, torch.Tensor],
                       config: Mapping[str, Any], path: str | os.PathLike[str] | None,
                       reference: ModuleShapes | None = None) -> None:
    """A/B pairs of 2-d finite float tensors of rank r on targeted modules [with the reference layout]."""
    r, targets = config["r"], config["target_modules"]
    if not lora_a and not lora_b:
        raise InvalidAdapter(path, f"{ADAPTER_WEIGHTS} holds no LoRA tensors")
    odd = sorted(set(lora_a) ^ set(lora_b))
    if odd:
        raise InvalidAdapter(path, f"{ADAPTER_WEIGHTS}: modules {odd} lack lora_A or lora_B, expected both")
    for module in sorted(lora_a):
        if not targeted(module, targets):
            raise InvalidAdapter(path, f"{ADAPTER_WEIGHTS}: module {module} has LoRA weights but is not matched by "
                                       f"{ADAPTER_CONFIG} target_modules {targets}")
        for name, t in (("lora_A", lora_a[module]), ("lora_B", lora_b[module])):
            if t.dtype not in FLOAT_DTYPES:
                raise InvalidAdapter(path, f"{ADAPTER_WEIGHTS}: {module}.{name} has dtype {t.dtype}, expected "
                                           "float16, bfloat16, float32 or float64")
            if t.ndim != 2:
                raise InvalidAdapter(path, f"{ADAPTER_WEIGHTS}: {module}.{name} has shape {tuple(t.shape)}, expected "
                                           "2 dimensions (linear layers only)")
            if not bool(torch.isfinite(t).all()):
                raise InvalidAdapter(path, f"{ADAPTER_WEIGHTS}: {module}.{name} contains NaN or infinite values")
        a, b = lora_a[module], lora_b[module]
        if a.shape[0] != r or b.shape[1] != r:
            raise InvalidAdapter(path, f"{ADAPTER_WEIGHTS}: {module}: lora_A {tuple(a.shape)} / lora_B "
                                       f"{tuple(b.shape)}, expected rank r={r} as in {ADAPTER_CONFIG}")
    if reference is not None:
        check_shapes({m: (int(lora_b[m].shape[0]), int(lora_a[m].shape[1])) for m in lora_a}, reference, path)


def check_shapes(shapes: ModuleShapes, reference: ModuleShapes, path: str | os.PathLike[str] | None) -> None:
    """The same modules as ``reference`` with the same (out, in) shapes."""
    missing, extra = sorted(set(reference) - set(shapes)), sorted(set(shapes) - set(reference))
    if missing or extra:
        raise InvalidAdapter(path, f"target modules differ from the expected ones: missing {missing}, unexpected {extra}")
    wrong = {m: (tuple(shapes[m]), tuple(reference[m])) for m in shapes if tuple(shapes[m]) != tuple(reference[m])}
    if wrong:
        detail = ", ".join(f"{m}: {got} (expected {exp})" for m, (got, exp) in sorted(wrong.items()))
        raise InvalidAdapter(path, f"ΔW shapes (out, in) differ from the expected ones: {detail}")


def base_layout(base_model: torch.nn.Module | str | os.PathLike[str], targets: list[str],
                path: str | os.PathLike[str] | None) -> dict[str, tuple[int, int]]:
    """{module: (out, in)} of the base model's linear layers the targets name; every target must name one."""
    if isinstance(base_model, (str, os.PathLike)):
        from mloc_dagster.core.models.families import load_base_model
        base_model = load_base_model(base_model).model
    if hasattr(base_model, "get_base_model"):  # a PeftModel: look through the LoRA wrappers
        base_model = base_model.get_base_model()
    linears = {}
    for name, module in base_model.named_modules():
        module = getattr(module, "base_layer", module)
        if isinstance(module, torch.nn.Linear) and ".base_layer" not in name and ".lora_" not in name:
            linears[name] = (module.out_features, module.in_features)
    for t in targets:
        if not any(targeted(n, [t]) for n in linears):
            raise InvalidAdapter(path, f"{ADAPTER_CONFIG}: target module {t!r} matches no linear layer of the base model")
    return {n: shape for n, shape in linears.items() if targeted(n, targets)}


def check_train_state(root: Path) -> bool:
    """A training checkpoint's state, if there is one: both files, a JSON object with a step, finite tensors."""
    present = [n for n in (TRAIN_STATE_JSON, TRAIN_STATE_TENSORS) if (root / n).exists()]
    if not present:
        return False
    if len(present) == 1:
        missing = TRAIN_STATE_TENSORS if present[0] == TRAIN_STATE_JSON else TRAIN_STATE_JSON
        raise InvalidAdapter(root, f"train state incomplete: {present[0]} without {missing}")
    state = _read_json(root, TRAIN_STATE_JSON)
    if type(state) is not dict or type(state.get("step")) is not int:
        raise InvalidAdapter(root, f"{TRAIN_STATE_JSON}: expected a JSON object with an integer 'step'")
    try:
        with safe_open(str(root / TRAIN_STATE_TENSORS), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118
                t = f.get_tensor(key)
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise InvalidAdapter(root, f"{TRAIN_STATE_TENSORS}: tensor {key} has non-finite values (NaN/Inf)")
    except InvalidAdapter:
        raise
    except Exception as exc:
        raise InvalidAdapter(root, f"{TRAIN_STATE_TENSORS} is not a valid safetensors file: {exc}") from exc
    return True


@dataclass(frozen=True, eq=False)
class AdapterFiles:
    """A validated adapter directory as read: its config and LoRA factors by module."""

    path: Path
    config: dict[str, Any]
    lora_a: dict[str, torch.Tensor]
    lora_b: dict[str, torch.Tensor]
    has_train_state: bool
    result: dict[str, Any]  # its result.json ({} without one)

    @property
    def r(self) -> int:
        return int(self.config["r"])

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        """{module: (out_features, in_features)}."""
        return {m: (int(self.lora_b[m].shape[0]), int(self.lora_a[m].shape[1])) for m in sorted(self.lora_a)}


def read_adapter_dir(path: str | os.PathLike[str], *, reference: ModuleShapes | None = None,
                     base_model: torch.nn.Module | str | os.PathLike[str] | None = None) -> AdapterFiles:
    """Validate an adapter or training checkpoint directory in place and read it; ``InvalidAdapter``
    if refused. ``reference`` ({module: (out, in)}) requires exactly that layout; ``base_model``
    (a module or a model directory) requires the layout of the linear layers its targets name.
    A ``result.json`` is checked too when present (``read_node_result``)."""
    root = Path(path)
    check_files(root)
    config = validate_adapter_config(_read_json(root, ADAPTER_CONFIG), root)
    lora_a, lora_b = read_lora_tensors(root)
    if base_model is not None:
        reference = base_layout(base_model, config["target_modules"], root)
    check_lora_tensors(lora_a, lora_b, config, root, reference)
    has_state = check_train_state(root)
    return AdapterFiles(root, config, lora_a, lora_b, has_state, read_node_result(root, required=False))


# --------------------------------------------------------------------------- result.json


def _metric(v: Any) -> bool:  # NaN is what an empty dev split measures
    return _number(v) and (math.isnan(v) or v >= 0)


def _opt(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


# field -> (accepts, what is expected, required). The required ones are what the server decides on
# (which run and round, which base model, which node, how many samples); other fields are checked
# when present and unknown ones ignored.
RESULT_FIELDS: dict[str, tuple[Callable[[Any], bool], str, bool]] = {
    "run_id": (_opt_str, "a string or null", True),
    "job_index": (_opt(_int), "an integer ≥ 0 or null", True),
    "node_id": (_str, "a string", True),
    "base_model_hash": (_str, "a string", True),
    "total_samples": (_int, "an integer ≥ 0", True),
    **{k: (_int, "an integer ≥ 0", False) for k in ("samples", "steps", "total_steps", "checkpoints_written")},
    **{k: (_str, "a string", False) for k in ("sha256", "path", "dataset_version", "stop_reason", "device")},
    **{k: (_opt(_metric), "a number ≥ 0 (or NaN) or null", False) for k in (
        "dev_cer", "dev_wer", "dev_frame_l1", "train_loss", "samples_per_s", "wall_seconds",
        "train_seconds", "epoch")},
    # a change of dev CER since the run's previous job: negative when the job helped
    "dev_cer_delta": (_opt(_number), "a number (or NaN) or null", False),
    "track": (one_of("asr", "tts"), '"asr" or "tts"', False),
    "learning_curve": (lambda v: type(v) is list and all(type(p) is dict for p in v), "a list of objects", False),
    "loss_history": (lambda v: type(v) is list and all(_number(x) for x in v), "a list of numbers", False),
}


def read_node_result(path: str | os.PathLike[str], *, required: bool = True) -> dict[str, Any]:
    """The ``result.json`` a training job left next to its adapter, checked against ``RESULT_FIELDS``.
    Missing: ``InvalidAdapter`` when ``required``, else ``{}`` (a merged adapter has none).
    A malformed one is always refused; the file stays on disk."""
    root = Path(path)
    file = root / RESULT_JSON
    if not file.is_file():
        if required:
            raise InvalidAdapter(root, f"missing {RESULT_JSON}")
        return {}
    result = _read_json(root, RESULT_JSON)
    if type(result) is not dict:
        raise InvalidAdapter(root, f"{RESULT_JSON} holds {type(result).__name__}, expected a JSON object")
    for name, (accepts, expected, needed) in RESULT_FIELDS.items():
        if name not in result:
            if needed:
                raise InvalidAdapter(root, f"{RESULT_JSON}: missing field {name!r}, expected {expected}")
        elif not accepts(result[name]):
            raise InvalidAdapter(root, f"{RESULT_JSON}: field {name!r} is {_show(result[name])}, "
                                       f"expected {expected}")
    return result
