"""The contract of a training job's run config, per track, and what each hparam may be.

``AdapterJobConfig`` (ASR, ``adapter_checkpoint``) and ``TtsAdapterJobConfig`` (TTS,
``tts_adapter_checkpoint``) are what the chain sends each job. What a training run may set per
job is every field but the ones the chain sets itself; the one rule that checks them is the
track's (``assets/tracks.py: Track.validate``), used by `mloc run start`, the launchpad,
searches and pipelines alike.
"""

import dagster as dg


class AdapterJobConfig(dg.Config):
    run_id: str
    job_index: int = 0  # the chain's job; of a distributed run: the round
    slice_index: int = -1  # >= 0: this is slice N of round job_index of a distributed run
    timebox_s: int = 3600
    checkpoint_every_s: float = 300.0
    max_steps: int = 0  # 0: train until the timebox; >0: a fixed-size job (tests, benchmarks)
    # LoRA and optimizer hyper-parameters (defaults: core.training.AdapterHParams)
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.1
    target_modules: list[str] = []  # empty: the base model's default LoRA targets
    lr: float = 3e-3
    batch_size: int = 16
    warmup_steps: int = 20
    seed: int = 0
    # Share of each epoch drawn from the base dialect's dataset, against forgetting it (0: off),
    # and the weight of distillation to the frozen base on those rows (0: off).
    rehearsal_fraction: float = 0.75
    distill_weight: float = 3.0


class TtsAdapterJobConfig(dg.Config):
    run_id: str
    job_index: int = 0
    timebox_s: int = 3600
    checkpoint_every_s: float = 300.0
    max_steps: int = 0  # 0: train until the timebox; >0: a fixed-size job (tests, benchmarks)
    # LoRA and optimizer hyper-parameters (defaults: core.tts.training.TtsAdapterHParams)
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = []  # empty: the TTS model's default LoRA targets
    lr: float = 3e-3
    batch_size: int = 16
    warmup_steps: int = 10
    seed: int = 0
    train_limit: int = 0  # > 0: train on the first N rows only (tests, short demos)
    # A deliberately broken control: recordings paired with other utterances' texts. It exists so
    # the stop-loss can be shown to fire through the real chain; never set it for real work.
    shuffle_texts: bool = False


class InvalidHParams(ValueError):
    pass


# What a job can train with, checked when a run starts rather than in its first job.
_AT_LEAST_0 = (">= 0", lambda v: v >= 0)
_ABOVE_0 = ("> 0", lambda v: v > 0)
_FRACTION = ("within [0, 1)", lambda v: 0 <= v < 1)
ASR_LIMITS = {"r": (">= 1", lambda v: v >= 1), "alpha": _ABOVE_0, "dropout": _FRACTION, "lr": _ABOVE_0,
              "batch_size": (">= 1", lambda v: v >= 1), "warmup_steps": _AT_LEAST_0, "seed": _AT_LEAST_0,
              "checkpoint_every_s": _ABOVE_0, "max_steps": _AT_LEAST_0, "rehearsal_fraction": _FRACTION,
              "distill_weight": _AT_LEAST_0, "train_limit": _AT_LEAST_0}
TTS_LIMITS = {**ASR_LIMITS, "dropout": ("< 1 (< 0: the model's default)", lambda v: v < 1)}
