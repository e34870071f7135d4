"""Evaluate a trained captioner on a split: decode for real, score as the COCO caption evaluation does.

English captions are scored from the raw references with the PTB tokenizer (as in COCO's evaluation,
so numbers compare with papers); other languages from imcap's own tokens.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .api import Captioner
from .fileio import write_json_atomic
from .datasets import load_dataset
from .decoding import DecodingOptions
from .features import FeatureStore
from .metrics import score_captions, write_coco_results


def evaluate(run_dir: str | os.PathLike, data_dir: str | os.PathLike | None = None, *, split: str = "test",
             options: DecodingOptions = DecodingOptions(), limit: int = 0, batch_size: int = 100,
             captioner: Captioner | None = None) -> dict:
    """Scores (BLEU-1..4, METEOR, ROUGE_L, CIDEr) of RUN_DIR's best checkpoint on DATA_DIR's `split`.

    Writes RUN_DIR/eval/<split>-beam<K>.results.json (COCO results format) and .scores.json beside it.
    """
    captioner = captioner or Captioner.load(run_dir)
    data_dir = Path(data_dir or captioner.meta["data"]["data_dir"])
    meta, images = load_dataset(data_dir)
    spec = captioner.encoder_spec
    store = FeatureStore.open(data_dir, encoder=spec.name, image_size=spec.image_size)
    if store.spec.weights != spec.weights:
        raise ValueError(f"{store.path}: features were made with weights {store.spec.weights}, the model with {spec.weights}")
    rows = [i for i, im in enumerate(images) if im.get("split") == split and store.ok[i]]
    rows = rows[:limit] if limit else rows
    if not rows:
        raise ValueError(f"{data_dir}: no images with features in split {split!r}")
    t0 = time.time()
    hyps = {}
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        names = [images[i]["id"] for i in chunk]
        for r in captioner.caption_features(store.get(np.array(chunk)), options, names):
            hyps[r.image] = r.caption if meta.get("language", "en") == "en" else " ".join(r.tokens)
    decode_seconds = time.time() - t0
    if meta.get("language", "en") == "en":
        refs = {images[i]["id"]: images[i]["captions"] for i in rows}
        scores = score_captions(refs, hyps, tokenize=True)
    else:
        refs = {images[i]["id"]: [" ".join(t) for t in images[i]["tokens"]] for i in rows}
        scores = score_captions(refs, hyps, tokenize=False)
    out = Path(run_dir) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{split}-beam{options.beam_size}"
    write_coco_results(out / f"{stem}.results.json", hyps)
    report = {"scores": scores, "split": split, "images": len(rows), "data_dir": str(data_dir),
              "checkpoint": captioner.meta.get("path"), "decoding": asdict(options),
              "decode_seconds": round(decode_seconds, 2)}
    write_json_atomic(out / f"{stem}.scores.json", report)
    return report
