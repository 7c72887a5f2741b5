"""Corpora from elsewhere, written as ordinary incoming batches.

``import_corpus`` turns a Common Voice release or a Hugging Face ``datasets`` directory into one
batch ``incoming/<dialect>/<batch_id>/`` (audio files and a ``manifest.jsonl``, written last), so
the ingest's validation, quarantine and speaker-disjoint splits apply unchanged. The importer
judges nothing: every source row becomes a manifest row with whatever it had (an empty sentence,
a clip that is not there), and the ingest quarantines the bad ones with their reason. Each row
says where it came from (``origin``: file and line or row) and keeps the source's other columns
(``meta``: Common Voice's ``accents``, ``variant``, ``locale``, ``gender``, ``age``...).

- ``commonvoice``: ``clips/`` + ``validated.tsv`` (or another TSV of the release); ``client_id``
  is the speaker, ``sentence`` the text, the mp3 clips are linked (or copied) into the batch and
  decoded by the ingest (libsndfile reads mp3; nothing is downloaded).
- ``hf``: a ``save_to_disk`` directory (one dataset, or a ``DatasetDict`` with a directory per
  split) read with pyarrow, its ``Audio`` column's embedded bytes written out; or an
  ``audiofolder`` (``metadata.csv`` / ``metadata.jsonl`` with ``file_name``, at the top or in a
  directory per split). The text and speaker columns are found by name or given.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from mloc_dagster.core.data.batches import MANIFEST_NAMES

FORMATS = ("commonvoice", "hf")
TEXT_COLUMNS = ("sentence", "text", "transcription", "transcript", "normalized_text")
SPEAKER_COLUMNS = ("client_id", "speaker_id", "speaker")
CONTRIBUTOR = {"commonvoice": "commonvoice", "hf": "hf-datasets"}
_DIALECT = re.compile(r"[a-z0-9][a-z0-9-]*")
_BATCH_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class CorpusImportError(ValueError):
    """The source cannot be read as the format named; the message says what was expected."""


@dataclass(frozen=True)
class ImportSummary:
    batch_dir: Path
    rows: int  # manifest rows written (the ingest accepts or quarantines each)
    audio_files: int  # files placed in the batch


def import_corpus(fmt: str, src: Path, incoming: Path, dialect: str, batch_id: str | None = None, *,
                  tsv: str = "validated.tsv", text_column: str | None = None,
                  speaker_column: str | None = None) -> ImportSummary:
    """Write ``src`` (a directory in format ``fmt``) as batch ``incoming/<dialect>/<batch_id>``.

    A batch that already has a manifest is refused; a directory left by an interrupted import
    (no manifest yet) is replaced."""
    src = Path(src)
    if fmt not in FORMATS:
        raise CorpusImportError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if not src.is_dir():
        raise CorpusImportError(f"{src}: not a directory")
    batch_id = batch_id or re.sub(r"[^A-Za-z0-9._-]+", "-", f"{fmt}-{src.name}")
    for name, value, pattern in (("--dialect", dialect, _DIALECT), ("--batch-id", batch_id, _BATCH_ID)):
        if not pattern.fullmatch(value):  # a name, never a path: nothing is written or removed elsewhere
            raise CorpusImportError(f"{name} {value!r}: expected {pattern.pattern}")
    batch = Path(incoming) / dialect / batch_id
    if any((batch / name).is_file() for name in MANIFEST_NAMES):
        raise CorpusImportError(f"{batch} already holds a batch; pick another --batch-id")
    shutil.rmtree(batch, ignore_errors=True)
    batch.mkdir(parents=True)
    if fmt == "commonvoice":
        rows = _commonvoice_rows(src, batch, tsv)
    else:
        rows = _hf_rows(src, batch, text_column, speaker_column)
    written = _write_manifest(batch, rows, CONTRIBUTOR[fmt])
    files = sum(1 for p in batch.rglob("*") if p.is_file()) - 1
    return ImportSummary(batch, written, files)


def _write_manifest(batch: Path, rows: Iterator[dict], contributor: str) -> int:
    """The manifest, written last and atomically: the batch is complete when it exists."""
    tmp, n = batch / "manifest.jsonl.tmp", 0
    with tmp.open("w") as f:
        for row in rows:
            f.write(json.dumps({"contributor": contributor, **row}) + "\n")
            n += 1
    if n == 0:
        shutil.rmtree(batch)
        raise CorpusImportError(f"no rows to import from the source of {batch.name}")
    tmp.rename(batch / "manifest.jsonl")
    return n


def _place(src: Path, dst: Path) -> None:
    """A hard link where the file system allows it (a release can be large), else a copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists():
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)


