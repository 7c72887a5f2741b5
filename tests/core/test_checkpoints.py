"""Unsafe or broken checkpoints are refused, each case with a typed error that names the problem."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mloc_dagster.core.checkpoints import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    TRAIN_STATE_TENSORS,
    InvalidAdapter,
    UnsafeCheckpoint,
    validate_checkpoint_dir,
)
from mloc_dagster.core.model import new_tiny_model, save_base_model
from mloc_dagster.core.training import AdapterHParams, AdapterJobSpec, train_adapter


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


def _edit_config(path: Path, **changes) -> None:
    config = json.loads((path / ADAPTER_CONFIG).read_text())
    config.update(changes)
    (path / ADAPTER_CONFIG).write_text(json.dumps(config))


def _edit_weights(path: Path, edit) -> None:
    weights = load_file(str(path / ADAPTER_WEIGHTS))
    edit(weights)
    save_file(weights, str(path / ADAPTER_WEIGHTS))


def test_valid_checkpoint_passes(trained, ckpt):
    base, _ = trained
    info = validate_checkpoint_dir(ckpt, base_model=base)
    assert info.r == 4 and info.has_train_state
    assert set(info.modules) == {"proj", "layers.0.mix", "layers.1.mix", "layers.2.mix", "head"}
    assert info.modules["proj"] == (320, 256) and info.scale == pytest.approx(32.0 / 4)


@pytest.mark.parametrize("name", ["adapter_model.bin", "optimizer.pt", "rng.pth", "state.pkl", "x.pickle",
                                  "last.ckpt", "modeling.py"])
def test_pickle_and_code_files_refused(ckpt, name):
    (ckpt / name).write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(UnsafeCheckpoint, match=name.replace(".", r"\.")):
        validate_checkpoint_dir(ckpt)


def test_pickle_content_under_an_innocent_name_refused(ckpt):
    (ckpt / "notes.txt").write_bytes(pickle.dumps(object, protocol=4))
    with pytest.raises(UnsafeCheckpoint, match="pickle stream"):
        validate_checkpoint_dir(ckpt)


def test_torch_save_disguised_as_safetensors_refused(ckpt):
    (ckpt / ADAPTER_WEIGHTS).unlink()
    torch.save({"w": torch.zeros(2)}, ckpt / ADAPTER_WEIGHTS)  # a zip archive holding a pickle
    with pytest.raises(UnsafeCheckpoint, match="zip archive"):
        validate_checkpoint_dir(ckpt)


def test_zip_refused(ckpt):
    with zipfile.ZipFile(ckpt / "extra.json", "w") as z:
        z.writestr("data.pkl", b"x")
    with pytest.raises(UnsafeCheckpoint, match="zip"):
        validate_checkpoint_dir(ckpt)


def test_symlink_refused(ckpt, tmp_path):
    (tmp_path / "elsewhere").write_text("{}")
    os.symlink(tmp_path / "elsewhere", ckpt / "link.json")
    with pytest.raises(UnsafeCheckpoint, match="symlink"):
        validate_checkpoint_dir(ckpt)


def test_non_finite_adapter_weights_refused(ckpt):
    def poison(w):
        w["base_model.model.proj.lora_B.weight"][0, 0] = float("nan")
    _edit_weights(ckpt, poison)
    with pytest.raises(InvalidAdapter, match="non-finite"):
        validate_checkpoint_dir(ckpt)


def test_non_finite_train_state_refused(ckpt):
    state = load_file(str(ckpt / TRAIN_STATE_TENSORS))
    key = next(k for k in state if k.startswith("optim.") and k.endswith("exp_avg"))
    state[key][0] = float("inf")
    save_file(state, str(ckpt / TRAIN_STATE_TENSORS))
    with pytest.raises(InvalidAdapter, match="non-finite"):
        validate_checkpoint_dir(ckpt)


def test_shape_mismatch_with_base_refused(trained, ckpt):
    def widen(w):
        w["base_model.model.proj.lora_A.weight"] = torch.zeros(4, 160)
    _edit_weights(ckpt, widen)
    validate_checkpoint_dir(ckpt)  # consistent on its own ...
    with pytest.raises(InvalidAdapter, match="proj: adapter shape in=160"):
        validate_checkpoint_dir(ckpt, base_model=trained[0])  # ... but not for this base model


def test_target_module_missing_from_base_refused(trained, ckpt):
    def rename(w):
        for ab in "AB":
            w[f"base_model.model.decoder.lora_{ab}.weight"] = w.pop(f"base_model.model.head.lora_{ab}.weight")
    _edit_weights(ckpt, rename)
    _edit_config(ckpt, target_modules=["proj", "mix", "decoder"])
    with pytest.raises(InvalidAdapter, match="'decoder' matches no linear layer"):
        validate_checkpoint_dir(ckpt, base_model=trained[0])


def test_weights_outside_target_modules_refused(ckpt):
    _edit_config(ckpt, target_modules=["proj", "mix"])
    with pytest.raises(InvalidAdapter, match="head has LoRA weights but is not among target_modules"):
        validate_checkpoint_dir(ckpt)


def test_full_weights_smuggled_in_refused(ckpt):
    def smuggle(w):
        w["base_model.model.head.weight"] = torch.zeros(29, 256)
    _edit_weights(ckpt, smuggle)
    with pytest.raises(InvalidAdapter, match="not a LoRA A/B weight"):
        validate_checkpoint_dir(ckpt)


def test_rank_mismatch_refused(ckpt):
    _edit_config(ckpt, r=8)
    with pytest.raises(InvalidAdapter, match="rank 4/4 in the weights but r=8"):
        validate_checkpoint_dir(ckpt)


@pytest.mark.parametrize("changes, error, match", [
    ({"trust_remote_code": True}, UnsafeCheckpoint, "keys outside the allowed set"),
    ({"auto_mapping": {"base_model_class": "X", "parent_library": "evil.module"}}, UnsafeCheckpoint, "auto_mapping"),
    ({"megatron_core": "os"}, UnsafeCheckpoint, "megatron_core"),
    ({"modules_to_save": ["head"]}, InvalidAdapter, "modules_to_save"),
    ({"use_dora": True}, InvalidAdapter, "use_dora"),
    ({"peft_type": "IA3"}, InvalidAdapter, "peft_type"),
    ({"target_modules": ".*"}, InvalidAdapter, "target_modules"),
])
def test_adapter_config_outside_allowed_keys_or_values_refused(ckpt, changes, error, match):
    _edit_config(ckpt, **changes)
    with pytest.raises(error, match=match):
        validate_checkpoint_dir(ckpt)


def test_missing_or_broken_files_refused(ckpt):
    (ckpt / ADAPTER_CONFIG).write_text("{not json")
    with pytest.raises(InvalidAdapter, match="not valid JSON"):
        validate_checkpoint_dir(ckpt)
    (ckpt / ADAPTER_CONFIG).unlink()
    with pytest.raises(InvalidAdapter, match="missing adapter_config.json"):
        validate_checkpoint_dir(ckpt)


def test_peft_can_load_what_we_accept(trained, ckpt):
    from peft import PeftModel

    from mloc_dagster.core.model import load_base_model
    validate_checkpoint_dir(ckpt, base_model=trained[0])
    model = PeftModel.from_pretrained(load_base_model(trained[0]).model, ckpt)
    assert sum("lora_A" in n for n, _ in model.named_parameters()) == 5
