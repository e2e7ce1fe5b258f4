"""Atomic file writes: the one place for "write to a temporary file in the same folder, fsync, then rename".

A reader (or a job killed mid-write and restarted) sees either the old file or the complete new one, never a
partial file. The temporary name starts with a dot and carries the writer's pid, so concurrent writers on one
shared filesystem never collide and a leftover of a killed writer is recognisable (``is_temporary``).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_torch_save",
    "atomic_save_with",
    "fsync_dir",
    "temporary_name",
    "is_temporary",
]

_TMP_MARK = ".tmp-"


def temporary_name(path: Path) -> Path:
    """The temporary sibling that ``atomic_write`` writes before renaming onto ``path``."""
    return path.with_name(f".{path.name}{_TMP_MARK}{os.getpid()}")


def is_temporary(path: Path) -> bool:
    """Whether ``path`` is a leftover temporary file of ``atomic_write`` (e.g. of a killed writer)."""
    return path.name.startswith(".") and _TMP_MARK in path.name


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (best effort: some filesystems refuse fsync on a directory)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb", *, durable: bool = True) -> Iterator[IO[Any]]:
    """Open a temporary sibling of ``path`` for writing; on a clean exit flush, fsync and rename it onto ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was. ``durable=False`` skips the
    fsyncs (for files that are cheap to rewrite, e.g. a log index rewritten every step)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    encoding = None if "b" in mode else "utf-8"
    try:
        with open(tmp, mode, encoding=encoding) as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if durable:
        fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes, *, durable: bool = True) -> None:
    with atomic_write(path, "wb", durable=durable) as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str, *, durable: bool = True) -> None:
    with atomic_write(path, "w", durable=durable) as f:
        f.write(text)


def atomic_write_json(path: str | Path, obj: Any, *, indent: int | None = 1, durable: bool = True) -> None:
    with atomic_write(path, "w", durable=durable) as f:
        json.dump(obj, f, indent=indent)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    import torch  # lazy: core.config and tools/gpu_report.py import this module, torch-free (their --help paths)

    with atomic_write(path, "wb") as f:
        torch.save(obj, f)


def atomic_save_with(path: str | Path, save: Callable[[Path], None]) -> None:
    """For writers that need a file name rather than a file object (e.g. PIL with a format): ``save(tmp)`` writes
    the temporary file, which is then renamed onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        save(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
