"""`prepare`: SOURCE -> DATA_DIR. Read the source (formats.py), check its images (images.probe_image), tokenize,
split, build the vocabulary, then write dataset.json, vocab.json and report.json as one (commit.py)."""

from __future__ import annotations

import os
import random
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from ..images import ImageError, probe_image
from ..text import Tokenizer, Vocabulary, get_tokenizer
from .commit import write_outputs
from .formats import caption_file, default_image_root, get_format, read_source
from .load import load_vocab
from .records import DATASET_VERSION, SPLITS, DatasetError, ImageRecord, escapes_root, problem
from .report import make_report


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
    tokenizer = get_tokenizer(language or get_format(fmt).language)
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
    report = make_report(dataset, records, vocabulary, vocab, counts, problems, out_dir, split_source,
                         dict(seed=seed, val_fraction=val_fraction, test_fraction=test_fraction))
    write_outputs(out_dir, dataset, vocabulary, report)
    return report


def _check_options(fmt: str, min_count: int, max_length: int, val_fraction: float, test_fraction: float,
                   split: str | None) -> None:
    get_format(fmt)  # ValueError for an unknown one
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if min_count < 1 or max_length < 1:
        raise ValueError(f"min_count and max_length must be >= 1, got {min_count} and {max_length}")
    if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction + test_fraction must be in [0, 1), got {val_fraction} + {test_fraction}")


# ---------------------------------------------------------------------------------------------- steps

def _drop_unusable(records: list[ImageRecord], where: Path, counts: Counter, problems: list) -> list[ImageRecord]:
    """Records minus repeated ids (the first is kept) and files outside the image root."""
    seen, kept = set(), []
    for r in records:
        line = r.lines[0] if r.lines else None
        key = f"{r.key}: " if r.key else ""
        if r.id in seen:
            counts["duplicate"] += 1
            problems.append(problem(where, f"{key}image id {r.id!r} ({r.file}) listed again: skipped", line))
        elif escapes_root(r.file):
            counts["bad_path"] += 1
            problems.append(problem(where, f"{key}image path {r.file!r} is outside the image folder: skipped", line))
        else:
            seen.add(r.id)
            kept.append(r)
    return kept


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
            problems.append(problem(path, f"image {r.id}: listed but not found"))
            continue
        try:
            probe_image(path)
        except ImageError as e:
            counts["unreadable"] += 1
            problems.append(problem(path, f"image {r.id}: unreadable: {str(e).removeprefix(f'{path}: ')}"))
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
                problems.append(problem(where, f"{key}image {r.id}: {what}: dropped", r.lines[k] if r.lines else None))
                continue
            counts["truncated"] += len(words) > max_length
            captions.append(caption)
            tokens.append([words_seen.setdefault(w, w) for w in words[:max_length]])
        if not captions:
            counts["without_captions"] += 1
            key = f"{r.key}: " if r.key else ""
            problems.append(problem(where, f"{key}image {r.id}: no usable caption: skipped",
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

