"""The hyper-parameters of a TTS adapter job, and their defaults: the only place they are declared
(the Dagster job config derives from them, ``assets/training/hparams.py``). No heavy imports."""

from __future__ import annotations

from dataclasses import dataclass

from mloc_dagster.core.training.spec import DeviceOptions


@dataclass
class TtsAdapterHParams(DeviceOptions):
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | None = None  # None: DEFAULT_TTS_LORA_TARGETS
    lr: float = 3e-3
    batch_size: int = 16
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    shuffle_texts: bool = False  # the broken control (core/tts/training.py)
    train_limit: int | None = None  # cap on training rows (tests, short demos)
