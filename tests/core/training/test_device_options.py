"""How a job uses a device (``core/training/spec.py: DeviceOptions``), on this CPU machine: gradient
checkpointing trains exactly as without it (LoRA weights inside checkpointed layers get their
gradients); a CUDA precision is fp32 on CPU; the fp16 loss scaler's step equals the unscaled one; a
precision the job cannot use is refused when the run starts; and the arbiter is asked for the
memory the run's previous job measured. (Autocast itself needs a GPU: run on the device machine
when one is lent.)"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mloc_dagster.assets.training.step import MEMORY_MARGIN, memory_need
from mloc_dagster.core.training.asr import train_adapter
from mloc_dagster.core.training.runtime import train_step
from mloc_dagster.core.training.spec import AdapterHParams, AdapterJobSpec
from tests.core.models.families import save_tiny_checkpoint

HPARAMS = AdapterHParams(r=4, alpha=8.0, batch_size=4, warmup_steps=1, seed=3, lr=3e-3)


def _job(base: Path, corpus, out: Path, hparams: AdapterHParams, log=None):
    return train_adapter(AdapterJobSpec(base, corpus.scottish, out, timebox_s=600, max_steps=3, hparams=hparams,
                                        feature_cache_dir=corpus.feature_cache, log=log))


def test_gradient_checkpointing_and_a_cuda_precision_train_exactly_as_plain_fp32_on_cpu(corpus, tmp_path):
    base = save_tiny_checkpoint("wav2vec2", tmp_path / "base")
    plain = _job(base, corpus, tmp_path / "plain", HPARAMS)
    logs: list[str] = []
    options = _job(base, corpus, tmp_path / "options",
                   replace(HPARAMS, gradient_checkpointing=True, precision="bf16"), logs.append)
    assert options.loss_history == pytest.approx(plain.loss_history, abs=1e-6)
    assert not any("does not support" in line for line in logs)


def test_a_model_without_gradient_checkpointing_trains_without_it_and_says_so(corpus, pretrained_base, tmp_path):
    logs: list[str] = []
    result = _job(pretrained_base[0], corpus, tmp_path / "tiny", replace(HPARAMS, gradient_checkpointing=True), logs.append)
    assert result.steps == 3
    assert any("gradient_checkpointing: TinyCtcForCTC does not support it" in line for line in logs)


def test_the_fp16_loss_scaler_step_equals_the_unscaled_step():
    torch.manual_seed(0)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    models = [torch.nn.Linear(4, 1) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    for model, scaler in zip(models, (None, torch.amp.GradScaler("cpu", init_scale=2.0**12))):
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        for _ in range(3):
            train_step(lambda m=model: torch.nn.functional.mse_loss(m(x), y), opt, list(model.parameters()), 1.0,
                       scaler=scaler)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(models[0].parameters(), models[1].parameters()))


def test_an_unknown_precision_is_refused_when_the_run_starts():
    from mloc_dagster.assets.tracks import track_of
    from mloc_dagster.assets.training.hparams import InvalidHParams

    with pytest.raises(InvalidHParams, match="precision must be one of fp32, bf16, fp16 .got 'fp8'"):
        track_of("asr").validate({"precision": "fp8"})
    assert track_of("asr").validate({"precision": "bf16", "gradient_checkpointing": True})["precision"] == "bf16"


def test_the_arbiter_is_asked_for_the_memory_the_previous_job_measured(corpus, pretrained_base, tmp_path):
    previous = _job(pretrained_base[0], corpus, tmp_path / "job0", HPARAMS)
    assert memory_need(str(previous.path)) == {}  # a CPU job measured no CUDA peak: the policy's default
    result_json = Path(previous.path) / "result.json"
    result = json.loads(result_json.read_text())
    result_json.write_text(json.dumps({**result, "peak_cuda_mb": 2000.0}))  # as on CUDA
    assert memory_need(str(previous.path)) == {"min_free_mb": round(2000 * MEMORY_MARGIN)}
    assert memory_need(None) == {}
    result_json.write_text(json.dumps({**result, "peak_cuda_mb": "lots"}))
    assert memory_need(str(previous.path)) == {}
