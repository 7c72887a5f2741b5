"""What a node may hand in (core/adapters/format.py): a real saved checkpoint is accepted, and every
refused case names the file, the key or field, and what was expected; the files stay on disk."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mloc_dagster.core.adapters.format import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    RESULT_JSON,
    TRAIN_STATE_TENSORS,
    InvalidAdapter,
    read_adapter_dir,
    read_node_result,
    validate_adapter_config,
)
from mloc_dagster.core.adapters.lora import load_adapter
from mloc_dagster.core.models.ctc import new_tiny_model
from mloc_dagster.core.models.families import save_base_model
from mloc_dagster.core.training.asr import train_adapter
from mloc_dagster.core.training.spec import AdapterHParams, AdapterJobSpec


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory) -> tuple[Path, Path]:
    """(base model dir, a real 2-step training checkpoint on it). The base is untrained: only the
    checkpoint format matters here."""
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    save_base_model(new_tiny_model(), root / "base")
    train_adapter(AdapterJobSpec(root / "base", corpus.scottish, root / "adapter", max_steps=2, timebox_s=600,
                                 feature_cache_dir=corpus.feature_cache,
                                 hparams=AdapterHParams(r=4, batch_size=4)))
    return root / "base", root / "adapter"


@pytest.fixture
def ckpt(trained, tmp_path) -> Path:
    copy = tmp_path / "ckpt"
    shutil.copytree(trained[1], copy)
    return copy


def refused(path: Path, **kw) -> str:
    """The reason ``read_adapter_dir`` refuses ``path`` with; the directory is still there."""
    with pytest.raises(InvalidAdapter) as info:
        read_adapter_dir(path, **kw)
    assert path.exists() and info.value.path == str(path)
    return info.value.reason


def _edit_config(path: Path, **changes) -> None:
    config = json.loads((path / ADAPTER_CONFIG).read_text())
    config.update(changes)
    (path / ADAPTER_CONFIG).write_text(json.dumps(config))


def _edit_weights(path: Path, edit) -> None:
    weights = load_file(str(path / ADAPTER_WEIGHTS))
    edit(weights)
    save_file(weights, str(path / ADAPTER_WEIGHTS))


def _edit_result(path: Path, edit) -> None:
    result = json.loads((path / RESULT_JSON).read_text())
    edit(result)
    (path / RESULT_JSON).write_text(json.dumps(result))


# -- accepted ----------------------------------------------------------------------------------


def test_a_real_training_checkpoint_is_accepted(trained, ckpt):
    base, _ = trained
    files = read_adapter_dir(ckpt, base_model=base)
    assert files.r == 4 and files.has_train_state and files.result["run_id"] is None
    assert set(files.shapes) == {"proj", "layers.0.mix", "layers.1.mix", "layers.2.mix", "head"}
    assert files.shapes["proj"] == (256, 320)
    adapter = load_adapter(ckpt)  # the same read, kept: no staging copy
    assert adapter.path == ckpt and adapter.scale == pytest.approx(32.0 / 4) and adapter.result == files.result


def test_what_peft_writes_for_our_asr_and_tts_models_is_accepted(corpus, tmp_path):
    """peft 0.21's save_pretrained output (model card, auto_mapping, megatron_core, peft_version...)."""
    from peft import LoraConfig, get_peft_model

    from mloc_dagster.core.models.base import default_lora_targets
    from mloc_dagster.core.tts.model import DEFAULT_TTS_LORA_TARGETS, TINY_CONFIG, TtsStats, new_tiny_tts

    asr = new_tiny_model()
    mels = TINY_CONFIG.get("num_mel_bins", 80)
    tts = new_tiny_tts(asr.tokenizer, TtsStats([0.0] * mels, [1.0] * mels)).model
    for name, model, targets in (("asr", asr.model, default_lora_targets(asr.model)),
                                 ("tts", tts, list(DEFAULT_TTS_LORA_TARGETS))):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, bias="none",
                                                          target_modules=targets, init_lora_weights=True))
            peft_model.save_pretrained(tmp_path / name)
        assert (tmp_path / name / "README.md").is_file()
        config = json.loads((tmp_path / name / ADAPTER_CONFIG).read_text())
        assert config["auto_mapping"] is not None and config["megatron_core"] == "megatron.core"
        files = read_adapter_dir(tmp_path / name, base_model=peft_model)
        assert files.r == 4 and files.result == {}


