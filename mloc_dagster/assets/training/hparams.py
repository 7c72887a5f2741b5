"""The contract of a training job's run config, per track, and the one rule for hparams.

``AdapterJobConfig`` (ASR, ``adapter_checkpoint``) and ``TtsAdapterJobConfig`` (TTS,
``tts_adapter_checkpoint``) are what the chain sends each job. What a training run may set per
job is every field but the ones the chain sets itself; ``validate_hparams`` and ``pin_hparams``
are used by `mloc run start`, the launchpad, searches, pipelines and the chain alike.
"""

from collections.abc import Mapping
from typing import Any

import dagster as dg
import pydantic

from mloc_dagster.core.state.schema import ASR, TTS


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


JOB_CONFIGS: dict[str, type[dg.Config]] = {ASR: AdapterJobConfig, TTS: TtsAdapterJobConfig}
CHAIN_SET = {"run_id", "job_index", "slice_index", "timebox_s"}


def hparam_keys(track: str = ASR) -> tuple[str, ...]:
    """What a training run of ``track`` may set per job."""
    return tuple(sorted(set(JOB_CONFIGS[track].model_fields) - CHAIN_SET))


HPARAM_KEYS = hparam_keys(ASR)


class InvalidHParams(ValueError):
    pass


# What a job can train with, checked when a run starts rather than in its first job.
_AT_LEAST_0 = (">= 0", lambda v: v >= 0)
_ABOVE_0 = ("> 0", lambda v: v > 0)
_FRACTION = ("within [0, 1)", lambda v: 0 <= v < 1)
LIMITS = {"r": (">= 1", lambda v: v >= 1), "alpha": _ABOVE_0, "dropout": _FRACTION, "lr": _ABOVE_0,
          "batch_size": (">= 1", lambda v: v >= 1), "warmup_steps": _AT_LEAST_0, "seed": _AT_LEAST_0,
          "checkpoint_every_s": _ABOVE_0, "max_steps": _AT_LEAST_0, "rehearsal_fraction": _FRACTION,
          "distill_weight": _AT_LEAST_0, "train_limit": _AT_LEAST_0}
TRACK_LIMITS = {ASR: LIMITS, TTS: {**LIMITS, "dropout": ("< 1 (< 0: the model's default)", lambda v: v < 1)}}


def validate_hparams(hparams: Mapping[str, Any], track: str = ASR) -> dict[str, Any]:
    """The hparams as the training job will receive them (ints stay ints, lists lists); an unknown
    or ill-typed key, or a value out of range, is an ``InvalidHParams`` naming it and what is allowed."""
    keys = hparam_keys(track)
    if not isinstance(hparams, Mapping):
        raise InvalidHParams(f"hparams must be a JSON object of name: value, e.g. {{\"lr\": 0.002, \"r\": 8}}; "
                             f"got {hparams!r}")
    unknown = sorted(set(hparams) - set(keys))
    if unknown:
        what = "hparam(s)" if track == ASR else f"{track} hparam(s)"
        raise InvalidHParams(f"unknown {what} {', '.join(unknown)}; allowed: {', '.join(keys)}")
    try:
        checked = JOB_CONFIGS[track].model_validate({"run_id": "-", **hparams})
    except pydantic.ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']} (got {e['input']!r})" for e in exc.errors())
        raise InvalidHParams(f"ill-typed hparam(s): {problems}") from exc
    values = {k: getattr(checked, k) for k in hparams}
    limits = TRACK_LIMITS[track]
    bad = [f"{k} must be {limits[k][0]} (got {v!r})" for k, v in values.items() if k in limits and not limits[k][1](v)]
    if bad:
        raise InvalidHParams(f"hparam(s) out of range: {'; '.join(bad)}")
    return values


def pin_hparams(hparams: Mapping[str, Any], track: str = ASR) -> dict[str, Any]:
    """Every hparam a job takes, the run's own values over today's defaults: a run stores this,
    so a release that changes a default never changes a run in flight (its resume checks them)."""
    fields = JOB_CONFIGS[track].model_fields
    defaults = {k: fields[k].get_default(call_default_factory=True) for k in hparam_keys(track)}
    return {**defaults, **validate_hparams(hparams, track)}