def _text(value) -> str:
    return "" if value is None else str(value)


# --------------------------------------------------------------------------- Common Voice


def _commonvoice_rows(src: Path, batch: Path, tsv: str) -> Iterator[dict]:
    table = src / tsv
    if not table.is_file() or not (src / "clips").is_dir():
        raise CorpusImportError(f"{src}: a Common Voice release has clips/ and {tsv}; "
                                f"found {sorted(p.name for p in src.iterdir())[:10]}")
    with table.open(newline="", encoding="utf-8", errors="surrogateescape") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        missing = [c for c in ("client_id", "path", "sentence") if c not in (header or [])]
        if missing:
            raise CorpusImportError(f"{table}: header lacks {', '.join(missing)} (got {header})")
        for values in reader:
            yield _commonvoice_row(src, batch, header, values, f"{tsv}:{reader.line_num}")


def _commonvoice_row(src: Path, batch: Path, header: list[str], values: list[str], origin: str) -> dict:
    row = dict(zip(header, values, strict=False))
    clip = row.get("path", "")
    if clip and Path(clip).name == clip and (src / "clips" / clip).is_file():
        _place(src / "clips" / clip, batch / "clips" / clip)  # else the ingest says what is wrong
    meta = {k: v for k, v in row.items() if k not in ("client_id", "path", "sentence") and v}
    if len(values) != len(header):
        meta["import_note"] = f"{len(values)} columns, the header has {len(header)}"
    return {"audio": f"clips/{clip}" if clip else "", "text": row.get("sentence", ""),
            "speaker": row.get("client_id", ""), "origin": origin, "meta": meta}


# --------------------------------------------------------------------------- Hugging Face


def _hf_rows(src: Path, batch: Path, text_column: str | None, speaker_column: str | None) -> Iterator[dict]:
    if (src / "dataset_dict.json").is_file():
        splits = json.loads((src / "dataset_dict.json").read_text())["splits"]
        parts = [(split, src / split) for split in splits]
    elif (src / "state.json").is_file():
        parts = [("", src)]
    else:
        yield from _audiofolder_rows(src, batch, text_column, speaker_column)
        return
    for split, part in parts:
        yield from _saved_rows(part, split, batch, text_column, speaker_column)


def _pick(columns: list[str], given: str | None, candidates: tuple[str, ...], what: str, where: Path) -> str:
    if given is not None:
        if given not in columns:
            raise CorpusImportError(f"{where}: no column {given!r} (columns: {', '.join(columns)})")
        return given
    found = next((c for c in candidates if c in columns), None)
    if found is None:
        raise CorpusImportError(f"{where}: no {what} column among {', '.join(columns)}; expected one of "
                                f"{', '.join(candidates)} or name it with --{what}-column")
    return found


def _audio_column(schema: pa.Schema, where: Path) -> str:
    """The column the dataset's features declare ``Audio`` (else the one shaped like it)."""
    features = json.loads((schema.metadata or {}).get(b"huggingface", b"{}")).get("info", {}).get("features", {})
    declared = [name for name, f in features.items() if isinstance(f, dict) and f.get("_type") == "Audio"]
    shaped = [f.name for f in schema if pa.types.is_struct(f.type) and {"bytes", "path"} <= {c.name for c in f.type}]
    if not (declared or shaped):
        raise CorpusImportError(f"{where}: no Audio column (columns: {', '.join(schema.names)})")
    return (declared or shaped)[0]


