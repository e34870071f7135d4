"""Reading caption datasets into one record type, and `prepare`: SOURCE -> DATA_DIR (docs/formats.md).

Formats (SOURCE is what `imcap prepare --format FMT SOURCE` takes):
    karpathy  Karpathy split JSON: {"images": [{"filepath"?, "filename", "split", "sentences": [{"raw"}]}]}
              restval -> train; `objects` (synthetic scenes' boxes) kept; id = "id", else "cocoid", else
              the filename without extension; the image is image_root/filepath/filename.
    coco      COCO caption JSON: {"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]};
              id = the COCO image id; no split inside.
    flickr8k  the folder with Flickr8k.token.txt ("name.jpg#k<TAB>caption") and Flickr_8k.{train,dev,test}Images.txt
              (dev -> val); images in none of them get split null (never used).
    flickr8k-cn  the Flickr8K-CN folder: flickr8kzhc.caption.txt ("name.jpg#zhc#k caption", one space) and
              flickr8k{train,val,test}.txt (image ids without ".jpg"); Chinese; the photos are Flickr8k's.
    aic       AI Challenger caption JSON: [{"url", "image_id": "x.jpg", "caption": ["...", ...]}]; Chinese; no
              split. Or a folder holding the genuine ai_challenger_caption_{train,validation}_*/ folders (or
              their caption_*_annotations_*.json): train -> train, validation halved (seeded) into val and test.
    lines     "image, caption" lines (the first comma or tab separates; a header line, blank lines and stray
              spaces are tolerated); several lines per image are grouped; no split.

Each reader returns (records, problems); problems are {"file", "line"?, "problem"} dicts. A SOURCE that is
not in its format (not UTF-8, not JSON, wrong shape, missing columns) raises DatasetError with a one-line
message naming the file and the line or key.
"""

from __future__ import annotations

import json
import os
import posixpath
import random
import re
import shutil
import uuid
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from PIL import Image
from tqdm import tqdm

from .fileio import write_error, write_json_atomic
from .images import ImageError, bomb_error, check_file, open_header
from .text import Tokenizer, Vocabulary, get_tokenizer, join_cjk_spaces

FORMATS = ("karpathy", "coco", "flickr8k", "flickr8k-cn", "aic", "lines")
CHINESE_FORMATS = ("flickr8k-cn", "aic")  # their language defaults to "zh"
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


# ---------------------------------------------------------------------------------------------- file helpers

def _problem(file: str | os.PathLike, problem: str, line: int | None = None) -> Problem:
    p = {"file": str(file), "problem": problem}
    if line is not None:
        p["line"] = line
    return p


def _read_text(path: Path) -> str:
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


def _read_json(path: Path, slim: Callable[[list[tuple[str, Any]]], dict] | None = None):
    """The parsed JSON of `path`. `slim` builds each object from its (key, value) pairs as it is parsed, leaving
    out what the reader never uses, so that a large file is never held whole as Python objects."""
    try:
        return json.loads(_read_text(path), object_pairs_hook=slim)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise DatasetError(f"{path}: not a caption file (JSON nested too deeply)") from None


def _without(unused: frozenset[str]) -> Callable[[list[tuple[str, Any]]], dict]:
    """A `slim` for _read_json: objects without the keys in `unused`."""
    return lambda pairs: {k: v for k, v in pairs if k not in unused}


def _slim_karpathy(pairs: list[tuple[str, Any]]) -> dict:
    """A Karpathy object without its ids of sentences, and a sentence without its tokens when it has its raw text
    (they are most of the file: prepare tokenizes the raw text itself)."""
    d = {k: v for k, v in pairs if k not in _KARPATHY_UNUSED}
    if isinstance(d.get("raw"), str):
        d.pop("tokens", None)
    return d


_KARPATHY_UNUSED = frozenset({"imgid", "sentid", "sentids"})
_COCO_UNUSED = frozenset({"license", "coco_url", "flickr_url", "date_captured", "height", "width"})


def _get(obj: dict, key: str, types: type | tuple, path: Path, where: str):
    """obj[key], checked to be of `types`; DatasetError naming the file and key otherwise."""
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: {where}: expected an object, got {type(obj).__name__}")
    if key not in obj:
        raise DatasetError(f"{path}: {where}: missing '{key}'")
    value = obj[key]
    if not isinstance(value, types) or isinstance(value, bool):
        raise DatasetError(f"{path}: {where}.{key}: unexpected {type(value).__name__} {str(value)[:40]!r}")
    return value


def _stem(file: str) -> str:
    """File name without its extension, keeping folders: "a/b.jpg" -> "a/b"."""
    return posixpath.splitext(file)[0] or file


# ---------------------------------------------------------------------------------------------- readers

