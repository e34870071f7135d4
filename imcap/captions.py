"""What a caption search is asked and what it returns, without torch: DecodingOptions, Hypothesis (one
searched caption, word ids) and Caption (an image's result, words). The torch search (decoding.py, api.py)
and the ONNX runtime (onnx_runtime.py, which must not import torch) share them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np
from PIL import Image

from .images import ImageError, load_image, to_rgb
from .limits import MAX_BEAM_SIZE, MAX_LENGTH, MAX_LENGTH_PENALTY
from .text import END


@dataclass(frozen=True)
class DecodingOptions:
    """How to search: checked once, where the options are made (the CLI, the HTTP API, the Python API)."""

    beam_size: int = 3  # 1 = greedy; at most MAX_BEAM_SIZE
    max_length: int = 30  # words per caption, <end> not counted; at most MAX_LENGTH
    length_penalty: float = 0.0  # score = log p / ((5 + L) / 6) ** length_penalty (0: plain log p)
    n_best: int = 1  # hypotheses returned per image (<= beam_size)
    allow_unk: bool = False  # False: <unk> is never chosen (captions shown to people); True: as the model ranks it
    no_repeat_ngram: int = 0  # n >= 2: no caption repeats a run of n words (0: off)

    def __post_init__(self):
        for name, value, high in (("beam size", self.beam_size, MAX_BEAM_SIZE), ("max length", self.max_length, MAX_LENGTH)):
            if not is_int(value) or not 1 <= value <= high:
                raise ValueError(f"{name} must be an integer from 1 to {high}, got {str(value)[:40]}")
        if not is_int(self.n_best) or not 1 <= self.n_best <= self.beam_size:
            raise ValueError(f"n-best must be between 1 and the beam size ({self.beam_size}), got {str(self.n_best)[:40]}")
        if not isinstance(self.length_penalty, (int, float)) or not 0 <= self.length_penalty <= MAX_LENGTH_PENALTY:
            raise ValueError(f"length penalty must be from 0 to {MAX_LENGTH_PENALTY}, got {str(self.length_penalty)[:40]}")
        if not is_int(self.no_repeat_ngram) or not (self.no_repeat_ngram == 0 or 2 <= self.no_repeat_ngram <= MAX_LENGTH):
            raise ValueError(f"no-repeat n-gram size must be 0 (off) or from 2 to {MAX_LENGTH}, got {str(self.no_repeat_ngram)[:40]}")


def is_int(value) -> bool:
    """An int (numpy's too), not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclass
class Hypothesis:
    tokens: list[int]  # word ids, without <start>; ends with <end> when the caption finished
    log_prob: float  # sum of log probabilities of the tokens
    score: float  # log_prob after the length penalty; what hypotheses are ranked by
    alphas: Any  # (len(tokens), P) attention for each emitted token: a torch.Tensor (decoding.py), np.ndarray (ONNX)

    @property
    def finished(self) -> bool:
        return bool(self.tokens) and self.tokens[-1] == END


@dataclass
class Caption:
    """One image's result. On failure only `image` and `error` are set."""

    image: str  # file name, or "<image 3>" for in-memory inputs
    caption: str = ""  # detokenized best caption
    tokens: list[str] = field(default_factory=list)  # its words, without <end>
    score: float = float("nan")  # length-penalised log probability (what beams are ranked by)
    log_prob: float = float("nan")  # sum of the words' log probabilities
    finished: bool = True  # False when the caption hit max_length without <end>
    alphas: np.ndarray | None = None  # (T, h, w) attention for each word (and <end> when finished)
    alternatives: list["Caption"] = field(default_factory=list)  # the rest of the n-best list
    error: str | None = None

    def to_dict(self, attention: bool = False) -> dict:
        if self.error is not None:
            return {"image": self.image, "error": self.error}
        d = {"image": self.image, "caption": self.caption, "score": round(self.score, 4),
             "log_prob": round(self.log_prob, 4), "tokens": self.tokens, "finished": self.finished}
        if attention and self.alphas is not None:
            d["attention"] = np.round(self.alphas, 4).tolist()
        if self.alternatives:
            d["n_best"] = [a.to_dict(attention) for a in self.alternatives]
        return d


ImageInput = Union[str, os.PathLike, Image.Image]


class ImageCaptioning:
    """caption(images) for a captioner that has encode(PIL images) -> grids and caption_features(grids, options,
    names) -> Captions (api.Captioner with torch, onnx_runtime.OnnxCaptioner without): images are read in
    batches, and one that cannot be read gets a Caption with `error` while the others are captioned."""

    def caption(self, images: ImageInput | Sequence[ImageInput], *, beam_size: int = 3, max_length: int = 30,
                length_penalty: float = 0.0, n_best: int = 1, batch_size: int = 16, allow_unk: bool = False,
                no_repeat_ngram: int = 0, options: DecodingOptions | None = None):
        """Caption one image (returns a Caption; raises ImageError if unreadable) or a list of them
        (returns a list of Captions, with `error` set for the ones that could not be read).
        allow_unk: let the search choose <unk> (for research; captions shown to people never have it).
        no_repeat_ngram: n >= 2 keeps any n words in a row from appearing twice in a caption (0: off).
        options: all the search settings as one DecodingOptions (what the CLI and the server pass); when given,
        the keyword settings are not used."""
        options = options or DecodingOptions(beam_size, max_length, length_penalty, n_best, allow_unk, no_repeat_ngram)
        if not isinstance(images, (list, tuple)):
            result = self._caption_batch([images], options, 0)[0]
            if result.error:
                raise ImageError(result.error)
            return result
        results = []
        for start in range(0, len(images), batch_size):
            results += self._caption_batch(images[start : start + batch_size], options, start)
        return results

    def _caption_batch(self, images: Sequence[ImageInput], options: DecodingOptions, offset: int) -> list[Caption]:
        names, pils, errors = [], [], {}
        for i, item in enumerate(images):
            name = str(item) if isinstance(item, (str, os.PathLike)) else f"<image {offset + i}>"
            names.append(name)
            try:
                pils.append(self._to_pil(item))
            except ImageError as e:
                errors[i] = str(e)
        good = [i for i in range(len(images)) if i not in errors]
        results: list[Caption | None] = [None] * len(images)
        if good:
            features = self.encode(pils)
            for i, r in zip(good, self.caption_features(features, options, [names[i] for i in good])):
                results[i] = r
        for i, msg in errors.items():
            results[i] = Caption(image=names[i], error=msg)
        return results

    def _to_pil(self, item) -> Image.Image:
        """An input image as an RGB PIL image; ImageError when it cannot be read."""
        return to_rgb(item) if isinstance(item, Image.Image) else load_image(item)