def _saved_rows(part: Path, split: str, batch: Path, text_column: str | None,
                speaker_column: str | None) -> Iterator[dict]:
    """One ``save_to_disk`` dataset: its Arrow files (IPC streams), row by row."""
    state = json.loads((part / "state.json").read_text())
    for data_file in state["_data_files"]:
        path = part / data_file["filename"]
        with pa.memory_map(str(path)) as source:
            table = pa.ipc.open_stream(source).read_all()
        audio = _audio_column(table.schema, path)
        text = _pick(table.column_names, text_column, TEXT_COLUMNS, "text", path)
        speaker = _pick(table.column_names, speaker_column, SPEAKER_COLUMNS, "speaker", path)
        for i, row in enumerate(table.to_pylist()):
            name = f"{split or 'data'}-{data_file['filename'].split('.')[0]}-{i:06d}"
            yield {"audio": _write_audio(row[audio], part, batch / "audio", name), "text": _text(row[text]),
                   "speaker": _text(row[speaker]), "origin": f"{path.relative_to(part.parent)}:row {i}",
                   "meta": _meta(row, (audio, text, speaker), split)}


def _write_audio(value: dict | None, part: Path, out: Path, name: str) -> str:
    """An Audio cell as a file of the batch: its embedded bytes, or the file its path names."""
    value = value or {}
    suffix = Path(value.get("path") or "x.wav").suffix or ".wav"
    dst = out / f"{name}{suffix}"
    if value.get("bytes"):
        out.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(value["bytes"])
    elif value.get("path") and (part / value["path"]).is_file():  # an absolute path stays absolute
        _place(part / value["path"], dst)
    return str(dst.relative_to(out.parent))  # missing: the ingest quarantines it as missing_file


def _meta(row: dict, used: tuple[str, ...], split: str) -> dict:
    meta = {k: v for k, v in row.items() if k not in used and isinstance(v, str | int | float | bool) and v != ""}
    return {**meta, "hf_split": split} if split else meta


def _audiofolder_rows(src: Path, batch: Path, text_column: str | None, speaker_column: str | None) -> Iterator[dict]:
    folders = [d for d in (src, *sorted(p for p in src.iterdir() if p.is_dir())) if _metadata_file(d)]
    if not folders:
        raise CorpusImportError(f"{src}: neither a save_to_disk directory (state.json or dataset_dict.json) nor "
                                "an audiofolder (metadata.csv or metadata.jsonl with a file_name column)")
    for folder in folders:
        meta_file = _metadata_file(folder)
        rows = _read_metadata(meta_file)
        columns = list(dict.fromkeys(k for row in rows for k in row)) or ["file_name"]
        if "file_name" not in columns:
            raise CorpusImportError(f"{meta_file}: no file_name column (columns: {', '.join(columns)})")
        text = _pick(columns, text_column, TEXT_COLUMNS, "text", meta_file)
        speaker = _pick(columns, speaker_column, SPEAKER_COLUMNS, "speaker", meta_file)
        split = "" if folder == src else folder.name
        for line, row in enumerate(rows, start=2 if meta_file.suffix == ".csv" else 1):
            yield _folder_row(folder, batch, row, text, speaker, split, f"{meta_file.relative_to(src)}:{line}")


def _folder_row(folder: Path, batch: Path, row: dict, text: str, speaker: str, split: str, origin: str) -> dict:
    rel = _text(row.get("file_name"))
    inside = bool(rel) and not os.path.isabs(rel) and not os.path.normpath(rel).startswith("..")
    file = folder / rel  # a symlink in the folder is followed: the folder is the user's own
    dst = Path("audio") / (split or ".") / rel if inside else Path("audio") / "outside" / Path(rel).name
    if inside and file.is_file():
        _place(file, batch / dst)
    meta = _meta(row, ("file_name", text, speaker), split)
    if rel and not inside:
        meta["import_note"] = f"file_name {rel!r} is outside {folder.name}/: not copied"
    return {"audio": str(dst) if rel else "", "text": _text(row.get(text)), "speaker": _text(row.get(speaker)),
            "origin": origin, "meta": meta}


def _metadata_file(folder: Path) -> Path | None:
    return next((folder / n for n in ("metadata.csv", "metadata.jsonl") if (folder / n).is_file()), None)


def _read_metadata(path: Path) -> list[dict]:
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8", errors="surrogateescape") as f:
            return [{k: v for k, v in row.items() if k is not None} for row in csv.DictReader(f)]
    rows = []
    for line in path.read_text(errors="surrogateescape").splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:  # a row of its own: the ingest refuses it (no file_name)
                rows.append({"import_note": f"not valid JSON: {exc.msg}"})
    return rows