def read_karpathy(path: str | os.PathLike) -> tuple[list[ImageRecord], list[Problem]]:
    """Read a Karpathy split JSON (dataset_coco.json, dataset_flickr8k.json, synthetic scenes)."""
    path = Path(path)
    data = _read_json(path, _slim_karpathy)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"{path}: not a Karpathy split JSON (expected an object with an 'images' list)")
    records, problems, from_stem = [], [], []
    for i, entry in enumerate(data["images"]):
        where = f"images[{i}]"
        filename = _get(entry, "filename", str, path, where)
        filepath = entry.get("filepath")
        file = f"{filepath}/{filename}" if isinstance(filepath, str) and filepath else filename
        sentences = _get(entry, "sentences", list, path, where)
        captions = [_karpathy_caption(s, path, f"{where}.sentences[{j}]") for j, s in enumerate(sentences)]
        split = entry.get("split")
        split = "train" if split == "restval" else split
        if split is not None and (not isinstance(split, str) or split not in SPLITS):
            problems.append(_problem(path, f"{where}: split {str(split)[:40]!r} is not train/val/test/restval: none"))
            split = None
        objects = entry.get("objects")
        if objects is not None and not isinstance(objects, list):
            problems.append(_problem(path, f"{where}.objects: not a list: ignored"))
            objects = None
        image_id = entry.get("id", entry.get("cocoid"))
        if image_id is None:
            image_id = _stem(filename)
            from_stem.append(len(records))
        if not isinstance(image_id, (str, int)) or isinstance(image_id, bool):
            raise DatasetError(f"{path}: {where}.id: unexpected {type(image_id).__name__} {str(image_id)[:40]!r}")
        records.append(ImageRecord(str(image_id), file, split, captions, objects, key=where,
                                   caption_keys=[f"{where}.sentences[{j}]" for j in range(len(captions))]))
    _unique_stem_ids([records[i] for i in from_stem])
    return records, problems


def _karpathy_caption(sentence: dict, path: Path, where: str) -> str:
    if isinstance(sentence, dict) and isinstance(sentence.get("raw"), str):
        return sentence["raw"].strip()
    if isinstance(sentence, dict) and sentence.get("raw") is not None:
        raw = sentence["raw"]
        raise DatasetError(f"{path}: {where}.raw: unexpected {type(raw).__name__} {str(raw)[:40]!r}")
    tokens = _get(sentence, "tokens", list, path, where)  # no "raw": rebuild it from the tokens
    return " ".join(str(t) for t in tokens).strip()


def read_coco(path: str | os.PathLike) -> tuple[list[ImageRecord], list[Problem]]:
    """Read a COCO caption JSON (captions_train2017.json, ...); splits are left to `prepare`."""
    path = Path(path)
    data = _read_json(path, _without(_COCO_UNUSED))
    if not (isinstance(data, dict) and isinstance(data.get("images"), list)
            and isinstance(data.get("annotations"), list)):
        raise DatasetError(f"{path}: not a COCO caption JSON (expected an object with 'images' and 'annotations' lists)")
    records, by_id, problems = [], {}, []
    for i, image in enumerate(data["images"]):
        image_id = str(_get(image, "id", (int, str), path, f"images[{i}]"))
        record = ImageRecord(image_id, _get(image, "file_name", str, path, f"images[{i}]"), None, [],
                             key=f"images[{i}]", caption_keys=[])
        records.append(record)
        by_id.setdefault(image_id, record)  # a repeated id is reported by prepare
    for j, ann in enumerate(data["annotations"]):
        image_id = str(_get(ann, "image_id", (int, str), path, f"annotations[{j}]"))
        caption = _get(ann, "caption", str, path, f"annotations[{j}]")
        if image_id not in by_id:
            problems.append(_problem(path, f"annotations[{j}]: image_id {image_id} is not in 'images': caption ignored"))
            continue
        by_id[image_id].captions.append(caption.strip())
        by_id[image_id].caption_keys.append(f"annotations[{j}]")
    return records, problems


def read_aic(path: str | os.PathLike, seed: int = 0) -> tuple[list[ImageRecord], list[Problem]]:
    """Read an AI Challenger caption JSON ([{"image_id": "x.jpg", "caption": [...]}, ...]; no split), or a
    folder of the genuine layout (see `aic_files`): images of the train file in train, those of the validation
    file halved into val and test (`halve`, seeded); a folder with only one of the two gets no split (prepare's
    seeded split then applies). Files are then relative to the folder.

    Captions are trimmed; whitespace inside one (a line break, a stray space between characters) is reported
    as a problem and kept (the Chinese tokenizers ignore it)."""
    path = Path(path)
    if not path.is_dir():
        return _read_aic_file(path)
    files = aic_files(path)
    both = {split for split, _, _ in files} == set(AIC_SPLITS)
    records, problems = [], []
    for split, json_path, image_dir in files:
        part, part_problems = _read_aic_file(json_path, prefix=f"{json_path.name}")
        folder = image_dir.relative_to(path).as_posix()
        for r in part:
            r.file = f"{folder}/{r.file}" if folder != "." else r.file
            r.split = "train" if split == "train" and both else None
        if split == "validation" and both:
            halve(part, seed)
        records += part
        problems += part_problems
    return _unique_stem_ids(records), problems


AIC_SPLITS = ("train", "validation")  # caption_<split>_annotations_<date>.json; the test sets carry no captions


