"""What a prepare did, for people and scripts: report.json (counts, splits, vocabulary, every problem),
the summary the CLI prints, and the images that exist but cannot be opened."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from ..text import Vocabulary
from .records import DATASET_VERSION, SPLITS, ImageRecord, Problem


def make_report(dataset: dict, records: list[ImageRecord], vocabulary: Vocabulary,
                vocab_from: str | os.PathLike | None, counts: Counter, problems: list[Problem], out_dir: Path,
                split_source: str, split_options: dict) -> dict:
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


def image_failures(report: dict) -> list[str]:
    """One line "<file>: <problem>" per listed image that exists but cannot be opened (from a report)."""
    lines = []
    for p in report["problems"]:
        _, sep, why = p["problem"].partition(": unreadable: ")
        if sep:
            lines.append(f"{p['file']}: {why}")
    return lines
