"""The ASR track's adapter job (``train_adapter``): its ``Workload`` for the loop every track
shares (``core/training/job.py``: where a job starts, exact resume, the timebox, checkpoints).

An ASR job trains the base model on the dialect's features (cached per feature extractor,
``core/data/features.py``) through its family (``core/models/families.py``: the CTC models, Whisper)
and evaluates CER/WER on the dev split with the family's decoding.

**Keeping the base.** An adapter must improve its dialect without forgetting the base dialect (the
gate allows ≤ 5 % relative regression). Two mechanisms, both on base-dialect *rehearsal* rows
(``rehearsal_dataset_path``) mixed into every epoch (``rehearsal_fraction`` of it): the CTC loss
on them, and ``distill_weight`` × a distillation loss (KL divergence of the adapted model's output
distribution per frame, or per token for Whisper, from the frozen base model's, i.e. the model with the adapter
disabled) that keeps the base dialect's outputs where they were.

Base pre-training (``core/models/pretrain.py``) uses the same stream, step and timebox.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from mloc_dagster.core.data.datasets import DatasetVersion
from mloc_dagster.core.data.features import concat_feature_sets, load_features
from mloc_dagster.core.models.base import default_lora_targets
from mloc_dagster.core.models.evaluate import error_rates, transcribe
from mloc_dagster.core.models.families import load_base_model
from mloc_dagster.core.publish import model_dir_hash
from mloc_dagster.core.training.job import AdapterJob, run_adapter_job
from mloc_dagster.core.training.sample_stream import make_batch, rehearsal_rows_per_epoch
from mloc_dagster.core.training.spec import AdapterJobResult, AdapterJobSpec


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, frame_mask: torch.Tensor
                      ) -> torch.Tensor:
    """Mean over the masked frames of KL(teacher ‖ student) of the per-frame output distributions."""
    s = F.log_softmax(student_logits, dim=-1, dtype=torch.float32)
    t = F.log_softmax(teacher_logits, dim=-1, dtype=torch.float32)
    kl = (t.exp() * (t - s)).sum(-1)
    mask = frame_mask.to(kl.dtype)
    return (kl * mask).sum() / mask.sum().clamp(min=1.0)


class AsrWorkload:
    """The base model, the dialect's features (+ rehearsal rows) and its dev split."""

    def __init__(self, spec: AdapterJobSpec, device: str, log: Callable[[str], None]):
        self.spec, self.hp, self.device = spec, spec.hparams, device
        self.bm = bm = load_base_model(spec.base_model_dir, device)
        self.model = bm.model
        self.dv = DatasetVersion(spec.dataset_version_path)
        self.train = load_features(self.dv, "train", bm.feature_extractor, spec.feature_cache_dir, log)
        self.dev = load_features(self.dv, spec.eval_split, bm.feature_extractor, spec.feature_cache_dir, log)
        rehearsal = DatasetVersion(spec.rehearsal_dataset_path) if spec.rehearsal_dataset_path else None
        self.rows, self.extra_rows, self.extra_per_epoch = len(self.train), 0, 0
        if rehearsal is not None:
            extra = load_features(rehearsal, "train", bm.feature_extractor, spec.feature_cache_dir, log)
            self.extra_rows = len(extra)
            self.extra_per_epoch = rehearsal_rows_per_epoch(self.rows, self.hp.rehearsal_fraction)
            self.train = concat_feature_sets(self.train, extra)
        self.labels = [bm.family.labels(t, self.dv.dialect) for t in self.train.texts[:self.rows]]
        self.labels += [bm.family.labels(t, rehearsal.dialect) for t in self.train.texts[self.rows:]]
        self.identity = {"base_model_hash": model_dir_hash(spec.base_model_dir),
                         "base_model_dir": str(spec.base_model_dir), "dataset_version": self.dv.version,
                         "dialect": self.dv.dialect, "rehearsal_version": rehearsal.version if rehearsal else None,
                         "rehearsal_dialect": rehearsal.dialect if rehearsal else None}
        self.default_targets = default_lora_targets(bm.model)
        self.dev_frames = self.dev.frames

    def batch(self, idx: list[int], device: str) -> tuple[dict, int]:
        return make_batch(self.train, self.labels, idx, device)

    def loss(self, model, batch: dict, idx: list[int]) -> torch.Tensor:
        out = self.bm.family.forward(model, batch)
        if not self.hp.distill_weight:
            return out.loss
        rows = [k for k, i in enumerate(idx) if i >= self.rows]  # rehearsal rows of this batch
        if not rows:
            return out.loss
        sel = torch.tensor(rows, device=out.logits.device)
        with torch.no_grad(), model.disable_adapter():
            model.eval()  # the teacher is the base model as deployed: no dropout, no masking
            teacher = self.bm.family.forward(model, {k: v[sel] for k, v in batch.items()}, with_loss=False).logits
            model.train()
        return out.loss + self.hp.distill_weight * distillation_loss(out.logits[sel], teacher, out.mask[sel])

    def evaluate(self, model) -> dict:
        rates = error_rates(transcribe(model, self.bm.family, self.dev, self.spec.eval_batch_size, self.device))
        return {"dev_cer": rates["cer"], "dev_wer": rates["wer"]}

    def result(self, job: AdapterJob, common: dict, metrics: dict) -> AdapterJobResult:
        jobs = job.ts.jobs
        previous_cer = next((j["dev_cer"] for j in reversed(jobs[:-1]) if j.get("dev_cer") is not None), None)
        return AdapterJobResult(
            **common, **metrics, feature_cache_hit=self.train.cache_hit and self.dev.cache_hit,
            dev_speakers=len(set(self.dev.speakers)), dev_utterances=len(self.dev),
            dev_cer_delta=metrics["dev_cer"] - previous_cer if previous_cer is not None else None,
            learning_curve=[{"job_index": j.get("job_index"), "total_samples": j.get("total_samples"),
                             "dev_cer": j.get("dev_cer")} for j in jobs])


def train_adapter(spec: AdapterJobSpec) -> AdapterJobResult:
    """Run one timeboxed ASR LoRA adapter job (``core/training/job.py`` has the rules)."""
    return run_adapter_job(spec, AsrWorkload, AdapterJobResult)