def aic_files(folder: Path) -> list[tuple[str, Path, Path]]:
    """(split, caption JSON, image folder) of each caption_{train,validation}_annotations_*.json in `folder` or
    its subfolders (ai_challenger_caption_train_20170902/...); the image folder is the JSON's
    caption_*_images_* sibling, else its images/ sibling, else its own folder. DatasetError when there is none."""
    found = []
    for split in AIC_SPLITS:
        hits = sorted([*folder.glob(f"caption_{split}_annotations_*.json"), *folder.glob(f"*/caption_{split}_annotations_*.json")])
        if len(hits) > 1:
            raise DatasetError(f"{folder}: {len(hits)} AI Challenger {split} caption files ({', '.join(h.name for h in hits)}): "
                               "pass one of them")
        for json_path in hits:
            sibling = json_path.parent / json_path.stem.replace("annotations", "images")
            image_dir = next((d for d in (sibling, json_path.parent / "images") if d.is_dir()), json_path.parent)
            found.append((split, json_path, image_dir))
    if not found:
        raise DatasetError(f"{folder}: no AI Challenger caption file (caption_train_annotations_*.json or "
                           "caption_validation_annotations_*.json, here or in a subfolder)")
    return found


def halve(records: list[ImageRecord], seed: int) -> None:
    """Split `records` in place into val and test halves: ids sorted, shuffled by random.Random(seed), the
    first round(n / 2) to val, the rest to test."""
    ids = sorted(r.id for r in records)
    random.Random(seed).shuffle(ids)
    val = set(ids[: round(len(ids) / 2)])
    for r in records:
        r.split = "val" if r.id in val else "test"


def _read_aic_file(path: Path, prefix: str = "") -> tuple[list[ImageRecord], list[Problem]]:
    data = _read_json(path, _without(frozenset({"url"})))
    if not isinstance(data, list):
        raise DatasetError(f"{path}: not an AI Challenger caption JSON (expected a list of {{image_id, caption}} objects)")
    records, problems = [], []
    for i, entry in enumerate(data):
        file = _get(entry, "image_id", str, path, f"[{i}]")
        captions = _get(entry, "caption", (list, str), path, f"[{i}]")
        captions = [captions] if isinstance(captions, str) else captions
        if not all(isinstance(c, str) for c in captions):
            raise DatasetError(f"{path}: [{i}].caption: expected a list of strings")
        keys = [f"{prefix}[{i}].caption[{j}]" for j in range(len(captions))]
        records.append(ImageRecord(_stem(file), file, None, _clean_chinese(captions, path, keys, problems),
                                   key=f"{prefix}[{i}]", caption_keys=keys))
    _unique_stem_ids(records)
    return records, problems


def _clean_chinese(captions: list[str], path: Path, keys: list, problems: list,
                   lines: list[int] | None = None) -> list[str]:
    """Chinese captions trimmed; each with whitespace inside (a line break in the middle of a sentence, a stray
    space between characters) is reported. The caption is kept as written: the zh tokenizer reads it as if
    joined (text.join_cjk_spaces), and zh-char drops whitespace anyway, so such a space changes no token."""
    cleaned = []
    for k, caption in enumerate(captions):
        text = caption.strip()
        if join_cjk_spaces(text) != text:
            what = "a line break" if re.search(r"[\n\r]", text) else "stray whitespace"
            key = f"{keys[k]}: " if keys else ""
            problems.append(_problem(path, f"{key}caption {text[:30]!r} has {what} inside: tokenized as if joined",
                                     lines[k] if lines else None))
        cleaned.append(text)
    return cleaned


_HEADER_IMAGE = {"image", "images", "image_name", "image_id", "image_file", "filename", "file_name", "file", "path", "img"}
_HEADER_CAPTION = {"caption", "captions", "comment", "text", "sentence", "description"}


def read_lines(path: str | os.PathLike) -> tuple[list[ImageRecord], list[Problem]]:
    """Read "image, caption" lines (or "image<TAB>caption"); lines of the same image are grouped."""
    path = Path(path)
    by_file: dict[str, ImageRecord] = {}
    first = True
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        cut = min((i for i in (line.find(","), line.find("\t")) if i >= 0), default=-1)
        if cut < 0:
            raise DatasetError(f"{path}:{n}: expected 'image, caption' (no comma or tab on the line)")
        file, caption = line[:cut].strip(), _unquote(line[cut + 1:].strip())
        if first and (file.lower() in _HEADER_IMAGE or caption.lower() in _HEADER_CAPTION):
            first = False
            continue  # a header line
        first = False
        if not file:
            raise DatasetError(f"{path}:{n}: no image name before the separator")
        record = by_file.setdefault(file, ImageRecord(_stem(file), file, None, [], lines=[]))
        record.captions.append(caption)
        record.lines.append(n)
    return _unique_stem_ids(list(by_file.values())), []


def _unquote(text: str) -> str:
    """A CSV-quoted field without its surrounding quotes, doubled quotes undone."""
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return text[1:-1].replace('""', '"').strip()
    return text


