"""The training tracks, declared once: what differs between ASR and TTS at the Dagster layer.

The code written once for every track -- the run requests (``runs/requests.py``), the chain
(``sensors/training_chain.py``), starting a run (``runs/service.py``), the candidate's gate and
promotion (``assets/candidates/``), hparams validation -- asks a run's ``Track`` instead of
switching on its name. A new track is one more entry in ``TRACKS`` (its name also in
``core/state/schema.py: TRACKS``, which the store checks) plus its own assets and core.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import dagster as dg
import pydantic

from mloc_dagster.assets.training.hparams import (
    ASR_LIMITS,
    TTS_LIMITS,
    AdapterJobConfig,
    InvalidHParams,
    TtsAdapterJobConfig,
)
from mloc_dagster.core.state.schema import ASR, DISTRIBUTED, HYPERPARAMETER, SINGLE, TTS
from mloc_dagster.core.training.spec import AdapterHParams
from mloc_dagster.core.tts.hparams import TtsAdapterHParams

# What the chain sets in a training job's run config itself; every other field is an hparam.
CHAIN_SET = frozenset({"run_id", "job_index", "slice_index", "timebox_s"})


@dataclass(frozen=True)
class Track:
    name: str
    base_asset: str  # the base model a run pins: the latest materialization when it starts
    train_job: str  # one timeboxed training job of a run
    train_op: str  # the asset of that job, whose config the run request fills
    candidate_job: str  # merge, gate, promotion
    hparams: type  # the core dataclass that declares its hparams and their defaults
    job_config: type[dg.Config]  # the training job's run config: those hparams and what the chain sets
    limits: Mapping[str, tuple[str, Callable[[Any], bool]]]  # hparam -> (what is allowed, check)
    kinds: tuple[str, ...]  # the run kinds it trains
    warm_start: bool  # a run may start from an adapter of the dialect (--from)
    rehearsal: bool  # a run rehearses the base dialect's dataset against forgetting it
    stop_loss: bool  # a failed candidate pauses the run (docs/tts.md)
    subdir: tuple[str, ...]  # its adapters under adapters/ and adapters/production/
    cursor_prefix: str  # of the chain sensor's cursor keys for its jobs' failures
    label: str  # how messages name its hparams: "" or "tts "

    @property
    def hparam_keys(self) -> tuple[str, ...]:
        """What a training run of this track may set per job."""
        return tuple(sorted(set(self.job_config.model_fields) - CHAIN_SET))

    def validate(self, hparams: Mapping[str, Any]) -> dict[str, Any]:
        """The hparams as the training job will receive them (ints stay ints, lists lists); an unknown
        or ill-typed key, or a value out of range, is an ``InvalidHParams`` naming it and what is allowed."""
        if not isinstance(hparams, Mapping):
            raise InvalidHParams(f"hparams must be a JSON object of name: value, e.g. {{\"lr\": 0.002, \"r\": 8}}; "
                                 f"got {hparams!r}")
        unknown = sorted(set(hparams) - set(self.hparam_keys))
        if unknown:
            raise InvalidHParams(f"unknown {self.label}hparam(s) {', '.join(unknown)}; "
                                 f"allowed: {', '.join(self.hparam_keys)}")
        try:
            checked = self.job_config.model_validate({"run_id": "-", **hparams})
        except pydantic.ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']} (got {e['input']!r})"
                                 for e in exc.errors())
            raise InvalidHParams(f"ill-typed hparam(s): {problems}") from exc
        values = {k: getattr(checked, k) for k in hparams}
        bad = [f"{k} must be {self.limits[k][0]} (got {v!r})" for k, v in values.items()
               if k in self.limits and not self.limits[k][1](v)]
        if bad:
            raise InvalidHParams(f"hparam(s) out of range: {'; '.join(bad)}")
        return values

    def pin(self, hparams: Mapping[str, Any]) -> dict[str, Any]:
        """Every hparam a job takes, the run's own values over today's defaults: a run stores this,
        so a release that changes a default never changes a run in flight (its resume checks them)."""
        fields = self.job_config.model_fields
        defaults = {k: fields[k].get_default(call_default_factory=True) for k in self.hparam_keys}
        return {**defaults, **self.validate(hparams)}


TRACKS: dict[str, Track] = {t.name: t for t in (
    Track(ASR, base_asset="base_model", train_job="train_adapter_job", train_op="adapter_checkpoint",
          candidate_job="candidate_job", hparams=AdapterHParams, job_config=AdapterJobConfig, limits=ASR_LIMITS,
          kinds=(SINGLE, DISTRIBUTED, HYPERPARAMETER), warm_start=True, rehearsal=True, stop_loss=False,
          subdir=(), cursor_prefix="", label=""),
    Track(TTS, base_asset="tts_base_model", train_job="tts_train_adapter_job", train_op="tts_adapter_checkpoint",
          candidate_job="tts_candidate_job", hparams=TtsAdapterHParams,
          job_config=TtsAdapterJobConfig, limits=TTS_LIMITS,
          kinds=(SINGLE,), warm_start=False, rehearsal=False, stop_loss=True,
          subdir=("tts",), cursor_prefix="tts_", label="tts "),
)}


def track_of(name: str | None) -> Track:
    """The track named ``name`` (None: asr, a run stored before tracks existed)."""
    try:
        return TRACKS[name or ASR]
    except KeyError:
        raise ValueError(f"track {name!r} is not one of {', '.join(TRACKS)}") from None


def validate_hparams(hparams: Mapping[str, Any], track: str = ASR) -> dict[str, Any]:
    return track_of(track).validate(hparams)


def pin_hparams(hparams: Mapping[str, Any], track: str = ASR) -> dict[str, Any]:
    return track_of(track).pin(hparams)
