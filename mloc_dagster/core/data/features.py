"""Log-mel features, their on-disk cache, and the CTC batch collate.

Features are exactly what transformers' ``SeamlessM4TFeatureExtractor`` computes (the front end
of w2v-BERT 2.0), constructed locally, never downloaded: 80 Kaldi-style log-mel bins every 10 ms,
normalized per utterance and mel bin, then two consecutive frames stacked (``stride=2``) into one
160-dim vector every 20 ms (50 Hz). Keeping the w2v-BERT front end means a real w2v-BERT CTC
checkpoint and the built-in tiny model read the same ``input_features``.

Feature extraction is a large share of CPU time in short jobs, and every hourly job of a training
run reads the same pinned dataset version. So features are cached per (dataset version, split,
extractor config, transformers version): one safetensors file per split holding all frames of the
split concatenated (``features`` [frames, 160] float32) plus row ``offsets``, with utterance ids,
transcripts and speakers as JSON in the safetensors metadata. Writes are atomic (temp file +
rename), so concurrent jobs on one node at worst compute the same file twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import SeamlessM4TFeatureExtractor

from mloc_dagster.core.data.datasets import DatasetVersion, Utterance

SAMPLING_RATE = 16_000
FEATURES_FORMAT = "1"  # bump when the cache layout or feature computation changes meaning
FRAME_RATE_HZ = 50  # after stride-2 stacking of 10 ms frames


def default_feature_extractor() -> SeamlessM4TFeatureExtractor:
    """The w2v-BERT 2.0 front end, built from arguments (no hub access)."""
    return SeamlessM4TFeatureExtractor(feature_size=80, num_mel_bins=80, sampling_rate=SAMPLING_RATE,
                                       stride=2, padding_value=0.0)


def feature_dim(fe) -> int:
    """Values per row: 160 for the stacked log-mel front end, 1 for a waveform extractor."""
    return int(fe.num_mel_bins * fe.stride) if hasattr(fe, "num_mel_bins") else int(fe.feature_size)


def extractor_fingerprint(fe: SeamlessM4TFeatureExtractor) -> str:
    config = fe.to_dict()
    config = {k: v for k, v in config.items() if k not in ("processor_class",)}
    blob = json.dumps({"config": config, "transformers": transformers.__version__,
                       "format": FEATURES_FORMAT}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def extract(fe, audios: Sequence[np.ndarray], chunk: int = 32) -> list[np.ndarray]:
    """Per-utterance rows [frames, dim] float32 of the extractor's model input: log-mel
    ``input_features`` [frames, 160], or a waveform extractor's ``input_values`` as [samples, 1].

    The extractors normalize each utterance before padding, so a batched call gives the same
    numbers as one call per utterance; batching (of similar lengths, to pad little) is ~5x faster.
    An extractor with a fixed window (Whisper's ``n_samples``) computes it padded to that window, as
    the model sees it, and the rows keep the utterance's frames (``core/models/whisper.py`` pads
    them back).
    """
    order = sorted(range(len(audios)), key=lambda i: len(audios[i]))
    out: list[np.ndarray | None] = [None] * len(audios)
    for start in range(0, len(order), chunk):
        idx = order[start:start + chunk]
        enc = fe([audios[i] for i in idx], sampling_rate=fe.sampling_rate, return_tensors="np",
                 padding="max_length" if hasattr(fe, "n_samples") else True, return_attention_mask=True)
        feats, mask = enc[fe.model_input_names[0]], enc["attention_mask"]
        if feats.ndim == 3 and feats.shape[1] != mask.shape[-1]:  # [B, mel, T] (Whisper) → [B, T, mel]
            feats = feats.transpose(0, 2, 1)
        if mask.shape[-1] == 0:  # no usable mask (SeamlessM4T with stride 1): one call per utterance, unpadded
            for i in idx:
                out[i] = _rows(fe([audios[i]], sampling_rate=fe.sampling_rate, return_tensors="np")[
                    fe.model_input_names[0]][0])
            continue
        for row, i in enumerate(idx):
            out[i] = _rows(feats[row, :_frames_kept(fe, len(audios[i]), int(mask[row].sum()))])
    return out  # type: ignore[return-value]


def _frames_kept(fe, samples: int, masked: int) -> int:
    """Frames of an utterance to keep: its attention mask's, and with a fixed window also the frames
    whose STFT window (``n_fft`` wide, centred) still reaches into the audio, so that padding them
    back (``core/models/whisper.py``) gives exactly the extractor's window."""
    if not hasattr(fe, "n_samples"):
        return masked
    return min(-(-(samples + fe.n_fft // 2) // fe.hop_length), fe.nb_max_frames)


def _rows(values: np.ndarray) -> np.ndarray:
    """[frames, dim] float32; a waveform's samples are rows of one value."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    return values[:, None] if values.ndim == 1 else values


@dataclass
class FeatureSet:
    """Features of one split: all frames concatenated, row ``i`` is ``features[offsets[i]:offsets[i+1]]``."""

    utt_ids: list[str]
    texts: list[str]
    speakers: list[str]
    features: torch.Tensor  # [total_frames, dim] float32
    offsets: torch.Tensor  # [n + 1] int64
    cache_hit: bool = False
    cache_path: Path | None = None
    seconds: float = 0.0  # time spent loading or computing
    dialect: str | None = None  # the dataset version's (a seq2seq model is told its language)

    def __len__(self) -> int:
        return len(self.utt_ids)

    def item(self, i: int) -> torch.Tensor:
        return self.features[int(self.offsets[i]):int(self.offsets[i + 1])]

    @property
    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    @property
    def frames(self) -> int:
        return int(self.offsets[-1])

    @classmethod
    def from_arrays(cls, utts: Sequence[Utterance], feats: Sequence[np.ndarray], dim: int) -> FeatureSet:
        lengths = [len(f) for f in feats]
        offsets = torch.zeros(len(feats) + 1, dtype=torch.int64)
        if lengths:
            offsets[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0)
        data = (torch.from_numpy(np.concatenate(feats, axis=0)) if feats
                else torch.zeros((0, dim), dtype=torch.float32))
        return cls([u.utt_id for u in utts], [u.text for u in utts], [u.speaker for u in utts], data, offsets)


def concat_feature_sets(a: FeatureSet, b: FeatureSet) -> FeatureSet:
    """Rows of ``a`` then rows of ``b`` (e.g. a dialect's training rows plus rehearsal rows)."""
    offsets = torch.cat([a.offsets, b.offsets[1:] + a.offsets[-1]])
    return FeatureSet(a.utt_ids + b.utt_ids, a.texts + b.texts, a.speakers + b.speakers,
                      torch.cat([a.features, b.features]), offsets, cache_hit=a.cache_hit and b.cache_hit,
                      seconds=a.seconds + b.seconds)


def compute_features(utterances: Iterable[Utterance], fe: SeamlessM4TFeatureExtractor | None = None) -> FeatureSet:
    fe = fe or default_feature_extractor()
    utts = list(utterances)
    t0 = time.perf_counter()
    fs = FeatureSet.from_arrays(utts, extract(fe, [u.audio for u in utts]), feature_dim(fe))
    fs.seconds = time.perf_counter() - t0
    return fs


def cache_path(cache_dir: Path, version: DatasetVersion, split: str, fe: SeamlessM4TFeatureExtractor) -> Path:
    return Path(cache_dir) / version.dialect / version.version / f"{split}-{extractor_fingerprint(fe)[:16]}.safetensors"


def load_features(version: DatasetVersion | str | Path, split: str,
                  feature_extractor: SeamlessM4TFeatureExtractor | None = None,
                  cache_dir: str | Path | None = None,
                  log: Callable[[str], None] = lambda _msg: None) -> FeatureSet:
    """Features of one split of a dataset version, from the cache when present.

    ``FeatureSet.cache_hit`` says whether the cache answered; with ``cache_dir=None`` nothing is
    cached. A corrupt cache file is recomputed and replaced.
    """
    dv = version if isinstance(version, DatasetVersion) else DatasetVersion(version)
    fe = feature_extractor or default_feature_extractor()
    t0 = time.perf_counter()
    path = cache_path(Path(cache_dir), dv, split, fe) if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            fs = _read_cache(path)
            fs.seconds, fs.dialect = time.perf_counter() - t0, dv.dialect
            log(f"features {dv.dialect}/{dv.version}/{split}: cache hit ({len(fs)} utts, {fs.frames} frames)")
            return fs
        except (OSError, ValueError, KeyError, SafetensorError) as exc:  # torn or foreign: recompute
            log(f"features cache {path} unreadable ({exc}); recomputing")
    fs = compute_features(dv.iter_utterances(split), fe)
    fs.dialect = dv.dialect
    if path is not None:
        _write_cache(path, fs, fe, dv, split)
        fs.cache_path = path
    fs.seconds = time.perf_counter() - t0
    log(f"features {dv.dialect}/{dv.version}/{split}: computed {len(fs)} utts in {fs.seconds:.1f}s")
    return fs


def _write_cache(path: Path, fs: FeatureSet, fe: SeamlessM4TFeatureExtractor, dv: DatasetVersion,
                 split: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FEATURES_FORMAT,
        "dataset_version": dv.version, "dialect": dv.dialect, "split": split,
        "extractor": json.dumps(fe.to_dict(), sort_keys=True, default=str),
        "utterances": json.dumps({"utt_id": fs.utt_ids, "text": fs.texts, "speaker": fs.speakers}),
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    os.close(fd)
    try:
        save_file({"features": fs.features.contiguous(), "offsets": fs.offsets.contiguous()}, tmp, metadata=meta)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_cache(path: Path) -> FeatureSet:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FEATURES_FORMAT:
            raise ValueError(f"cache format {meta.get('format')!r} != {FEATURES_FORMAT}")
        features, offsets = f.get_tensor("features"), f.get_tensor("offsets")
    rows = json.loads(meta["utterances"])
    if len(rows["utt_id"]) + 1 != len(offsets) or int(offsets[-1]) != features.shape[0]:
        raise ValueError("offsets do not match the feature rows")
    return FeatureSet(rows["utt_id"], rows["text"], rows["speaker"], features, offsets,
                      cache_hit=True, cache_path=path)


def collate(features: Sequence[torch.Tensor], labels: Sequence[Sequence[int]] | None = None,
            padding_value: float = 0.0) -> dict[str, torch.Tensor]:
    """Pad a batch: ``input_features`` [B, T, D], ``attention_mask`` [B, T] (1 = frame),
    ``labels`` [B, L] padded with -100 (the HF CTC convention)."""
    batch = len(features)
    t_max = max(int(f.shape[0]) for f in features)
    dim = int(features[0].shape[1])
    x = torch.full((batch, t_max, dim), padding_value, dtype=torch.float32)
    mask = torch.zeros((batch, t_max), dtype=torch.long)
    for i, f in enumerate(features):
        x[i, :f.shape[0]] = f
        mask[i, :f.shape[0]] = 1
    out = {"input_features": x, "attention_mask": mask}
    if labels is not None:
        l_max = max(1, max(len(lab) for lab in labels))
        y = torch.full((batch, l_max), -100, dtype=torch.long)
        for i, lab in enumerate(labels):
            if len(lab):
                y[i, :len(lab)] = torch.as_tensor(lab, dtype=torch.long)
        out["labels"] = y
    return out
