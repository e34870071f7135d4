"""What a caption search is asked and what it returns, without torch: DecodingOptions, Hypothesis (one
searched caption, word ids) and Caption (an image's result, words). The torch search (decoding.py, api.py)
and the ONNX runtime (onnx_runtime.py, which must not import torch) share them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

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

    def __post_init__(self):
        for name, value, high in (("beam size", self.beam_size, MAX_BEAM_SIZE), ("max length", self.max_length, MAX_LENGTH)):
            if not is_int(value) or not 1 <= value <= high:
                raise ValueError(f"{name} must be an integer from 1 to {high}, got {str(value)[:40]}")
        if not is_int(self.n_best) or not 1 <= self.n_best <= self.beam_size:
            raise ValueError(f"n-best must be between 1 and the beam size ({self.beam_size}), got {str(self.n_best)[:40]}")
        if not isinstance(self.length_penalty, (int, float)) or not 0 <= self.length_penalty <= MAX_LENGTH_PENALTY:
            raise ValueError(f"length penalty must be from 0 to {MAX_LENGTH_PENALTY}, got {str(self.length_penalty)[:40]}")


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
