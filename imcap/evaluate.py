"""Evaluate a trained captioner on a split: decode for real, score as the COCO caption evaluation does.

English captions are scored from the raw references with the PTB tokenizer (as in COCO's evaluation,
so numbers compare with papers). Chinese captions (a zh or zh-char DATA_DIR alike) are scored as the AI
Challenger evaluation scores them: references and captions are both segmented into words with jieba
(accurate mode, punctuation dropped) and the COCO scorers compare the words, so word and character models
get comparable scores; METEOR, which is English-specific, is not reported, and the same scores on single
characters are reported beside them. Other languages are scored from imcap's own tokens.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from .api import Captioner
from .fileio import write_json_atomic
from .datasets import load_dataset, split_rows
from .decoding import DecodingOptions
from .ensemble import member_names, read_members
from .devices import autocast
from .features import FeatureStore
from .metrics import score_captions, score_chinese, write_coco_results
from .packaged import resolve as resolve_packaged
from .synth import mean_grounding


def evaluate(run_dir: str | os.PathLike, data_dir: str | os.PathLike | None = None, *, split: str = "test",
             options: DecodingOptions = DecodingOptions(), limit: int = 0, batch_size: int = 100,
             captioner: Captioner | None = None, device: str | torch.device = "auto", precision: str = "auto") -> dict:
    """Scores (BLEU-1..4, METEOR, ROUGE_L, CIDEr) of RUN_DIR's best checkpoint on DATA_DIR's `split`.

    Writes RUN_DIR/eval/<split>-beam<K>[-lp<X>][-unk][-norepeat<N>][-ensemble-<runs>].results.json (COCO results format) and
    .scores.json beside it (./eval/NAME/ for a packaged model); an ensemble captioner (Captioner.load_ensemble)
    scores in its first run's folder.
    device, precision: where and how the search runs (Captioner.load's); a given captioner keeps its own.
    """
    captioner = captioner or Captioner.load(run_dir, device=device, precision=precision)
    if data_dir is None and resolve_packaged(run_dir) is not None:
        raise ValueError(f"{run_dir} is a packaged model, trained elsewhere: name the DATA_DIR to score it on with --data")
    data_dir = Path(data_dir or captioner.meta["data"]["data_dir"])
    meta, images = load_dataset(data_dir)
    t0 = time.time()
    rows, batches = _annotations(captioner, data_dir, images, split, limit, batch_size)
    hyps, boxed = {}, []  # boxed: (result, record) of scenes with ground-truth boxes, for the grounding score
    with autocast(captioner.device, captioner.encoder_precision):  # the CNN of a fine-tuned run, if it runs
        for chunk, features in batches:
            names = [images[i]["id"] for i in chunk]
            for i, r in zip(chunk, captioner.caption_features(features, options, names)):
                hyps[r.image] = r.caption  # the text: words joined by spaces, Chinese without
                if images[i].get("objects"):
                    boxed.append((r, images[i]))
    decode_seconds = time.time() - t0
    rows = [i for i in rows if images[i]["id"] in hyps]  # without images that could not be read
    language = str(meta.get("language", "en"))
    extra = {}
    if language == "en":
        refs = {images[i]["id"]: images[i]["captions"] for i in rows}
        scores = score_captions(refs, hyps, tokenize=True)
    elif language.startswith("zh"):
        refs = {images[i]["id"]: images[i]["captions"] for i in rows}  # the text: cut the same way for every model
        scores, extra["character_scores"] = (score_chinese(refs, hyps, unit=unit) for unit in ("zh", "zh-char"))
    else:
        refs = {images[i]["id"]: [" ".join(t) for t in images[i]["tokens"]] for i in rows}
        scores = score_captions(refs, hyps, tokenize=False)
    # a packaged model's results go to ./eval/NAME: not into the package, nor into a ./NAME that would then
    # shadow the packaged name
    out = Path("eval") / str(run_dir) if resolve_packaged(run_dir) is not None else Path(run_dir) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    stem = (f"{split}-beam{options.beam_size}" + (f"-lp{options.length_penalty:g}" if options.length_penalty else "")
            + ("-unk" if options.allow_unk else "") + (f"-norepeat{options.no_repeat_ngram}" if options.no_repeat_ngram else ""))
    if "ensemble" in captioner.meta and read_members(run_dir) is None:  # --ensemble: name the others
        stem += "-ensemble-" + "-".join(member_names(captioner.meta["ensemble"][1:], here=run_dir))
    write_coco_results(out / f"{stem}.results.json", hyps)
    report = {"scores": scores, "split": split, "images": len(rows), "data_dir": str(data_dir),
              "checkpoint": captioner.meta.get("path"), "decoding": asdict(options),
              "decode_seconds": round(decode_seconds, 2), "device": str(captioner.device),
              "precision": captioner.precision, **extra}
    if boxed:  # synthetic scenes: how much of each shape word's attention falls inside its object's box
        report["grounding"] = mean_grounding([r for r, _ in boxed], [rec for _, rec in boxed], meta["image_root"])
    write_json_atomic(out / f"{stem}.scores.json", report)
    return report


def _annotations(captioner: Captioner, data_dir: Path, images: list[dict], split: str, limit: int,
                 batch_size: int) -> tuple[list[int], Iterator[tuple[list[int], torch.Tensor]]]:
    """The dataset rows of `split` and their annotations (rows, (len(rows), P, D)) in batches: from the
    feature store, or for a fine-tuned encoder (finetune.py), whose features no store holds, from the images."""
    spec = captioner.encoder_spec
    if captioner.encoder_weights is None:
        store = FeatureStore.open(data_dir, encoder=spec.name, image_size=spec.image_size)
        if store.spec.weights != spec.weights:
            raise ValueError(f"{store.path}: features were made with weights {store.spec.weights}, the model with {spec.weights}")
        ok = store.ok
    else:
        ok = np.ones(len(images), dtype=bool)  # unreadable images are left out as they come
    rows = split_rows(images, split, ok)
    rows = rows[:limit] if limit else rows
    if not rows:
        raise ValueError(f"{data_dir}: no images with features in split {split!r}")
    chunks = [rows[start : start + batch_size] for start in range(0, len(rows), batch_size)]
    if captioner.encoder_weights is None:
        return rows, ((chunk, store.get(np.array(chunk))) for chunk in chunks)
    from .finetune import encoded_batches

    return rows, encoded_batches(captioner.encoder, data_dir, chunks)
