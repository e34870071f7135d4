"""The readers: each caption format into ImageRecords (docs/formats.md); formats.py says which to use for what.

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

import os
import posixpath
import random
import re
from pathlib import Path
from typing import Any, Callable

from ..text import join_cjk_spaces
from .records import SPLITS, DatasetError, ImageRecord, Problem, problem, read_json, read_text


def _without(unused: frozenset[str]) -> Callable[[list[tuple[str, Any]]], dict]:
    """A `slim` for read_json: objects without the keys in `unused`."""
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
    data = read_json(path, _slim_karpathy)
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
            problems.append(problem(path, f"{where}: split {str(split)[:40]!r} is not train/val/test/restval: none"))
            split = None
        objects = entry.get("objects")
        if objects is not None and not isinstance(objects, list):
            problems.append(problem(path, f"{where}.objects: not a list: ignored"))
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
    data = read_json(path, _without(_COCO_UNUSED))
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
            problems.append(problem(path, f"annotations[{j}]: image_id {image_id} is not in 'images': caption ignored"))
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
    data = read_json(path, _without(frozenset({"url"})))
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
            problems.append(problem(path, f"{key}caption {text[:30]!r} has {what} inside: tokenized as if joined",
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
    for n, line in enumerate(read_text(path).splitlines(), 1):
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
    for n, line in enumerate(read_text(token_file).splitlines(), 1):
        if not line.strip():
            continue
        m = _FLICKR_LINE.fullmatch(line)
        if not m:
            raise DatasetError(f"{token_file}:{n}: expected 'image.jpg#k<TAB>caption'")
        file, caption = (m[1], m[2]) if m[1] is not None else (m[3], m[4])
        file = file.strip()
        if typo := _FLICKR_TYPO.fullmatch(file):
            problems.append(problem(token_file, f"image name {file!r} read as {typo[1]!r}", n))
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
            problems.append(problem(path, "split file not found: its images get no split"))
            continue
        for n, line in enumerate(read_text(path).splitlines(), 1):
            file = line.strip()
            record = by_file.get(file)
            if not file:
                continue
            if record is None:
                problems.append(problem(path, f"{file} has no captions in {captions_name}: ignored", n))
            elif record.split not in (None, split):
                problems.append(problem(path, f"{file} is already in the {record.split} split: kept there", n))
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
    for n, line in enumerate(read_text(caption_path).splitlines(), 1):
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