FLICKR8K_TOKENS = "Flickr8k.token.txt"
FLICKR8K_SPLITS = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt", "test": "Flickr_8k.testImages.txt"}
_FLICKR_LINE = re.compile(r"([^\t#]+?)(?:#\d+)?\t(.*)|(\S+?)#\d+\s+(.*)")
_FLICKR_TYPO = re.compile(r"(.+\.(?:jpe?g|png))\.\d+", re.IGNORECASE)  # "x.jpg.1#0": a typo in the original file


def read_flickr8k(source: str | os.PathLike) -> tuple[list[ImageRecord], list[Problem]]:
    """Read the Flickr8k text folder (or its Flickr8k.token.txt): captions plus the official splits."""
    source = Path(source)
    folder = source.parent if source.is_file() else source
    token_file = folder / FLICKR8K_TOKENS
    if not token_file.is_file():
        raise DatasetError(f"{folder}: no {FLICKR8K_TOKENS} (expected the Flickr8k text folder)")
    by_file: dict[str, ImageRecord] = {}
    problems = []
    for n, line in enumerate(_read_text(token_file).splitlines(), 1):
        if not line.strip():
            continue
        m = _FLICKR_LINE.fullmatch(line)
        if not m:
            raise DatasetError(f"{token_file}:{n}: expected 'image.jpg#k<TAB>caption'")
        file, caption = (m[1], m[2]) if m[1] is not None else (m[3], m[4])
        file = file.strip()
        if typo := _FLICKR_TYPO.fullmatch(file):
            problems.append(_problem(token_file, f"image name {file!r} read as {typo[1]!r}", n))
            file = typo[1]
        record = by_file.setdefault(file, ImageRecord(_stem(file), file, None, [], lines=[]))
        record.captions.append(caption.strip())
        record.lines.append(n)
    problems += _read_flickr8k_splits(folder, by_file)
    return _unique_stem_ids(list(by_file.values())), problems


def _unique_stem_ids(records: list[ImageRecord]) -> list[ImageRecord]:
    """`records` (ids = file stems), where different files sharing a stem ("a.jpg", "a.png") get their file
    names as ids instead, so they are not mistaken for one image listed twice."""
    files: dict[str, set[str]] = {}
    for r in records:
        files.setdefault(r.id, set()).add(r.file)
    for r in records:
        if len(files[r.id]) > 1:
            r.id = r.file
    return records


def _read_flickr8k_splits(folder: Path, by_file: dict[str, ImageRecord], split_files: dict[str, str] = FLICKR8K_SPLITS,
                          captions_name: str = FLICKR8K_TOKENS) -> list[Problem]:
    """Set each record's split from the split files (lines: keys of `by_file`); an image in none keeps split None."""
    problems = []
    for split, name in split_files.items():
        path = folder / name
        if not path.is_file():
            problems.append(_problem(path, "split file not found: its images get no split"))
            continue
        for n, line in enumerate(_read_text(path).splitlines(), 1):
            file = line.strip()
            record = by_file.get(file)
            if not file:
                continue
            if record is None:
                problems.append(_problem(path, f"{file} has no captions in {captions_name}: ignored", n))
            elif record.split not in (None, split):
                problems.append(_problem(path, f"{file} is already in the {record.split} split: kept there", n))
            else:
                record.split = split
    return problems


FLICKR8K_CN_CAPTIONS = "flickr8kzhc.caption.txt"  # the human-written sentences (zhb, zhg: machine translations)
FLICKR8K_CN_SPLITS = {"train": "flickr8ktrain.txt", "val": "flickr8kval.txt", "test": "flickr8ktest.txt"}
_FLICKR_CN_LINE = re.compile(r"(\S+?)#zh\w*#(\d+)[ \t](.*)")


def read_flickr8k_cn(source: str | os.PathLike) -> tuple[list[ImageRecord], list[Problem]]:
    """Read the Flickr8K-CN folder (or one of its *.caption.txt files): Chinese captions, the official splits.
    The photos are not in it: they are Flickr8k's (`default_image_root`)."""
    source = Path(source)
    folder = source.parent if source.is_file() else source
    caption_path = source if source.is_file() else folder / FLICKR8K_CN_CAPTIONS
    if not caption_path.is_file():
        raise DatasetError(f"{folder}: no {FLICKR8K_CN_CAPTIONS} (expected the Flickr8K-CN folder)")
    by_file: dict[str, ImageRecord] = {}
    for n, line in enumerate(_read_text(caption_path).splitlines(), 1):
        if not line.strip():
            continue
        m = _FLICKR_CN_LINE.fullmatch(line.strip())
        if not m:
            raise DatasetError(f"{caption_path}:{n}: expected 'image.jpg#zhc#k caption'")
        record = by_file.setdefault(m[1], ImageRecord(_stem(m[1]), m[1], None, [], lines=[]))
        record.captions.append(m[3])
        record.lines.append(n)
    problems: list[Problem] = []
    for r in by_file.values():
        r.captions = _clean_chinese(r.captions, caption_path, [], problems, r.lines)
    records = _unique_stem_ids(list(by_file.values()))
    by_name = {r.id: r for r in records} | by_file  # the split files list ids without ".jpg"
    problems += _read_flickr8k_splits(folder, by_name, FLICKR8K_CN_SPLITS, caption_path.name)
    return records, problems


