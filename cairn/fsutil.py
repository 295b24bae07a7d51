"""Writing files so that a crash never leaves a half-written one: the one atomic-write helper. No torch here.

Every writer writes to a hidden temporary file beside the target (same directory, so the same file system), flushes
it to disk, then renames it over the target in one step: readers see the old file or the new one, never a part."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, write: Callable[[Path], None], mode: int | None = None) -> None:
    """Call `write(tmp)` to create a temporary file beside `path`, then replace `path` with it atomically.

    The temporary name keeps `path`'s suffix (some writers pick the format from it, e.g. matplotlib) and is unique
    per call, so two writers never write into each other's file. On any error the temporary file is removed and
    `path` is left as it was. With `mode` (e.g. 0o600 for a secret) the file has that mode from its creation on,
    so no other user can ever read it."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}-{secrets.token_hex(4)}.tmp{path.suffix}")
    try:
        if mode is not None:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))
        write(tmp)
        with open(tmp, "rb+") as f:  # the data must be on disk before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Replace `path` with `data`, atomically."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str, mode: int | None = None) -> None:
    """Replace `path` with `text` (UTF-8), atomically (with `mode` from the start when given)."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), mode)


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    """Replace `path` with `obj` as JSON (UTF-8, non-ASCII kept, trailing newline), atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def _fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable; a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
