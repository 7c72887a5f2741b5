"""The contract of a training job's run config, per track, and what each hparam may be.

``AdapterJobConfig`` (ASR, ``adapter_checkpoint``) and ``TtsAdapterJobConfig`` (TTS,
``tts_adapter_checkpoint``) are what the chain sends each job: what the chain sets, plus the
track's hparams derived from the core dataclass that declares them (``AdapterHParams``,
``TtsAdapterHParams``), defaults included. What a training run may set per
job is every field but the ones the chain sets itself; the one rule that checks them is the
track's (``assets/tracks.py: Track.validate``), used by `mloc run start`, the launchpad,
searches and pipelines alike.
"""

from dataclasses import MISSING, fields
from typing import Any, TypeVar, get_args, get_type_hints

import dagster as dg
import pydantic

from mloc_dagster.core.training.spec import PRECISIONS, AdapterHParams
from mloc_dagster.core.tts.hparams import TtsAdapterHParams

H = TypeVar("H")


class TrainingJobFields(dg.Config):
    """What the chain sets in every training job (``run_id``, ``job_index``, ``timebox_s``) and the
    job's own limits; the hparams come from the track's core dataclass (``config_from``)."""

    run_id: str
    job_index: int = 0  # the chain's job; of a distributed run: the round
    timebox_s: int = 3600
    checkpoint_every_s: float = 300.0
    max_steps: int = 0  # 0: train until the timebox; >0: a fixed-size job (tests, benchmarks)


class SliceFields(TrainingJobFields):
    slice_index: int = -1  # >= 0: this is slice N of round job_index of a distributed run


def config_from(name: str, declared: type, base: type[dg.Config] = dg.Config,
                overrides: dict[str, tuple[Any, Any]] | None = None) -> type[dg.Config]:
    """A Dagster config class: ``base``'s fields plus every field of the core dataclass
    ``declared``, with its type and its default, so the core declares each field once and the
    config repeats none. ``overrides`` gives (type, default) where the core's type is not one a
    run config can hold (a union, an abstract mapping)."""
    hints = get_type_hints(declared)
    fields_ = {f.name: (hints[f.name], f.default if f.default is not MISSING else
                        f.default_factory() if f.default_factory is not MISSING else ...)
               for f in fields(declared)}
    return pydantic.create_model(name, __base__=base, __module__=__name__,
                                 __doc__=f"A run config: {base.__name__} + {declared.__name__}.",
                                 **{**fields_, **(overrides or {})})


def core_hparams(config: dg.Config, hparams: type[H]) -> H:
    """The core's hparams dataclass from a job's config. An empty value of an optional field (``[]``
    or ``0``, as runs pinned before the field was optional hold it) is None: the model's default."""
    hints = get_type_hints(hparams)
    values: dict[str, Any] = {}
    for f in fields(hparams):
        value = getattr(config, f.name)
        values[f.name] = None if type(None) in get_args(hints[f.name]) and not value else value
    return hparams(**values)


AdapterJobConfig = config_from("AdapterJobConfig", AdapterHParams, SliceFields)
TtsAdapterJobConfig = config_from("TtsAdapterJobConfig", TtsAdapterHParams, TrainingJobFields)


class InvalidHParams(ValueError):
    pass


# What a job can train with, checked when a run starts rather than in its first job.
_AT_LEAST_0 = (">= 0", lambda v: v >= 0)
_ABOVE_0 = ("> 0", lambda v: v > 0)
_FRACTION = ("within [0, 1)", lambda v: 0 <= v < 1)
ASR_LIMITS = {"r": (">= 1", lambda v: v >= 1), "alpha": _ABOVE_0, "dropout": _FRACTION, "lr": _ABOVE_0,
              "batch_size": (">= 1", lambda v: v >= 1), "warmup_steps": _AT_LEAST_0, "seed": _AT_LEAST_0,
              "checkpoint_every_s": _ABOVE_0, "max_steps": _AT_LEAST_0, "rehearsal_fraction": _FRACTION,
              "distill_weight": _AT_LEAST_0, "weight_decay": _AT_LEAST_0, "max_grad_norm": _ABOVE_0,
              "train_limit": (">= 0", lambda v: v is None or v >= 0),
              "precision": (f"one of {', '.join(PRECISIONS)}", lambda v: v in PRECISIONS)}
TTS_LIMITS = {**ASR_LIMITS, "dropout": ("< 1 (< 0: the model's default)", lambda v: v < 1)}