READERS: dict[str, Callable[..., tuple[list[ImageRecord], list[Problem]]]] = {
    "karpathy": read_karpathy, "coco": read_coco, "flickr8k": read_flickr8k, "flickr8k-cn": read_flickr8k_cn,
    "aic": read_aic, "lines": read_lines,
}


def read_source(source: str | os.PathLike, fmt: str, seed: int = 0) -> tuple[list[ImageRecord], list[Problem]]:
    """Read SOURCE with the reader for `fmt` (one of FORMATS); `seed` halves an AI Challenger validation set."""
    if fmt not in READERS:
        raise ValueError(f"unknown dataset format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if fmt == "aic":
        return read_aic(Path(source), seed=seed)
    return READERS[fmt](Path(source))


def default_image_root(source: str | os.PathLike, fmt: str, files: Sequence[str] = ()) -> Path:
    """Where the images are when not given: of the existing candidate folders, the one holding most of a
    sample of `files` (ties and no hits: the first). Candidates, in order:

    flickr8k: SOURCE/images, SOURCE/Flicker8k_Dataset, SOURCE/Flickr8k_Dataset, SOURCE;
    flickr8k-cn (F = the Flickr8K-CN folder): F/images, F/../flickr8k/images (DatasetError when neither is);
    aic, SOURCE a folder: SOURCE (files are relative to it);
    other formats (D = the caption file's folder): D/images; for captions_<name>.json (COCO)
    D/<name> and D/../<name> (annotations/captions_val2017.json -> val2017/); for an AI Challenger
    *_annotations_*.json D/*_images_*; D itself (e.g. Karpathy entries whose filepath is "images").
    """
    source = Path(source).absolute()
    if fmt == "flickr8k":
        folder = source.parent if source.is_file() else source
        candidates = [folder / "images", folder / "Flicker8k_Dataset", folder / "Flickr8k_Dataset", folder]
    elif fmt == "flickr8k-cn":
        folder = source.parent if source.is_file() else source
        candidates = [folder / "images", folder.parent / "flickr8k" / "images"]
        if not any(c.is_dir() for c in candidates):
            raise DatasetError(f"{folder}: Flickr8K-CN has no photos of its own and none are at "
                               f"{candidates[1]}: pass the Flickr8k photo folder with --images (images=)")
    elif fmt == "aic" and source.is_dir():
        candidates = [source]
    else:
        folder, stem = source.parent, source.stem
        candidates = [folder / "images"]
        if stem.startswith("captions_"):
            candidates += [folder / stem[len("captions_"):], folder.parent / stem[len("captions_"):]]
        if "annotations" in stem:
            candidates.append(folder / stem.replace("annotations", "images"))
        candidates.append(folder)
    candidates = [c for c in candidates if c.is_dir()]
    sample = list(files)[:: max(len(files) // 50, 1)][:50]
    hits = [sum(_is_file(c / f) for f in sample) for c in candidates]
    return candidates[hits.index(max(hits))]


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # name too long, NUL byte, ...: not a hit; prepare reports it later
        return False


def caption_file(source: str | os.PathLike, fmt: str) -> Path:
    """The file that line numbers in problems refer to."""
    source = Path(source).absolute()
    if fmt == "flickr8k" and not source.is_file():
        return source / FLICKR8K_TOKENS
    if fmt == "flickr8k-cn" and not source.is_file():
        return source / FLICKR8K_CN_CAPTIONS
    return source


# ---------------------------------------------------------------------------------------------- prepare steps

def _drop_unusable(records: list[ImageRecord], where: Path, counts: Counter, problems: list) -> list[ImageRecord]:
    """Records minus repeated ids (the first is kept) and files outside the image root."""
    seen, kept = set(), []
    for r in records:
        line = r.lines[0] if r.lines else None
        key = f"{r.key}: " if r.key else ""
        if r.id in seen:
            counts["duplicate"] += 1
            problems.append(_problem(where, f"{key}image id {r.id!r} ({r.file}) listed again: skipped", line))
        elif _escapes_root(r.file):
            counts["bad_path"] += 1
            problems.append(_problem(where, f"{key}image path {r.file!r} is outside the image folder: skipped", line))
        else:
            seen.add(r.id)
            kept.append(r)
    return kept


def _escapes_root(file: str) -> bool:
    """True when a listed name leaves the image folder as written: empty, absolute, or up through `..`.
    The check is on the name alone, against hostile dataset files; symlinks inside the folder are the user's
    own (a photo collection linked in) and are followed wherever they point."""
    norm = posixpath.normpath(file.replace("\\", "/"))
    return not file.strip() or norm in (".", "..") or norm.startswith("../") or posixpath.isabs(norm)


def probe_image(path: Path) -> None:
    """Check that `path` opens as an image of images.FORMATS from its header alone (fast; a truncated body
    is not noticed: the feature store marks such images failed). Raises ImageError with a one-line message."""
    check_file(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with open_header(path, str(path)) as img:
                w, h = img.size
    except Image.DecompressionBombError as e:
        raise bomb_error(str(path), e) from None
    except PermissionError:
        raise ImageError(f"{path}: permission denied") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{path}: cannot read image ({e})") from None
    if w * h == 0:
        raise ImageError(f"{path}: unusable image size {w}x{h}")


def _missing(path: Path) -> bool:
    """True when nothing is at `path`; an unreadable path (name too long, ...) is left to probe_image."""
    try:
        return not os.path.lexists(path) or not path.exists()
    except (OSError, ValueError):
        return False


def _check_images(records: list[ImageRecord], root: Path, counts: Counter, problems: list,
                  progress: bool) -> list[ImageRecord]:
    """Records whose image exists and opens; the others are counted and reported."""
    kept = []
    for r in tqdm(records, desc="checking images", unit="img", disable=not progress, leave=False):
        path = root / r.file
        if _missing(path):
            counts["missing"] += 1
            counts["missing:" + (r.split or "no split")] += 1
            problems.append(_problem(path, f"image {r.id}: listed but not found"))
            continue
        try:
            probe_image(path)
        except ImageError as e:
            counts["unreadable"] += 1
            problems.append(_problem(path, f"image {r.id}: unreadable: {str(e).removeprefix(f'{path}: ')}"))
            continue
        kept.append(r)
    return kept


def _tokenize(records: list[ImageRecord], tokenizer: Tokenizer, max_length: int, where: Path,
              counts: Counter, problems: list, progress: bool) -> list[ImageRecord]:
    """Set each record's tokens; drop empty captions, then images left with none."""
    kept = []
    words_seen: dict[str, str] = {}  # one string object per distinct word: 600k captions hold ~7M tokens
    for r in tqdm(records, desc="tokenizing", unit="img", disable=not progress, leave=False):
        captions, tokens = [], []
        for k, caption in enumerate(r.captions):
            words = tokenizer.tokenize(caption)
            if not words:
                counts["empty"] += 1
                what = "empty caption" if not caption else f"caption {caption[:30]!r} has no words"
                key = f"{r.caption_keys[k]}: " if r.caption_keys else ""
                problems.append(_problem(where, f"{key}image {r.id}: {what}: dropped", r.lines[k] if r.lines else None))
                continue
            counts["truncated"] += len(words) > max_length
            captions.append(caption)
            tokens.append([words_seen.setdefault(w, w) for w in words[:max_length]])
        if not captions:
            counts["without_captions"] += 1
            key = f"{r.key}: " if r.key else ""
            problems.append(_problem(where, f"{key}image {r.id}: no usable caption: skipped",
                                     r.lines[0] if r.lines else None))
            continue
        r.captions, r.tokens = captions, tokens
        kept.append(r)
    return kept


def assign_splits(records: list[ImageRecord], val_fraction: float, test_fraction: float, seed: int) -> None:
    """Seeded split of `records` in place: ids sorted, shuffled by random.Random(seed), then the first
    round(n * val_fraction) go to val, the next round(n * test_fraction) to test, the rest to train."""
    ids = sorted(r.id for r in records)
    random.Random(seed).shuffle(ids)
    n_val, n_test = round(len(ids) * val_fraction), round(len(ids) * test_fraction)
    split_of = {i: "val" for i in ids[:n_val]} | {i: "test" for i in ids[n_val:n_val + n_test]}
    for r in records:
        r.split = split_of.get(r.id, "train")


def _vocabulary(records: list[ImageRecord], vocab: str | os.PathLike | None, min_count: int,
                language: str, source: Path) -> Vocabulary:
    """The vocabulary loaded from `vocab`, or built on the train split."""
    if vocab is not None:
        vocabulary = load_vocab(vocab)
        if vocabulary.language != language:
            raise ValueError(f"{vocab}: vocabulary is for language {vocabulary.language!r}, not {language!r}")
        return vocabulary
    train = [t for r in records if r.split == "train" for t in r.tokens]
    if not train:
        raise DatasetError(f"{source}: no images in the train split to build a vocabulary on (pass vocab=PATH)")
    return Vocabulary.build(train, min_count=min_count, language=language)


def _check_options(fmt: str, min_count: int, max_length: int, val_fraction: float, test_fraction: float,
                   split: str | None) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown dataset format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if min_count < 1 or max_length < 1:
        raise ValueError(f"min_count and max_length must be >= 1, got {min_count} and {max_length}")
    if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction + test_fraction must be in [0, 1), got {val_fraction} + {test_fraction}")


# ---------------------------------------------------------------------------------------------- prepare

def prepare(source: str | os.PathLike, fmt: str, out_dir: str | os.PathLike, *,
            images: str | os.PathLike | None = None, language: str | None = None, min_count: int = 5,
            max_length: int = 30, val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0,
            split: str | None = None, vocab: str | os.PathLike | None = None, progress: bool = True) -> dict:
    """Read SOURCE in format `fmt`, check its images, tokenize, split, build the vocabulary, and write
    dataset.json, vocab.json and report.json into `out_dir` (docs/formats.md). Returns the report.

    images: the image folder; default: the candidate folder holding the listed files (`default_image_root`):
        SOURCE/images for flickr8k; the caption file's images/ subfolder, val2017/ beside annotations/ for
        COCO's annotations/captions_val2017.json, or the caption file's own folder for the others.
    language: "en", "zh" (jieba words), "zh-char" (characters), "space"/"vi"; default "zh" for aic and
        flickr8k-cn, else "en". It is recorded in dataset.json (and so in the checkpoint), and evaluation scores
        the stored tokens, space-joined, for every language but "en".
    Splits: the source's own (karpathy, flickr8k, flickr8k-cn, an aic folder: train, and its validation file
        halved into val and test with `seed`); when the source gives none (coco, aic, lines) a seeded
        split of the usable images (see `assign_splits`); `split=` puts every image in that split.
    vocab: a vocab.json (or a DATA_DIR holding one) to use instead of building one on the train split.
    Missing, unreadable and duplicate images, paths outside the image folder and empty captions are
    counted and listed in the report, never fatal. DatasetError when SOURCE is malformed or no image is usable.
    """
    _check_options(fmt, min_count, max_length, val_fraction, test_fraction, split)
    source, out_dir = Path(source).resolve(), Path(out_dir).resolve()
    tokenizer = get_tokenizer(language or ("zh" if fmt in CHINESE_FORMATS else "en"))
    records, problems = read_source(source, fmt, seed=seed)
    files = [r.file for r in records]
    root = Path(images).resolve() if images is not None else default_image_root(source, fmt, files)
    if not root.is_dir():
        raise DatasetError(f"{root}: image folder not found")
    where = caption_file(source, fmt)
    counts = Counter(listed=len(records))
    has_splits = any(r.split for r in records)
    records = _drop_unusable(records, where, counts, problems)
    records = _check_images(records, root, counts, problems, progress)
    counts["present"] = len(records)
    records = _tokenize(records, tokenizer, max_length, where, counts, problems, progress)
    if not records:
        skipped = counts["duplicate"] + counts["bad_path"]
        raise DatasetError(f"{source}: none of the {counts['listed']} listed images is usable under {root} "
                           f"({counts['missing']} missing, {counts['unreadable']} unreadable"
                           + (f", {counts['without_captions']} without a usable caption" if counts["without_captions"] else "")
                           + (f", {skipped} skipped (repeated or outside the image folder)" if skipped else "") + ")")
    if split is not None:
        for r in records:
            r.split = split
    elif not has_splits:
        assign_splits(records, val_fraction, test_fraction, seed)
    vocabulary = _vocabulary(records, vocab, min_count, tokenizer.language, source)

    dataset = {"version": DATASET_VERSION, "format": fmt, "source": str(source), "language": tokenizer.language,
               "image_root": str(root), "max_length": max_length, "images": [r.to_dict() for r in records]}
    split_source = "forced" if split is not None else "source" if has_splits else "seeded"
    report = _report(dataset, records, vocabulary, vocab, counts, problems, out_dir, split_source,
                     dict(seed=seed, val_fraction=val_fraction, test_fraction=test_fraction))
    _write_outputs(out_dir, dataset, vocabulary, report)
    return report


COMMIT_DIR = ".prepare-commit"  # inside DATA_DIR: the new outputs, complete, while they are moved in
OUTPUTS = ("dataset.json", "vocab.json", "report.json")


def _write_outputs(out_dir: Path, dataset: dict, vocabulary: Vocabulary, report: dict) -> None:
    """Write dataset.json, vocab.json and report.json as one: all three are written to a staging folder,
    which is renamed to COMMIT_DIR (the commit point), and then moved into place. A prepare that fails or
    is killed before the commit leaves a previous DATA_DIR as it was; one killed after it is completed by
    the next reader (`_finish_commit`), so dataset.json and vocab.json always come from the same run.
    A write that fails (a full disk) is a WriteError naming the file as it would be in DATA_DIR."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _finish_commit(out_dir)
    for stale in out_dir.glob(".prepare-*.tmp"):  # left by a killed prepare
        shutil.rmtree(stale, ignore_errors=True)
    stage = out_dir / f".prepare-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    stage.mkdir()
    try:
        write_json_atomic(stage / "dataset.json", dataset, indent=None)
        vocabulary.save(stage / "vocab.json")
        write_json_atomic(stage / "report.json", report, indent=1)
        os.replace(stage, out_dir / COMMIT_DIR)
    except OSError as e:
        written = Path(os.fspath(e.filename)) if e.filename is not None else stage
        if not written.is_relative_to(stage):
            raise
        raise write_error(out_dir / written.relative_to(stage), e) from e  # not the staging folder's name
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    _finish_commit(out_dir)


def _finish_commit(data_dir: Path) -> None:
    """Move the files of a committed prepare into DATA_DIR (roll forward after a kill); no-op otherwise."""
    commit = Path(data_dir) / COMMIT_DIR
    if not commit.is_dir():
        return
    for name in OUTPUTS:
        try:
            os.replace(commit / name, Path(data_dir) / name)
        except FileNotFoundError:  # already moved (by us before a kill, or by another reader)
            pass
    shutil.rmtree(commit, ignore_errors=True)


def image_failures(report: dict) -> list[str]:
    """One line "<file>: <problem>" per listed image that exists but cannot be opened (from a report)."""
    lines = []
    for p in report["problems"]:
        _, sep, why = p["problem"].partition(": unreadable: ")
        if sep:
            lines.append(f"{p['file']}: {why}")
    return lines


def _report(dataset: dict, records: list[ImageRecord], vocabulary: Vocabulary, vocab_from, counts: Counter,
            problems: list, out_dir: Path, split_source: str, split_options: dict) -> dict:
    """The report.json object."""
    tokens = [t for r in records for caption in r.tokens for t in caption]
    per_split = Counter(r.split for r in records)
    return {
        "version": DATASET_VERSION,
        **{k: dataset[k] for k in ("format", "source", "language", "image_root", "max_length")},
        "out_dir": str(out_dir),
        "images_listed": counts["listed"],  # = present + missing + unreadable + duplicate + bad_path
        "images_present": counts["present"],  # exist and open
        "images_missing": counts["missing"],
        "images_missing_by_split": {k.split(":", 1)[1]: n for k, n in counts.items() if k.startswith("missing:")},
        "images_unreadable": counts["unreadable"],
        "images_duplicate": counts["duplicate"],
        "images_bad_path": counts["bad_path"],
        "images_without_captions": counts["without_captions"],  # present, but no usable caption: skipped
        "images_kept": len(records),  # in dataset.json
        "images_no_split": per_split[None],
        "splits": {s: per_split[s] for s in SPLITS},
        "split_source": split_source,  # source | seeded | forced
        **({"split_" + k: v for k, v in split_options.items()} if split_source == "seeded" else {}),
        "captions": sum(len(r.captions) for r in records),
        "captions_empty": counts["empty"],  # dropped: empty or without a single word
        "captions_truncated": counts["truncated"],  # longer than max_length tokens: cut
        "vocab_size": len(vocabulary),
        "vocab_min_count": vocabulary.min_count,
        "vocab_from": str(Path(vocab_from).absolute()) if vocab_from is not None else None,  # None: built on train
        "tokens": len(tokens),
        "tokens_unk": sum(t not in vocabulary for t in tokens),
        "problems": problems,
    }


def format_summary(report: dict) -> str:
    """A few human-readable lines about a prepare report (what the CLI prints)."""
    r = report
    skipped = r["images_duplicate"] + r["images_bad_path"] + r["images_without_captions"]
    splits = ", ".join(f"{s} {n:,}" for s, n in r["splits"].items())
    unk = r["tokens_unk"] / max(r["tokens"], 1)
    missing = r.get("images_missing_by_split", {})
    by_split = f" ({', '.join(f'{s} {n:,}' for s, n in missing.items())})" if missing else ""
    vocab_from = f"from {r['vocab_from']}" if r["vocab_from"] else f"min count {r['vocab_min_count']}, built on train"
    lines = [
        f"{r['format']}: {r['source']} (images in {r['image_root']})",
        f"images: {r['images_listed']:,} listed, {r['images_present']:,} present, {r['images_missing']:,} missing{by_split}, "
        f"{r['images_unreadable']:,} unreadable" + (f", {skipped:,} skipped" if skipped else ""),
        f"splits ({r['split_source']}): {splits}" + (f", in no split {r['images_no_split']:,}" if r["images_no_split"] else ""),
        f"captions: {r['captions']:,} kept, {r['captions_empty']:,} empty dropped, "
        f"{r['captions_truncated']:,} truncated to {r['max_length']} tokens",
        f"vocabulary: {r['vocab_size']:,} tokens ({vocab_from}); {unk:.1%} of caption tokens are <unk>",
        f"{len(r['problems']):,} problems; details in {Path(r['out_dir']) / 'report.json'}",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- reading back

def load_dataset(data_dir: str | os.PathLike) -> tuple[dict, list[dict]]:
    """Read DATA_DIR/dataset.json: (everything but the images, the image entries as in the file).

    Each entry has "id", "file" (relative to meta["image_root"]), "split", "captions", "tokens" and,
    for synthetic scenes, "objects"; `ImageRecord.from_dict` turns one into a record.
    """
    _finish_commit(Path(data_dir))
    path = Path(data_dir) / "dataset.json"
    if not path.is_file():
        raise DatasetError(f"{path}: no such file (run `imcap prepare` first)")
    data = _read_json(path)
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
        _finish_commit(path)
        path = path / "vocab.json"
    return Vocabulary.load(path)
