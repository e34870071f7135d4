"""The one record type every reader returns, the error a malformed source raises, and the file helpers the
readers and load_dataset share (a source as UTF-8 text or JSON, a problem entry of report.json)."""

from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

SPLITS = ("train", "val", "test")
DATASET_VERSION = 1

Problem = dict  # {"file": str, "line": int (when known), "problem": str}


class DatasetError(Exception):
    """A caption source that cannot be read; str(error) is one line naming the file (and line or key)."""


@dataclass
class ImageRecord:
    """One image and its captions, whatever format it came from."""

    id: str  # the source's id, unique within a dataset
    file: str  # path relative to the image root, "/"-separated
    split: str | None  # train | val | test | None (in no split: never used)
    captions: list[str]  # raw captions, whitespace-trimmed
    objects: list[dict] | None = None  # ground-truth boxes (synthetic scenes), as in the source
    tokens: list[list[str]] | None = None  # one token list per caption (set by prepare)
    lines: list[int] | None = field(default=None, repr=False, compare=False)  # source line of each caption
    key: str | None = field(default=None, repr=False, compare=False)  # JSON sources: where the entry is, "images[3]"
    caption_keys: list[str] | None = field(default=None, repr=False, compare=False)  # JSON: where each caption is

    def to_dict(self) -> dict:
        """The dataset.json entry for this image."""
        d = {"id": self.id, "file": self.file, "split": self.split, "captions": self.captions, "tokens": self.tokens}
        if self.objects is not None:
            d["objects"] = self.objects
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ImageRecord:
        """Inverse of to_dict."""
        return cls(str(d["id"]), d["file"], d.get("split"), list(d["captions"]), d.get("objects"), d.get("tokens"))


def escapes_root(file: str) -> bool:
    """True when a listed name leaves the image folder as written: empty, absolute, or up through `..`.
    The check is on the name alone, against hostile dataset files; symlinks inside the folder are the user's
    own (a photo collection linked in) and are followed wherever they point."""
    norm = posixpath.normpath(file.replace("\\", "/"))
    return not file.strip() or norm in (".", "..") or norm.startswith("../") or posixpath.isabs(norm)


def problem(file: str | os.PathLike, text: str, line: int | None = None) -> Problem:
    """A report.json problem entry."""
    p = {"file": str(file), "problem": text}
    if line is not None:
        p["line"] = line
    return p


def read_text(path: Path) -> str:
    """The UTF-8 text of `path` (a BOM is dropped); DatasetError naming the file otherwise."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DatasetError(f"{path}: is a directory, expected a file") from None
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e.strerror})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DatasetError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def read_json(path: Path, slim: Callable[[list[tuple[str, Any]]], dict] | None = None) -> Any:
    """The parsed JSON of `path`. `slim` builds each object from its (key, value) pairs as it is parsed, leaving
    out what the reader never uses, so that a large file is never held whole as Python objects."""
    try:
        return json.loads(read_text(path), object_pairs_hook=slim)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise DatasetError(f"{path}: not a caption file (JSON nested too deeply)") from None
