"""Files the package writes and reads: atomic writes, content hashes, and the first line
of a library's error for one-line messages. Models, training and the encoders all use them."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _current_umask()  # the process's file-creation mask, read once


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call write(tmp_path) on a temporary file in the target's folder, then rename it over
    the target: a reader never sees a half-written file, even if the writer is killed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes the file private; give it the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_folder(path: str | os.PathLike, write) -> None:
    """Call write(tmp_folder) on a temporary folder beside the target, then put it in the
    target's place (an existing target is moved aside first and removed after): a reader
    never sees a half-written folder, even if the writer is killed."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    old = None
    try:
        tmp.chmod(0o777 & ~UMASK)  # mkdtemp makes the folder private; give it the usual mode
        write(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not path.exists():
            os.replace(old / path.name, path)  # the old folder back in place
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (libraries' messages run over many lines)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
