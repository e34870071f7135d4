"""Reading a DATA_DIR back: its dataset.json and vocab.json (completing a prepare killed mid-commit first),
and the rows of a split."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from ..text import Vocabulary
from .commit import finish_commit
from .records import DATASET_VERSION, DatasetError, read_json


def load_dataset(data_dir: str | os.PathLike) -> tuple[dict, list[dict]]:
    """Read DATA_DIR/dataset.json: (everything but the images, the image entries as in the file).

    Each entry has "id", "file" (relative to meta["image_root"]), "split", "captions", "tokens" and,
    for synthetic scenes, "objects"; `ImageRecord.from_dict` turns one into a record.
    """
    finish_commit(Path(data_dir))
    path = Path(data_dir) / "dataset.json"
    if not path.is_file():
        raise DatasetError(f"{path}: no such file (run `imcap prepare` first)")
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"{path}: not a dataset.json (expected an object with an 'images' list)")
    if data.get("version") != DATASET_VERSION:
        raise DatasetError(f"{path}: dataset version {data.get('version')!r}, expected {DATASET_VERSION}")
    for i, entry in enumerate(data["images"]):
        if not isinstance(entry, dict) or not {"id", "file", "split", "captions", "tokens"} <= entry.keys():
            raise DatasetError(f"{path}: images[{i}]: expected an object with id, file, split, captions and tokens")
    return {k: v for k, v in data.items() if k != "images"}, data["images"]


def load_vocab(data_dir: str | os.PathLike) -> Vocabulary:
    """The vocabulary of DATA_DIR (its vocab.json), or of a vocab.json path."""
    path = Path(data_dir)
    if path.is_dir():
        finish_commit(path)
        path = path / "vocab.json"
    return Vocabulary.load(path)


def split_rows(images: Sequence[dict], split: str, ok: Sequence[bool] | None = None) -> list[int]:
    """The rows (indices into `images`, as load_dataset returns them) of the images in `split`; with `ok` (one
    bool per row, a feature store's `ok`), only those that have features."""
    return [i for i, im in enumerate(images) if im.get("split") == split and (ok is None or ok[i])]
