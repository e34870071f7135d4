"""The dataset formats `imcap prepare --format` takes. FORMATS maps each name to its reader (readers.py), its
default language and where its caption file and images are: a new format is one entry here, and the CLI's
--format choices and help come from it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from .readers import (FLICKR8K_CN_CAPTIONS, FLICKR8K_TOKENS, read_aic, read_coco, read_flickr8k, read_flickr8k_cn,
                      read_karpathy, read_lines)
from .records import DatasetError, ImageRecord, Problem

Reader = Callable[[Path, int], tuple[list[ImageRecord], list[Problem]]]  # (SOURCE, seed) -> (records, problems)


def _unseeded(read: Callable[[Path], tuple[list[ImageRecord], list[Problem]]]) -> Reader:
    return lambda source, seed: read(source)


def _folder(source: Path) -> Path:
    """The folder of a folder format whose SOURCE may also be one of its files."""
    return source.parent if source.is_file() else source


def _beside_caption_file(source: Path) -> list[Path]:
    """D/images (D: the caption file's folder); for captions_<name>.json (COCO) D/<name> and D/../<name>
    (annotations/captions_val2017.json -> val2017/); for an AI Challenger *_annotations_*.json D/*_images_*;
    D itself (e.g. Karpathy entries whose filepath is "images")."""
    folder, stem = source.parent, source.stem
    candidates = [folder / "images"]
    if stem.startswith("captions_"):
        candidates += [folder / stem[len("captions_"):], folder.parent / stem[len("captions_"):]]
    if "annotations" in stem:
        candidates.append(folder / stem.replace("annotations", "images"))
    candidates.append(folder)
    return candidates


def _flickr8k_roots(source: Path) -> list[Path]:
    """F/images, F/Flicker8k_Dataset, F/Flickr8k_Dataset, F (F: the Flickr8k text folder)."""
    folder = _folder(source)
    return [folder / "images", folder / "Flicker8k_Dataset", folder / "Flickr8k_Dataset", folder]


def _flickr8k_cn_roots(source: Path) -> list[Path]:
    """F/images, F/../flickr8k/images (F: the Flickr8K-CN folder); DatasetError when neither is."""
    folder = _folder(source)
    candidates = [folder / "images", folder.parent / "flickr8k" / "images"]
    if not any(c.is_dir() for c in candidates):
        raise DatasetError(f"{folder}: Flickr8K-CN has no photos of its own and none are at "
                           f"{candidates[1]}: pass the Flickr8k photo folder with --images (images=)")
    return candidates


def _aic_roots(source: Path) -> list[Path]:
    return [source] if source.is_dir() else _beside_caption_file(source)  # a folder: files are relative to it


@dataclass(frozen=True)
class Format:
    """How one format's SOURCE is read, and where its files are when not given."""

    read: Reader  # (SOURCE, seed) -> (records, problems); the seed halves an AI Challenger validation set
    help: str  # what SOURCE is, one line for `imcap prepare --help`
    language: str = "en"  # the tokenizer language when none is given
    caption_file: Callable[[Path], Path] = lambda source: source  # the file line numbers in problems refer to
    image_roots: Callable[[Path], list[Path]] = _beside_caption_file  # candidate image folders, in order


FORMATS: dict[str, Format] = {
    "karpathy": Format(_unseeded(read_karpathy), "a Karpathy split JSON (dataset_coco.json, synthetic scenes)"),
    "coco": Format(_unseeded(read_coco), "a COCO caption JSON (annotations/captions_val2017.json)"),
    "flickr8k": Format(_unseeded(read_flickr8k), "the Flickr8k text folder (Flickr8k.token.txt, the split files)",
                       caption_file=lambda s: s if s.is_file() else s / FLICKR8K_TOKENS, image_roots=_flickr8k_roots),
    "flickr8k-cn": Format(_unseeded(read_flickr8k_cn), "the Flickr8K-CN folder (Chinese; photos: Flickr8k's)",
                          language="zh",
                          caption_file=lambda s: s if s.is_file() else s / FLICKR8K_CN_CAPTIONS,
                          image_roots=_flickr8k_cn_roots),
    "aic": Format(read_aic, "an AI Challenger caption JSON, or a folder of its train and validation sets (Chinese)",
                  language="zh", image_roots=_aic_roots),
    "lines": Format(_unseeded(read_lines), "a text file of 'image, caption' lines"),
}


def get_format(fmt: str) -> Format:
    """FORMATS[fmt]; ValueError naming the formats for an unknown one."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown dataset format {fmt!r}: expected one of {', '.join(FORMATS)}")
    return FORMATS[fmt]


def read_source(source: str | os.PathLike, fmt: str, seed: int = 0) -> tuple[list[ImageRecord], list[Problem]]:
    """Read SOURCE with the reader for `fmt` (one of FORMATS); `seed` halves an AI Challenger validation set."""
    return get_format(fmt).read(Path(source), seed)


def caption_file(source: str | os.PathLike, fmt: str) -> Path:
    """The file that line numbers in problems refer to."""
    return get_format(fmt).caption_file(Path(source).absolute())


def default_image_root(source: str | os.PathLike, fmt: str, files: Sequence[str] = ()) -> Path:
    """Where the images are when not given: of the existing candidate folders, the one holding most of a
    sample of `files` (ties and no hits: the first). The candidates are the format's `image_roots`:
    flickr8k: SOURCE/images, SOURCE/Flicker8k_Dataset, SOURCE/Flickr8k_Dataset, SOURCE; flickr8k-cn: see
    _flickr8k_cn_roots; an aic folder: itself; any other caption file: see _beside_caption_file."""
    candidates = [c for c in get_format(fmt).image_roots(Path(source).absolute()) if c.is_dir()]
    sample = list(files)[:: max(len(files) // 50, 1)][:50]
    hits = [sum(_is_file(c / f) for f in sample) for c in candidates]
    return candidates[hits.index(max(hits))]


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # name too long, NUL byte, ...: not a hit; prepare reports it later
        return False