# -- files -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["adapter_model.bin", "optimizer.pt", "rng.pth", "state.pkl", "x.pickle",
                                  "last.ckpt", "modeling.py", "x.joblib", "w.npy", "lib.so"])
def test_pickle_and_code_files_refused(ckpt, name):
    (ckpt / name).write_bytes(pickle.dumps({"a": 1}))
    assert refused(ckpt) == (f"{name} is a pickle or code file, expected safetensors and JSON only "
                             f"({ADAPTER_WEIGHTS} for the weights)")


def test_other_files_directories_and_symlinks_refused(ckpt, tmp_path):
    (ckpt / "notes.txt").write_text("hi")
    assert refused(ckpt).startswith("notes.txt is not a file a node may hand in, expected only adapter_model")
    (ckpt / "notes.txt").unlink()
    (ckpt / "nested").mkdir()
    assert refused(ckpt).startswith("nested/ is a directory, expected only the files")
    (ckpt / "nested").rmdir()
    (tmp_path / "elsewhere").write_text("{}")
    (ckpt / RESULT_JSON).unlink()
    os.symlink(tmp_path / "elsewhere", ckpt / RESULT_JSON)
    assert refused(ckpt) == f"{RESULT_JSON} is a symlink, expected plain files only"


def test_pickle_or_zip_under_an_allowed_name_refused(ckpt):
    (ckpt / RESULT_JSON).write_bytes(pickle.dumps(object, protocol=4))
    assert refused(ckpt) == f"{RESULT_JSON} is a pickle stream, expected safetensors or JSON"
    (ckpt / RESULT_JSON).unlink()
    (ckpt / ADAPTER_WEIGHTS).unlink()
    torch.save({"w": torch.zeros(2)}, ckpt / ADAPTER_WEIGHTS)  # a zip archive holding a pickle
    assert refused(ckpt).startswith(f"{ADAPTER_WEIGHTS} is a zip archive (torch.save format)")
    (ckpt / ADAPTER_WEIGHTS).unlink()
    with zipfile.ZipFile(ckpt / ADAPTER_WEIGHTS, "w") as z:
        z.writestr("data.pkl", b"x")
    assert "zip archive" in refused(ckpt)


def test_missing_or_unreadable_files_refused(ckpt, tmp_path):
    (ckpt / ADAPTER_CONFIG).write_text("{not json")
    assert refused(ckpt).startswith(f"{ADAPTER_CONFIG} is not valid JSON")
    (ckpt / ADAPTER_CONFIG).unlink()
    assert refused(ckpt) == f"missing {ADAPTER_CONFIG}"
    with pytest.raises(InvalidAdapter, match="nothing: not an adapter directory"):
        read_adapter_dir(tmp_path / "nothing")


def test_train_state_incomplete_or_non_finite_refused(ckpt):
    state = load_file(str(ckpt / TRAIN_STATE_TENSORS))
    key = next(k for k in state if k.startswith("optim.") and k.endswith("exp_avg"))
    state[key][0] = float("inf")
    save_file(state, str(ckpt / TRAIN_STATE_TENSORS))
    assert refused(ckpt) == f"{TRAIN_STATE_TENSORS}: tensor {key} has non-finite values (NaN/Inf)"
    (ckpt / TRAIN_STATE_TENSORS).unlink()
    assert refused(ckpt) == f"train state incomplete: train_state.json without {TRAIN_STATE_TENSORS}"


# -- adapter_config.json -----------------------------------------------------------------------


@pytest.mark.parametrize("key, value, expected", [
    ("peft_type", "IA3", '"LORA"'),
    ("r", 0, "an integer in [1, 4096]"),
    ("r", True, "an integer in [1, 4096]"),
    ("lora_alpha", "8", "a positive finite number"),
    ("lora_dropout", 1.0, "a number in [0, 1)"),
    ("target_modules", ".*", "a non-empty list of module names (no regex)"),
    ("bias", "all", '"none"'),
    ("use_rslora", 1, "true or false"),
    ("use_dora", True, "false (or null)"),
    ("lora_bias", True, "false (or null)"),
    ("fan_in_fan_out", True, "false (or null)"),
    ("init_lora_weights", "pissa", 'true, false or "gaussian"'),
    ("task_type", "CAUSAL_LM", "null (mloc adapters are saved without a task type)"),
    ("peft_version", None, "a string"),
    ("rank_pattern", {"proj": 8}, "{} (or null)"),
    ("modules_to_save", ["head"], "null (or [])"),
    ("layers_to_transform", [0], "null (or [])"),
    ("megatron_config", {"x": 1}, "null"),
    ("megatron_core", "os", 'null or "megatron.core"'),
    ("auto_mapping", {"base_model_class": "X", "parent_library": "evil.module"},
     "null or {base_model_class, parent_library} with parent_library under mloc_dagster. or transformers.models."),
    ("ensure_weight_tying", True, "false"),
])
def test_config_values_outside_the_rules_refused(ckpt, key, value, expected):
    _edit_config(ckpt, **{key: value})
    assert refused(ckpt) == f"{ADAPTER_CONFIG}: {key} is {json.dumps(value)}, expected {expected}"


