"""Atomic writes (DESIGN §7): every data file and model directory is written aside, then renamed.

A reader sees the old file (or folder) or the new one, never half of one; a writer that fails leaves no
partial file behind. The temporary name is ``.<name>.tmp-<pid>`` beside the target (hidden, and never
matching the target's suffix, so a ``*.parquet`` / ``*.npz`` glob does not pick it up).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator


def temp_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to; renamed onto ``path`` when the block ends without
    an exception, removed when it raises (parent folders are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(data: bytes, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(text: str, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def atomic_write_json(obj: Any, path: str | Path, **dumps_kwargs: Any) -> Path:
    """``json.dumps(obj, **dumps_kwargs)`` and a newline, written atomically (``indent=2`` unless given)."""
    dumps_kwargs.setdefault("indent", 2)
    return atomic_write_text(json.dumps(obj, **dumps_kwargs) + "\n", path)


def atomic_write_parquet(frame, path: str | Path) -> Path:
    """``frame.to_parquet(path, index=False)``, atomically."""
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)
    return Path(path)


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries to disk (where the platform allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover  (platforms without directory fds)
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def publish_dir(src: str | Path, dst: str | Path, *, replace: bool = True, fsync: bool = False) -> Path:
    """Move the finished folder ``src`` (built aside) into place at ``dst``.

    ``replace=True``: an older ``dst`` is moved aside first and removed only after the new one is in place.
    ``replace=False``: the first folder published wins; when ``dst`` already exists ``src`` is removed.
    ``fsync=True``: the parent folder's entries are flushed after the rename (files inside ``src`` are the
    writer's to flush)."""
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not replace:
        try:
            os.replace(src, dst)
        except OSError:  # another process published it first
            shutil.rmtree(src, ignore_errors=True)
        if fsync:
            fsync_dir(dst.parent)
        return dst
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    if fsync:
        fsync_dir(dst.parent)
    shutil.rmtree(old, ignore_errors=True)
    return dst
