"""Publishing a directory: it appears whole under its final name, or not at all.

Every published directory -- base models, TTS bases, merged candidates, production adapters,
job checkpoints -- is written into a hidden temp directory beside its target
(``.<name>.tmp-<uuid>``), fsynced, and renamed into place. A rename within one filesystem is
atomic, so a reader, or a retry after a crash, never finds half a directory under the final name;
a crash leaves only the hidden temp directory, which nothing reads (safe to delete).

What an existing target means depends on the name:

- a **unique** name (a candidate id, ``unique_id``): it is never taken twice; ``publish_dir``
  refuses (``FileExistsError``) and overwrites nothing unless told to ``replace`` (a job's own
  unrecorded output, rewritten by its retry);
- a **content** name (``publish_version``: a model under its content hash) or a **copy**
  (``publish_copy``: a production adapter copied from its candidate): the existing directory is
  trusted only when its content hash (``model_dir_hash``, below) is the expected one. Anything
  else -- a directory half copied by a crash of an older, non-atomic publication, or changed
  since -- is moved aside and rebuilt.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


def unique_id(prefix: str) -> str:
    """A name no other publication takes: ``prefix`` + 128 random bits (uuid4, 32 hex digits)."""
    return f"{prefix}-{uuid.uuid4().hex}"


def publish_dir(target: str | os.PathLike[str], fill: Callable[[Path], object], *, replace: bool = False) -> Path:
    """Publish what ``fill(tmp)`` writes into a fresh temp directory as ``target``, atomically.

    An existing ``target`` is refused (``FileExistsError``, nothing written) unless ``replace``
    (a file that is not a directory is never replaced: ``NotADirectoryError``);
    two publications racing for one name: one wins, the other gets ``FileExistsError``.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():  # not ours to replace: someone else's file
        raise NotADirectoryError(f"{target} exists and is not a directory: nothing is published over it")
    if target.exists() and not replace:
        raise FileExistsError(f"{target} exists: a published directory is never overwritten")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        fill(tmp)
        fsync_tree(tmp)
        if replace and target.exists():
            _discard(target)
        try:
            os.rename(tmp, target)
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise FileExistsError(f"{target} was published by someone else meanwhile; nothing overwritten") \
                    from exc
            raise
        _fsync_dir(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def publish_copy(source: str | os.PathLike[str], target: str | os.PathLike[str],
                 content_hash: str | None = None) -> Path:
    """Publish a copy of ``source`` as ``target``; a target already holding the same content
    (``content_hash``, default: the source's) is kept, any other is rebuilt."""
    source, target = Path(source), Path(target)
    expected = content_hash or model_dir_hash(source)
    return _publish_content(target, expected, lambda tmp: shutil.copytree(source, tmp, dirs_exist_ok=True))


def publish_version(built: str | os.PathLike[str], parent: str | os.PathLike[str]) -> tuple[str, Path]:
    """Move a freshly written directory (on the same filesystem) to ``parent/<content hash>``;
    returns (version, directory). A whole directory of that version is kept, a half one rebuilt."""
    built = Path(built)
    version = model_dir_hash(built)

    def move(tmp: Path) -> None:
        for entry in built.iterdir():
            os.rename(entry, tmp / entry.name)

    out = _publish_content(Path(parent) / version, version, move)
    shutil.rmtree(built, ignore_errors=True)
    return version, out


def is_whole(target: str | os.PathLike[str], content_hash: str) -> bool:
    """``target`` exists and holds exactly the content of ``content_hash``."""
    return Path(target).is_dir() and model_dir_hash(target) == content_hash


def _publish_content(target: Path, content_hash: str, fill: Callable[[Path], object]) -> Path:
    if is_whole(target, content_hash):
        return target
    if target.exists():
        log.warning("%s is not whole (content differs from %s): rebuilding it", target, content_hash[:12])
    try:
        return publish_dir(target, fill, replace=True)
    except FileExistsError:
        if is_whole(target, content_hash):  # a concurrent publication of the same content won
            return target
        raise


def _discard(target: Path) -> None:
    """Move ``target`` out of the way in one rename, then delete it."""
    aside = target.parent / f".{target.name}.old-{uuid.uuid4().hex}"
    os.rename(target, aside)
    shutil.rmtree(aside, ignore_errors=True)


def fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def model_dir_hash(path: str | Path) -> str:
    """Content hash of a model directory (relative names + bytes of every non-hidden file)."""
    root = Path(path)
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if not p.is_file() or any(part.startswith(".") for part in rel.parts):
            continue
        h.update(str(rel).encode() + b"\x00")
        h.update(file_sha256(p).encode() + b"\n")
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