def test_unknown_or_missing_config_keys_refused(ckpt):
    _edit_config(ckpt, trust_remote_code=True)
    assert refused(ckpt).startswith(f"{ADAPTER_CONFIG}: unknown keys ['trust_remote_code'], expected only reviewed")
    config = json.loads((ckpt / ADAPTER_CONFIG).read_text())
    del config["trust_remote_code"], config["r"]
    (ckpt / ADAPTER_CONFIG).write_text(json.dumps(config))
    assert refused(ckpt) == f"{ADAPTER_CONFIG}: missing key 'r', expected an integer in [1, 4096]"
    with pytest.raises(InvalidAdapter, match=r"adapter_config.json holds list, expected a JSON object"):
        validate_adapter_config([])


@pytest.mark.parametrize("value", [True, False, "gaussian"])
def test_init_lora_weights_that_leave_the_base_alone_accepted(ckpt, value):
    _edit_config(ckpt, init_lora_weights=value)
    assert read_adapter_dir(ckpt).config["init_lora_weights"] == value


# -- tensors -----------------------------------------------------------------------------------


def test_non_finite_weights_refused(ckpt):
    def poison(w):
        w["base_model.model.proj.lora_B.weight"][0, 0] = float("nan")
    _edit_weights(ckpt, poison)
    assert refused(ckpt) == f"{ADAPTER_WEIGHTS}: proj.lora_B contains NaN or infinite values"


def test_full_weights_smuggled_in_refused(ckpt):
    _edit_weights(ckpt, lambda w: w.update({"base_model.model.head.weight": torch.zeros(29, 256)}))
    assert refused(ckpt) == (f"{ADAPTER_WEIGHTS}: tensor 'base_model.model.head.weight' is not a LoRA factor, "
                             "expected only base_model.model.<module>.lora_A.weight / lora_B.weight")


def test_dtype_dimensions_pairs_and_rank_refused(ckpt):
    original = load_file(str(ckpt / ADAPTER_WEIGHTS))
    cases = [
        (lambda w: w.update({"base_model.model.proj.lora_A.weight": torch.zeros(4, 320, dtype=torch.int32)}),
         f"{ADAPTER_WEIGHTS}: proj.lora_A has dtype torch.int32, expected float16, bfloat16, float32 or float64"),
        (lambda w: w.update({"base_model.model.proj.lora_A.weight": torch.zeros(4, 320, 1)}),
         f"{ADAPTER_WEIGHTS}: proj.lora_A has shape (4, 320, 1), expected 2 dimensions (linear layers only)"),
        (lambda w: w.pop("base_model.model.head.lora_B.weight"),
         f"{ADAPTER_WEIGHTS}: modules ['head'] lack lora_A or lora_B, expected both"),
        (lambda w: w.update({"base_model.model.proj.lora_A.weight": torch.zeros(3, 320)}),
         f"{ADAPTER_WEIGHTS}: proj: lora_A (3, 320) / lora_B (256, 4), expected rank r=4 as in {ADAPTER_CONFIG}"),
    ]
    for edit, reason in cases:
        weights = dict(original)
        edit(weights)
        save_file(weights, str(ckpt / ADAPTER_WEIGHTS))
        assert refused(ckpt) == reason


def test_weights_outside_target_modules_refused(ckpt):
    _edit_config(ckpt, target_modules=["proj", "mix"])
    assert refused(ckpt) == (f"{ADAPTER_WEIGHTS}: module head has LoRA weights but is not matched by "
                             f"{ADAPTER_CONFIG} target_modules ['proj', 'mix']")


