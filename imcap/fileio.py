"""Atomic file writes: every result imcap writes goes through a temporary file and os.replace, so a job
killed at any moment leaves either the old file or the new one under the final name, never half of one."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


class WriteError(OSError):
    """A file imcap writes could not be written (disk full, read-only, permission, ...). `str(e)` is one line,
    `FILE: problem`, naming the file the user knows (the final name, never a temporary one)."""

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}"


def write_error(path: str | os.PathLike, error: BaseException, needed: int | None = None) -> WriteError:
    """`error` (an OSError, or a library's error carrying one, like SafetensorError's "(os error 28)"), raised
    while writing `path`, as a WriteError naming `path`; a full disk also says the space needed and free."""
    code = getattr(error, "errno", None)
    if code is None:
        found = re.search(r"os error (\d+)", str(error))
        code = int(found.group(1)) if found else None
    if code in (errno.ENOSPC, errno.EDQUOT):
        from .download import human_size

        space = f"needs {human_size(needed)}, " if needed else ""
        problem = f"{os.strerror(code)} ({space}{human_size(free_bytes(path))} free)"
    elif isinstance(error, OSError) and error.strerror:
        problem = error.strerror
    else:
        problem = str(error).splitlines()[0] if str(error) else type(error).__name__
    return WriteError(code or errno.EIO, problem, str(path))


def free_bytes(path: str | os.PathLike) -> int:
    """Bytes free (for this user) on the file system holding `path`, or its nearest existing parent."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


@contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = True, size: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; after the block succeeds it replaces `path` (else it is removed).
    A failure to write the temporary becomes a WriteError naming `path` (size: the bytes written, for its message)."""
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
    except OSError as e:
        if e.filename is not None and os.fspath(e.filename) != str(tmp):
            raise  # about another file than the one written here
        raise write_error(path, e, size) from e
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
    with atomic_path(path, fsync=fsync, size=len(data)) as tmp:
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
