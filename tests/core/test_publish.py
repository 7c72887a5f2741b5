"""core/publish.py: a directory appears whole under its name or not at all; a half one left by a
crash is rebuilt, never trusted; two publications of one name never clobber each other."""

from __future__ import annotations

import re
import shutil
import threading
from pathlib import Path

import pytest

from mloc_dagster.core.publish import is_whole, model_dir_hash, publish_copy, publish_dir, publish_version, unique_id


def write_files(files: dict[str, str]):
    def fill(tmp: Path) -> None:
        for name, text in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text)
    return fill


MODEL = {"config.json": "{}", "model.safetensors": "weights" * 1000, "sub/vocab.json": "{\"a\": 1}"}


def contents(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_crash_while_writing_leaves_nothing_under_the_name(tmp_path):
    target = tmp_path / "out" / "model"

    def crash(tmp: Path) -> None:
        (tmp / "config.json").write_text("{}")
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space"):
        publish_dir(target, crash)
    assert not target.exists() and list(target.parent.iterdir()) == []  # no half directory, no temp left
    assert contents(publish_dir(target, write_files(MODEL))) == MODEL  # the retry publishes it whole


def test_a_half_copy_left_by_a_crash_is_rebuilt_not_trusted(tmp_path):
    source = publish_dir(tmp_path / "source", write_files(MODEL))
    target = tmp_path / "production" / "cand-1"
    target.mkdir(parents=True)
    shutil.copy(source / "config.json", target / "config.json")  # copytree died after the first file
    assert not is_whole(target, model_dir_hash(source))

    assert publish_copy(source, target) == target
    assert contents(target) == MODEL and is_whole(target, model_dir_hash(source))
    assert [p.name for p in target.parent.iterdir()] == ["cand-1"]  # the half one is gone, no temp left

    before = (target / "model.safetensors").stat().st_ino
    publish_copy(source, target)  # published again (a re-run): the whole copy is kept as it is
    assert (target / "model.safetensors").stat().st_ino == before


def test_a_half_model_version_is_rebuilt_and_a_whole_one_kept(tmp_path):
    models = tmp_path / "models"
    built = publish_dir(models / ".pretrain-a", write_files(MODEL), replace=True)
    version, out = publish_version(built, models)
    assert version == model_dir_hash(out) and out == models / version and not built.exists()

    (out / "model.safetensors").unlink()  # a crash of an older, non-atomic publication
    again = publish_dir(models / ".pretrain-b", write_files(MODEL), replace=True)
    assert publish_version(again, models) == (version, out)
    assert contents(out) == MODEL and [p.name for p in models.iterdir()] == [version]

    inode = (out / "model.safetensors").stat().st_ino
    third = publish_dir(models / ".pretrain-c", write_files(MODEL), replace=True)
    assert publish_version(third, models) == (version, out) and not third.exists()
    assert (out / "model.safetensors").stat().st_ino == inode  # whole: kept, not rewritten


def test_a_taken_name_is_refused_and_keeps_its_content(tmp_path):
    target = publish_dir(tmp_path / "cand-x", write_files({"a.json": "first"}))
    with pytest.raises(FileExistsError, match="never overwritten"):
        publish_dir(target, write_files({"a.json": "second"}))
    assert contents(target) == {"a.json": "first"}
    publish_dir(target, write_files({"b.json": "replaced"}), replace=True)  # a job's own output, on retry
    assert contents(target) == {"b.json": "replaced"} and [p.name for p in tmp_path.iterdir()] == ["cand-x"]


def test_a_file_in_the_way_is_never_replaced_even_when_replacing(tmp_path):
    (tmp_path / "job-0001").write_text("someone else's file")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        publish_dir(tmp_path / "job-0001", write_files({"a.json": "x"}), replace=True)
    assert (tmp_path / "job-0001").read_text() == "someone else's file"
    assert [p.name for p in tmp_path.iterdir()] == ["job-0001"]  # no temp or set-aside left behind


def test_two_racing_publications_of_one_name_never_clobber(tmp_path):
    target = tmp_path / "cand-race"
    both_writing = threading.Barrier(2)
    outcome: dict[str, object] = {}

    def publisher(name: str) -> None:
        def fill(tmp: Path) -> None:
            both_writing.wait(timeout=10)  # both have passed the existence check and are writing
            write_files({"who.json": name, "weights": name * 10_000})(tmp)
        try:
            outcome[name] = publish_dir(target, fill)
        except FileExistsError as exc:
            outcome[name] = exc

    threads = [threading.Thread(target=publisher, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [n for n, r in outcome.items() if r == target]
    assert len(winners) == 1 and isinstance(outcome[{"a": "b", "b": "a"}[winners[0]]], FileExistsError)
    assert contents(target) == {"who.json": winners[0], "weights": winners[0] * 10_000}
    assert [p.name for p in tmp_path.iterdir()] == ["cand-race"]


def test_unique_ids_cannot_collide():
    ids = {unique_id("cand") for _ in range(1000)}
    assert len(ids) == 1000 and all(re.fullmatch(r"cand-[0-9a-f]{32}", i) for i in ids)