def test_shapes_and_targets_checked_against_the_base_model(trained, ckpt, tmp_path):
    base = trained[0]
    _edit_weights(ckpt, lambda w: w.update({"base_model.model.proj.lora_A.weight": torch.zeros(4, 160)}))
    read_adapter_dir(ckpt)  # consistent on its own ...
    assert refused(ckpt, base_model=base) == (  # ... but not for this base model
        "ΔW shapes (out, in) differ from the expected ones: proj: (256, 160) (expected (256, 320))")
    other = tmp_path / "other"
    shutil.copytree(trained[1], other)

    def rename(w):
        for ab in "AB":
            w[f"base_model.model.decoder.lora_{ab}.weight"] = w.pop(f"base_model.model.head.lora_{ab}.weight")
    _edit_weights(other, rename)
    _edit_config(other, target_modules=["proj", "mix", "decoder"])
    assert refused(other, base_model=base) == (
        f"{ADAPTER_CONFIG}: target module 'decoder' matches no linear layer of the base model")


# -- result.json -------------------------------------------------------------------------------


@pytest.mark.parametrize("edit, reason", [
    (lambda r: r.pop("base_model_hash"), f"{RESULT_JSON}: missing field 'base_model_hash', expected a string"),
    (lambda r: r.pop("node_id"), f"{RESULT_JSON}: missing field 'node_id', expected a string"),
    (lambda r: r.update(job_index="0"), f"{RESULT_JSON}: field 'job_index' is \"0\", expected an integer ≥ 0 or null"),
    (lambda r: r.update(total_samples=-1), f"{RESULT_JSON}: field 'total_samples' is -1, expected an integer ≥ 0"),
    (lambda r: r.update(dev_cer="0.2"), f"{RESULT_JSON}: field 'dev_cer' is \"0.2\", expected a number ≥ 0 (or NaN) or null"),
    (lambda r: r.update(learning_curve={"x": 1}),
     f"{RESULT_JSON}: field 'learning_curve' is {{\"x\": 1}}, expected a list of objects"),
    (lambda r: r.update(track="video"), f"{RESULT_JSON}: field 'track' is \"video\", expected \"asr\" or \"tts\""),
    (lambda r: r.update(dev_cer_delta="better"),
     f"{RESULT_JSON}: field 'dev_cer_delta' is \"better\", expected a number (or NaN) or null"),
])
def test_malformed_result_json_refused_naming_the_field(ckpt, edit, reason):
    _edit_result(ckpt, edit)
    assert refused(ckpt) == reason
    with pytest.raises(InvalidAdapter, match="result.json"):
        read_node_result(ckpt)
    assert (ckpt / RESULT_JSON).is_file()  # kept for the operator to look at


def test_a_job_that_lowered_the_dev_cer_is_accepted(ckpt):
    """dev_cer_delta is the change since the run's previous job: negative when the job helped
    (the daemon chain test's second job was refused for it once)."""
    _edit_result(ckpt, lambda r: r.update(dev_cer_delta=-0.03))
    assert read_node_result(ckpt)["dev_cer_delta"] == -0.03


def test_result_json_not_json_or_not_an_object_refused(ckpt):
    (ckpt / RESULT_JSON).write_text("{truncated")
    assert refused(ckpt).startswith(f"{RESULT_JSON} is not valid JSON: ")
    (ckpt / RESULT_JSON).write_text("[1, 2]")
    assert refused(ckpt) == f"{RESULT_JSON} holds list, expected a JSON object"
    assert (ckpt / RESULT_JSON).read_text() == "[1, 2]"


def test_result_json_optional_for_an_adapter_required_for_a_node_result(ckpt):
    (ckpt / RESULT_JSON).unlink()
    assert read_adapter_dir(ckpt).result == {}  # a merged adapter has none
    assert read_node_result(ckpt, required=False) == {}
    with pytest.raises(InvalidAdapter, match="missing result.json"):
        read_node_result(ckpt)


def test_peft_can_load_what_we_accept(trained, ckpt):
    from peft import PeftModel

    from mloc_dagster.core.models.families import load_base_model
    read_adapter_dir(ckpt, base_model=trained[0])
    model = PeftModel.from_pretrained(load_base_model(trained[0]).model, ckpt)
    assert sum("lora_A" in n for n, _ in model.named_parameters()) == 5
