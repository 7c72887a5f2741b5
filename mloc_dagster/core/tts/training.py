"""The TTS track's adapter job (``train_tts_adapter``): its ``Workload`` for the loop every
track shares (``core/training/job.py``: where a job starts, exact resume, the timebox,
checkpoints). A TTS job trains the acoustic model on the dialect's rows — token durations from the
forced alignment of the run's *aligner* ASR, whose hash is part of the job's identity, so a
checkpoint resumes only on durations from the same aligner — and evaluates the dev frame L1
(teacher forced).

**The broken control.** ``hparams.shuffle_texts`` trains on recordings paired with other
utterances' texts (``data.shuffle_texts``): a deliberately broken adapter for the stop-loss tests.
It is an hparam, so a run cannot switch it between jobs.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mloc_dagster.core.adapters.format import read_adapter_dir
from mloc_dagster.core.data.datasets import DatasetVersion
from mloc_dagster.core.publish import model_dir_hash
from mloc_dagster.core.training.job import AdapterJob, run_adapter_job
from mloc_dagster.core.training.spec import JobResult, JobSpec
from mloc_dagster.core.tts.align import load_frame_asr
from mloc_dagster.core.tts.data import load_rows, make_tts_batch, shuffle_texts
from mloc_dagster.core.tts.hparams import TtsAdapterHParams
from mloc_dagster.core.tts.model import DEFAULT_TTS_LORA_TARGETS, load_tts_model
from mloc_dagster.core.tts.pretrain import frame_l1


@dataclass
class TtsAdapterJobSpec(JobSpec):
    """A TTS adapter job; the loop's fields (timebox, resume_from, ...) are ``JobSpec``'s."""

    base_tts_dir: str | Path
    aligner_dir: str | Path  # the base ASR whose forced alignment gives the durations
    dataset_version_path: str | Path
    out_dir: str | Path
    hparams: TtsAdapterHParams = field(default_factory=TtsAdapterHParams)
    eval_limit: int = 32


@dataclass(kw_only=True)
class TtsAdapterJobResult(JobResult):
    dev_frame_l1: float
    aligner_hash: str
    track: str = "tts"


class TtsWorkload:
    """The base TTS, the dialect's rows (durations from the aligner ASR) and its dev split."""

    def __init__(self, spec: TtsAdapterJobSpec, device: str, _log: Callable[[str], None]):
        self.hp, self.device = spec.hparams, device
        self.tm = load_tts_model(spec.base_tts_dir, device)
        self.model = self.tm.model
        aligner = load_frame_asr(spec.aligner_dir)
        dv = DatasetVersion(spec.dataset_version_path)
        self.train = load_rows(dv, "train", aligner, self.hp.train_limit)
        if self.hp.shuffle_texts:
            self.train = shuffle_texts(self.train, self.hp.seed)
        self.dev = load_rows(dv, spec.eval_split, aligner, spec.eval_limit)
        self.identity = {"base_model_hash": model_dir_hash(spec.base_tts_dir), "dataset_version": dv.version,
                         "dialect": dv.dialect, "rehearsal_version": None,
                         "aligner_hash": model_dir_hash(spec.aligner_dir), "track": "tts"}
        self.rows, self.extra_rows, self.extra_per_epoch = len(self.train), 0, 0
        self.default_targets = DEFAULT_TTS_LORA_TARGETS
        self.dev_frames = sum(len(f) for f in self.dev.frames)

    def batch(self, idx: list[int], device: str) -> tuple[dict, int]:
        return make_tts_batch(self.train, self.tm.stats, idx, device)

    def loss(self, model, batch: dict, idx: list[int]) -> torch.Tensor:
        return model(**batch, return_dict=True).loss

    def evaluate(self, model) -> dict:
        # frame_l1 reads no RNG (dropout off); tm.model carries the LoRA layers peft injected
        return {"dev_frame_l1": frame_l1(self.tm, self.dev, device=self.device)}

    def result(self, job: AdapterJob, common: dict, metrics: dict) -> TtsAdapterJobResult:
        return TtsAdapterJobResult(**common, **metrics, aligner_hash=self.identity["aligner_hash"])


def train_tts_adapter(spec: TtsAdapterJobSpec) -> TtsAdapterJobResult:
    """Run one timeboxed TTS LoRA job (``core/training/job.py`` has the rules)."""
    return run_adapter_job(spec, TtsWorkload, TtsAdapterJobResult)


def load_tts_adapter(base_tts_dir: str | Path, adapter_dir: str | Path, device: str = "cpu"):
    """The base TTS with an adapter checkpoint's LoRA merged in (a ``TtsModel``, eval mode): what
    a candidate synthesizes with. The checkpoint is validated first (``core/adapters/format.py``: no
    pickle or code, LoRA A/B pairs only, shapes of this base model)."""
    from peft import PeftModel

    tm = load_tts_model(base_tts_dir, device)
    read_adapter_dir(adapter_dir, base_model=tm.model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(tm.model, str(adapter_dir), is_trainable=False)
    tm.model = peft_model.merge_and_unload().eval()
    tm.path = Path(adapter_dir)
    return tm
