"""Atomic file writes: every result imcap writes goes through a temporary file and os.replace, so a job
killed at any moment leaves either the old file or the new one under the final name, never half of one."""

from __future__ import annotations

import json
import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path`; after the block succeeds it replaces `path` (else it is removed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of atomic_path left in `directory` by processes that no longer run (killed
    mid-write); a live process' temporary is left alone. Returns the paths removed."""
    removed = []
    for tmp in Path(directory).glob(".*.tmp"):
        try:
            pid = int(tmp.name.split(".")[-3])
        except (IndexError, ValueError):
            continue  # not one of ours
        try:
            os.kill(pid, 0)
            continue  # its writer still runs
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # another user's live process
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def write_bytes_atomic(path: str | os.PathLike, data: bytes, *, fsync: bool = True) -> Path:
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int | None = 1, fsync: bool = True) -> Path:
    """JSON (UTF-8, non-ASCII kept) written atomically."""
    text = json.dumps(obj, ensure_ascii=False, indent=indent) + "\n"
    return write_bytes_atomic(path, text.encode("utf-8"), fsync=fsync)


def write_jsonl_atomic(path: str | os.PathLike, records: list[Any]) -> Path:
    """One JSON object per line, written atomically."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return write_bytes_atomic(path, text.encode("utf-8"))
