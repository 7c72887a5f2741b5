"""What the simulated nodes of ``bench/pool.py`` hand in: honest work, or one of four attacks.

- ``honest``: trains its slice (``AdapterJobSpec.segments``) from the round's start adapter;
- ``shuffle``: the same, on a copy of the dataset whose *training* transcripts are permuted
  between utterances (``shuffled_copy``) -- a node with broken data, reporting its real dev CER;
- ``noise``: trains nothing, returns start + a random update whose norm equals the median honest
  update of the round (a plausible norm), and reports the median honest dev CER;
- ``scale``: trains its slice honestly, returns start + k × its update, reports its real dev CER;
- ``freeride``: trains nothing, returns the start adapter unchanged, reports the median honest
  dev CER.

Forged adapters are written exactly as LoRA factors: start + c · U needs rank up to 2r, so the
factors of each term are concatenated (r' = Σ r, lora_alpha = scale · r' keeps the scale).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mloc_dagster.core.adapters.format import RESULT_JSON
from mloc_dagster.core.adapters.lora import Adapter, save_adapter
from mloc_dagster.core.data.batches import SHARD_SCHEMA
from mloc_dagster.core.data.datasets import DatasetVersion
from mloc_dagster.core.data.features import cache_path, default_feature_extractor
from mloc_dagster.core.merging.screening import update_norm, updates

BEHAVIOURS = ("honest", "shuffle", "noise", "scale", "freeride")
TRAINS = {"honest", "shuffle", "scale"}


def shuffled_copy(version_path: Path, out_root: Path, seed: int, feature_cache: Path | None = None) -> Path:
    """A dataset version like ``version_path`` (same rows, same order, same splits) whose
    training transcripts are permuted between utterances; dev and test are untouched, so a node
    training on it reports its true dev CER. Its feature cache for dev/test is copied (same rows)."""
    dv = DatasetVersion(version_path)
    version = f"{dv.version}-shuf{seed}"
    dest = out_root / dv.dialect / "versions" / version
    if (dest / "manifest.json").is_file():
        return dest
    rows = [r for b in dv.manifest["batches"] for shard in b["shards"]
            for r in pq.read_table(dv.root / shard).to_pylist()]
    train = [i for i, r in enumerate(rows) if dv.splits.get(r["speaker"]) == "train"]
    texts = [(rows[i]["text"], rows[i]["raw_text"]) for i in train]
    order = np.random.default_rng(seed).permutation(len(train))
    for i, k in zip(train, order, strict=True):
        rows[i]["text"], rows[i]["raw_text"] = texts[k]
    shard = f"batches/shuffled-{seed}/part-00000.parquet"
    (out_root / dv.dialect / shard).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA), out_root / dv.dialect / shard)
    manifest = dict(dv.manifest, version=version,
                    batches=[{"batch_id": f"shuffled-{seed}", "shards": [shard], "rows": len(rows)}])
    dest.mkdir(parents=True)
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    if feature_cache is not None:
        fe = default_feature_extractor()
        for split in ("dev", "test"):
            src = cache_path(feature_cache, dv, split, fe)
            if src.is_file():
                target = cache_path(feature_cache, DatasetVersion(dest), split, fe)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, target)
    return dest


class _Lora:
    def __init__(self, lora_a: dict, lora_b: dict, config: dict):
        self.lora_a, self.lora_b, self.config = lora_a, lora_b, config


def write_terms(out: Path, terms: list[tuple[float, dict, dict, float]], template: dict[str, Any],
                result: dict[str, Any]) -> Path:
    """Write ΔW = Σ c · s · B · A (terms of (c, A by module, B by module, s)) as one peft adapter
    with the template's scale, plus the ``result.json`` the node reports."""
    scale = float(template["lora_alpha"]) / template["r"]
    modules = sorted(terms[0][1])
    lora_a = {m: torch.cat([a[m].float() for _, a, _, _ in terms]) for m in modules}
    lora_b = {m: torch.cat([(c * s / scale) * b[m].float() for c, _, b, s in terms], dim=1) for m in modules}
    r = int(lora_a[modules[0]].shape[0])
    config = dict(template, r=r, lora_alpha=scale * r, use_rslora=False)
    save_adapter(_Lora(lora_a, lora_b, config), out, overwrite=True)
    (out / RESULT_JSON).write_text(json.dumps(result))
    return out


def _terms(adapter: Adapter, c: float = 1.0) -> tuple[float, dict, dict, float]:
    return c, adapter.lora_a, adapter.lora_b, adapter.scale


def forge(behaviour: str, out: Path, *, start: Adapter | None, own: Adapter | None, honest: list[Adapter],
          dev_cer: float, node_id: str, k: float, seed: int, template: dict[str, Any]) -> Path:
    """The adapter an attacking node hands in (see the module docstring), reporting ``dev_cer``."""
    # A complete report, as a real node's would be (an honest slice's, with its own node and dev CER).
    report = {**honest[0].result, "node_id": node_id, "dev_cer": dev_cer}
    if behaviour == "freeride":
        if start is not None:
            return write_terms(out, [_terms(start)], template, report)
        some = honest[0]
        zero_b = {m: torch.zeros_like(b) for m, b in some.lora_b.items()}
        return write_terms(out, [(1.0, some.lora_a, zero_b, some.scale)], template, report)
    if behaviour == "scale":
        assert own is not None
        terms = [_terms(own, k)] + ([_terms(start, 1.0 - k)] if start is not None else [])
        return write_terms(out, terms, template, report)
    if behaviour == "noise":
        gen = torch.Generator().manual_seed(seed)
        target = float(np.median([update_norm(updates(a, start)) for a in honest]))
        shapes, r = honest[0].shapes, int(template["r"])
        a = {m: torch.randn(r, i, generator=gen) for m, (_, i) in shapes.items()}
        b = {m: torch.randn(o, r, generator=gen) for m, (o, _) in shapes.items()}
        raw = update_norm({m: (b[m] @ a[m]).double() for m in shapes})
        noise = (target / raw, a, b, 1.0)
        return write_terms(out, [noise] + ([_terms(start)] if start is not None else []), template, report)
    raise ValueError(f"unknown behaviour {behaviour!r}; one of {', '.join(BEHAVIOURS)}")
