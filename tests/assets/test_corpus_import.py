"""Common Voice releases and Hugging Face datasets in: `mloc corpus import` writes an incoming
batch, ingest_job (Dagster) validates it like any other. The sources are written by the tests in
the real formats from real espeak audio: a Common Voice release (48 kHz mp3 clips, validated.tsv),
a `datasets` DatasetDict saved with `save_to_disk`, an audiofolder; each with broken rows that
must come out quarantined with their reason, never dropped."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import dagster as dg
import pytest
import soundfile as sf
import soxr
from typer.testing import CliRunner

from mloc_dagster.cli.main import app
from mloc_dagster.core.data.datasets import DatasetVersion
from mloc_dagster.definitions import defs
from mloc_dagster.partitions import dialect_partitions

CV_HEADER = ["client_id", "path", "sentence_id", "sentence", "sentence_domain", "up_votes", "down_votes", "age",
             "gender", "accents", "variant", "locale", "segment"]


def espeak_rows(batch: Path) -> list[dict]:
    return [json.loads(line) for line in (batch / "manifest.jsonl").read_text().splitlines()]


def ingest(dialect: str) -> dict:
    """ingest_job on the test's instance; the dataset_version materialization's metadata."""
    with dg.DagsterInstance.get() as instance:
        instance.add_dynamic_partitions(dialect_partitions.name, [dialect])
        result = defs.resolve_job_def("ingest_job").execute_in_process(partition_key=dialect, instance=instance)
        assert result.success
        [mat] = [m for m in result.asset_materializations_for_node("dataset_version")]
        return {k: v.value for k, v in mat.metadata.items()}


def cli(*args: str) -> tuple[int, str]:
    """`mloc corpus import ARGS`: exit code and output (joined: rich wraps long lines)."""
    result = CliRunner().invoke(app, ["corpus", "import", *args], catch_exceptions=False)
    return result.exit_code, " ".join(result.output.split())


def write_commonvoice(root: Path, espeak_batch: Path) -> Path:
    """A release: 48 kHz mp3 clips and validated.tsv; four broken rows at the end."""
    (root / "clips").mkdir(parents=True)
    lines = []
    for i, row in enumerate(espeak_rows(espeak_batch)):
        audio, sr = sf.read(espeak_batch / row["audio"], dtype="float32")
        sf.write(root / "clips" / f"common_voice_en_{i}.mp3", soxr.resample(audio, sr, 48_000), 48_000)
        lines.append([f"spk{row['speaker']}", f"common_voice_en_{i}.mp3", f"s{i}", row["text"], "", "2", "0",
                      "twenties", "", "Scottish English", "en-GB", "en", ""])
    (root / "clips" / "garbage.mp3").write_bytes(b"not an mp3 at all" * 10)
    lines += [["spkA", "missing.mp3", "s90", "A clip that was never there", "", "2", "0", "", "", "", "", "en", ""],
              ["spkA", "common_voice_en_0.mp3", "s91", "", "", "2", "0", "", "", "", "", "en", ""],  # no sentence
              ["spkB", "garbage.mp3", "s92", "Corrupt audio", "", "2", "0", "", "", "", "", "en", ""],
              ["spkC", "common_voice_en_1.mp3"]]  # a truncated line
    with (root / "validated.tsv").open("w", newline="") as f:
        writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\", lineterminator="\n")
        writer.writerow(CV_HEADER)
        writer.writerows(lines)
    return root


def test_a_common_voice_release_is_ingested_and_its_broken_rows_quarantined(mloc_home, espeak_batch, tmp_path):
    src = write_commonvoice(tmp_path / "cv-corpus-en", espeak_batch)
    code, output = cli(str(src), "--format", "commonvoice", "--dialect", "en-gb-scotland")
    batch = mloc_home / "incoming" / "en-gb-scotland" / "commonvoice-cv-corpus-en"
    assert code == 0 and "40 rows" in output and batch.is_dir(), output
    first = json.loads((batch / "manifest.jsonl").read_text().splitlines()[0])
    assert first["origin"] == "validated.tsv:2" and first["contributor"] == "commonvoice"
    assert first["meta"]["accents"] == "Scottish English" and first["meta"]["locale"] == "en"  # kept

    md = ingest("en-gb-scotland")
    assert md["rows"] == 36 and md["quarantined"] == 4
    # the truncated line has a clip but no sentence: refused for its transcript, like the empty one
    assert md["quarantined_by_reason"] == {"missing_file": 1, "empty_transcript": 2, "corrupt_audio": 1}
    truncated = json.loads((batch / "manifest.jsonl").read_text().splitlines()[-1])
    assert truncated["origin"] == "validated.tsv:41" and "2 columns" in truncated["meta"]["import_note"]
    version = DatasetVersion(md["path"])
    speakers = {u.speaker for split in ("train", "dev", "test") for u in version.iter_utterances(split)}
    assert speakers == {f"spk{r['speaker']}" for r in espeak_rows(espeak_batch)}  # client_id is the speaker

    code, output = cli(str(src), "--format", "commonvoice", "--dialect", "en-gb-scotland")
    assert code == 2 and "already holds a batch" in output


def test_a_saved_datasetdict_and_an_audiofolder_are_ingested(mloc_home, espeak_batch, tmp_path):
    import datasets

    rows = espeak_rows(espeak_batch)
    data = {"audio": [str(espeak_batch / r["audio"]) for r in rows], "transcription": [r["text"] for r in rows],
            "speaker_id": [r["speaker"] for r in rows], "accent": ["scottish"] * len(rows)}
    data["transcription"][3] = ""  # broken: empty transcript
    full = datasets.Dataset.from_dict(data).cast_column("audio", datasets.Audio(sampling_rate=16_000))
    datasets.DatasetDict({"train": full.select(range(30)), "test": full.select(range(30, 36))}).save_to_disk(
        tmp_path / "hf-saved")
    stale = mloc_home / "incoming" / "en-gb-scotland" / "hf1" / "audio" / "stale.wav"  # an interrupted import
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half")
    code, output = cli(str(tmp_path / "hf-saved"), "--format", "hf", "--dialect", "en-gb-scotland", "--batch-id", "hf1")
    assert code == 0 and not stale.exists(), output  # replaced: a retry works
    md = ingest("en-gb-scotland")
    assert md["rows"] == 35 and md["quarantined_by_reason"] == {"empty_transcript": 1}
    manifest = espeak_rows(mloc_home / "incoming" / "en-gb-scotland" / "hf1")
    assert {r["meta"]["hf_split"] for r in manifest} == {"train", "test"} and manifest[0]["meta"]["accent"] == "scottish"

    folder = tmp_path / "audiofolder"
    folder.mkdir()
    with (folder / "metadata.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "text", "speaker"])
        for r in rows:
            writer.writerow([r["audio"], r["text"], r["speaker"]])
        writer.writerow(["audio/nowhere.wav", "A missing file", "x"])
        writer.writerow(["../../etc/passwd", "Outside the folder", "x"])
    (folder / "audio").symlink_to(espeak_batch / "audio")
    code, output = cli(str(folder), "--format", "hf", "--dialect", "en-us")
    assert code == 0, output
    md = ingest("en-us")
    assert md["rows"] == 36 and md["quarantined_by_reason"] == {"missing_file": 2}


@pytest.mark.parametrize("make, args, message", [
    (lambda d: d, ["--format", "kaldi"], "--format must be one of commonvoice, hf"),
    (lambda d: (d / "clips").mkdir() or d, ["--format", "commonvoice"], "a Common Voice release has clips/ and validated.tsv"),
    (lambda d: (d / "metadata.csv").write_text("file_name,words\na.wav,hi\n") and d, ["--format", "hf"],
     "no text column among file_name, words; expected one of sentence, text"),
    (lambda d: (d / "metadata.csv").write_text("file_name,text\na.wav,hi\n") and d,
     ["--format", "hf", "--speaker-column", "client"], "no column 'client' (columns: file_name, text)"),
    (lambda d: d, ["--format", "hf"], "neither a save_to_disk directory"),
    (lambda d: d, ["--format", "hf", "--batch-id", "../../outside"], "--batch-id '../../outside': expected"),
])
def test_sources_it_cannot_read_are_refused_with_what_was_expected(mloc_home, tmp_path, make, args, message):
    (tmp_path / "src").mkdir()
    code, output = cli(str(make(tmp_path / "src")), *args, "--dialect", "en-us")
    assert code == 2 and message in output, output
    assert not any((mloc_home / "incoming" / "en-us").glob("*/manifest.jsonl"))  # nothing half-written counts
