"""Caption metrics: BLEU-1..4, METEOR, ROUGE-L and CIDEr exactly as the COCO caption evaluation computes them.

The numbers come from pycocoevalcap's scorers, so they are comparable with published results. SPICE is left
out (it downloads Stanford CoreNLP), which is why `COCOEvalCap.evaluate()` is not used: the scorers are
called one by one. The PTB tokenizer and METEOR need java; without it METEOR is None and tokenization falls
back to a pure-Python approximation, each with a warning.

pycocoevalcap quirks handled here:
- PTBTokenizer writes its temp file into its own package folder and aligns output lines with captions by
  position; a caption holding "\\r" or U+2028 splits into two lines and shifts every later caption. We run
  the same jar with the same flags and punctuation filter on a temp file in the system temp folder, after
  turning every line break inside a caption into a space, and check the line count.
- "-lowerCase" lower-cases "-LRB-" before the punctuation filter (which lists "-LRB-"), so COCO keeps
  brackets as "-lrb-" tokens; the fallback does the same.
- Meteor's `__del__` takes a lock that `compute_score` never releases when it fails, and it reads stdout
  with no timeout: we score in a worker thread with a timeout and close the process without the lock.
- CIDEr's idf comes from the references of the scored corpus: a corpus of one image always scores 0.
"""

from __future__ import annotations

import contextlib
import functools
import json
import numbers
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor import meteor as _meteor_module
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer import ptbtokenizer as _ptb_module

from .fileio import write_json_atomic

__all__ = ["score_captions", "validation_scores", "write_coco_results", "java_available", "METRICS", "SCORE_KEYS"]

# Metric names accepted by score_captions(metrics=...), and the keys each one adds to the result.
METRICS = {
    "BLEU": ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"),
    "METEOR": ("METEOR",),
    "ROUGE_L": ("ROUGE_L",),
    "CIDEr": ("CIDEr",),
}
# Every key score_captions can return, in the order it returns them.
SCORE_KEYS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE_L", "CIDEr")

_PTB_JAR = Path(_ptb_module.__file__).resolve().parent / _ptb_module.STANFORD_CORENLP_3_4_1_JAR
_PTB_ARGS = ["edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase"]  # as pycocoevalcap
_PUNCTUATIONS = frozenset(_ptb_module.PUNCTUATIONS)
_METEOR_DIR = Path(_meteor_module.__file__).resolve().parent


def _timeout(n_items: int) -> float:
    """Seconds to wait for a java tool on n_items lines: start-up (METEOR loads ~10 s of tables) plus work."""
    return 300.0 + n_items / 20.0


# ----------------------------------------------------------------------------------------------- java


@functools.lru_cache(maxsize=None)
def _java_starts(path: str) -> bool:
    try:
        proc = subprocess.run([path, "-version"], capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return proc.returncode == 0


def _java() -> str | None:
    """Absolute path of a java that starts, or None."""
    path = shutil.which("java")
    return path if path is not None and _java_starts(path) else None


def java_available() -> bool:
    """True when `java` is on PATH and starts (the check is cached per java binary)."""
    return _java() is not None


def _warn(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


# ------------------------------------------------------------------------------------------ inputs


def _wanted(metrics: Iterable[str]) -> list[str]:
    """Canonical metric names, case-insensitive; ValueError for unknown ones."""
    if isinstance(metrics, str):
        metrics = [metrics]
    by_lower = {name.lower(): name for name in METRICS}
    unknown = [m for m in metrics if m.lower() not in by_lower]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {list(METRICS)}")
    return [by_lower[m.lower()] for m in metrics]


def _gather(references: Mapping, hypotheses: Mapping) -> tuple[dict, dict]:
    """Check inputs; return pycocoevalcap's gts {key: [refs]} and res {key: [hyp]} over the hypothesis keys."""
    if not hypotheses:
        raise ValueError("no hypotheses to score")
    missing = [k for k in hypotheses if k not in references]
    if missing:
        raise ValueError(
            f"{len(missing)} of {len(hypotheses)} hypotheses have no references, e.g. keys {missing[:3]!r}"
        )
    gts, res = {}, {}
    for key, hyp in hypotheses.items():
        refs = references[key]
        if not isinstance(hyp, str):
            raise TypeError(f"hypothesis {key!r} must be a str, got {type(hyp).__name__}")
        if isinstance(refs, str) or not all(isinstance(r, str) for r in refs):
            raise TypeError(f"references[{key!r}] must be a list of str, got {refs!r:.80}")
        if len(refs) == 0:
            raise ValueError(f"references[{key!r}] is empty: every hypothesis needs at least one reference")
        gts[key], res[key] = list(refs), [hyp]
    return gts, res


def _normalized(captions: dict) -> dict:
    """Pre-tokenized captions with runs of whitespace made single spaces (ROUGE splits on ' ')."""
    return {k: [" ".join(c.split()) for c in caps] for k, caps in captions.items()}


# ------------------------------------------------------------------------------------ tokenization


def _one_line(text: str) -> str:
    """Any line break inside a caption (\\r, \\v, \\f, U+0085, U+2028, ...) becomes a space."""
    return " ".join(text.splitlines())


def _ptb_tokenize(sentences: list[str], java: str) -> list[str]:
    """pycocoevalcap's PTBTokenizer (same jar, flags and punctuation filter); one output per sentence."""
    with tempfile.TemporaryDirectory(prefix="imcap-ptb-") as tmp:
        source = Path(tmp) / "captions.txt"
        source.write_text("\n".join(_one_line(s) for s in sentences), encoding="utf-8")
        proc = subprocess.run(
            [java, "-cp", str(_PTB_JAR), *_PTB_ARGS, str(source)],
            capture_output=True,
            timeout=_timeout(len(sentences)),
        )
    if proc.returncode != 0:
        last = (proc.stderr.decode(errors="replace").strip().splitlines() or ["no message"])[-1]
        raise RuntimeError(f"PTBTokenizer exited with status {proc.returncode}: {last}")
    lines = proc.stdout.decode("utf-8").split("\n")
    if len(lines) < len(sentences) or any(line.strip() for line in lines[len(sentences) :]):
        raise RuntimeError(f"PTBTokenizer returned {len(lines)} lines for {len(sentences)} captions")
    return [
        " ".join(w for w in line.rstrip().split(" ") if w not in _PUNCTUATIONS) for line in lines[: len(sentences)]
    ]


_BRACKETS = {"(": " -lrb- ", ")": " -rrb- ", "[": " -lsb- ", "]": " -rsb- ", "{": " -lcb- ", "}": " -rcb- "}
_QUOTES = {"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2026": "..."}
_CONTRACTION = re.compile(r"(?<=\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
_TOKEN = re.compile(
    r"""
      -[lr][rsc]b-                  # brackets, as PTB writes them after lower-casing
    | n't | '(?:s|re|ve|ll|d|m)\b   # contractions, split off by _CONTRACTION
    | \d+(?:[.,:/]\d+)*(?!\w)       # numbers: 3.5  1,000  10:30
    | (?:[^\W\d_]\.){2,}            # abbreviations: u.s.a.
    | (?:mrs?|ms|dr|st|ft|jr|sr|vs|etc|mt|inc|ltd|co)\.(?!\w)   # common abbreviations PTB keeps
    | @?\w+(?:[-'&./]\w+)*          # words: e-mail  o'neil  a/b  @name
    | \S                            # any other symbol on its own
    """,
    re.VERBOSE,
)


def _simple_tokenize(text: str) -> str:
    """Pure-Python stand-in for the PTB tokenizer: lower-case, split like PTB, drop the punctuation COCO drops."""
    text = _one_line(text).lower().translate(str.maketrans({**_BRACKETS, **_QUOTES}))
    text = _CONTRACTION.sub(r" \1", text)
    return " ".join(t for t in _TOKEN.findall(text) if t not in _PUNCTUATIONS and t != '"')


def _tokenize_all(sentences: list[str], java: str | None) -> list[str]:
    """PTB-tokenize with java; without it (or if it fails) use _simple_tokenize, with a warning."""
    if java is None:
        reason = "java was not found or does not start"
    else:
        try:
            return _ptb_tokenize(sentences, java)
        except (OSError, RuntimeError, UnicodeDecodeError, subprocess.SubprocessError) as e:
            reason = f"the PTB tokenizer failed ({e})"
    _warn(f"{reason}: tokenizing with a pure-Python approximation; scores may differ slightly from COCO's")
    return [_simple_tokenize(s) for s in sentences]


def _tokenized(gts: dict, res: dict, java: str | None) -> tuple[dict, dict]:
    """Tokenize references and hypotheses in one java call; same dict shapes back."""
    flat = [c for caps in gts.values() for c in caps] + [caps[0] for caps in res.values()]
    tokens = iter(_tokenize_all(flat, java))
    gts = {k: [next(tokens) for _ in caps] for k, caps in gts.items()}
    res = {k: [next(tokens)] for k in res}
    return gts, res


# ---------------------------------------------------------------------------------------- scorers


class _Meteor(_meteor_module.Meteor):
    """pycocoevalcap's METEOR (same jar and flags) with an explicit java, a timeout and a lock-free close."""

    def __init__(self, java: str):  # no super().__init__(): it starts "java" from PATH with stderr unread
        self.meteor_cmd = [java, "-jar", "-Xmx2G", _meteor_module.METEOR_JAR, "-", "-", "-stdio", "-l", "en", "-norm"]
        self.lock = threading.Lock()
        self.meteor_p = subprocess.Popen(
            self.meteor_cmd, cwd=_METEOR_DIR, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )

    def score(self, gts: dict, res: dict) -> float:
        """Corpus METEOR; TimeoutError (and the process killed) when java does not answer in time."""
        out: dict = {}

        def run() -> None:
            try:
                out["score"] = self.compute_score(gts, res)[0]
            except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
                out["error"] = e

        worker = threading.Thread(target=run, name="imcap-meteor", daemon=True)
        worker.start()
        worker.join(_timeout(len(res)))
        if worker.is_alive():
            self.close()  # unblocks the worker's read
            raise TimeoutError(f"METEOR gave no answer within {_timeout(len(res)):.0f} s")
        if "error" in out:
            raise out["error"]
        return float(out["score"])

    def close(self) -> None:
        """Stop the java process (idempotent, never blocks on the scorer's lock)."""
        proc = getattr(self, "meteor_p", None)
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            with contextlib.suppress(OSError):
                pipe.close()

    __del__ = close


def _start_meteor(java: str | None) -> _Meteor | None:
    """Start METEOR's java now (its tables load while we tokenize); None with a warning if it cannot."""
    if java is None:
        _warn("METEOR needs java, which was not found or does not start: METEOR is None")
        return None
    try:
        return _Meteor(java)
    except OSError as e:
        _warn(f"METEOR could not start java ({e}): METEOR is None")
        return None


def _meteor_score(meteor: _Meteor | None, gts: dict, res: dict) -> float | None:
    if meteor is None:
        return None
    try:
        return meteor.score(gts, res)
    except (OSError, ValueError, TimeoutError) as e:  # ValueError: java died and answered nothing
        _warn(f"METEOR failed ({type(e).__name__}: {e}): METEOR is None")
        return None


def _python_scores(gts: dict, res: dict, wanted: Iterable[str]) -> dict[str, float]:
    """BLEU-1..4 ('closest' reference length, corpus level), ROUGE_L and CIDEr, as requested."""
    out: dict[str, float] = {}
    with contextlib.redirect_stdout(sys.stderr):  # keep stdout clean for --json output, whatever the version
        if "BLEU" in wanted:
            bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
            out.update({f"BLEU-{n}": float(b) for n, b in enumerate(bleu, start=1)})
        if "ROUGE_L" in wanted:
            out["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
        if "CIDEr" in wanted:
            out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return out


# ------------------------------------------------------------------------------------- public API


def score_captions(
    references: Mapping[str, list[str]],
    hypotheses: Mapping[str, str],
    *,
    tokenize: bool = True,
    metrics: Iterable[str] = ("BLEU", "METEOR", "ROUGE_L", "CIDEr"),
) -> dict[str, float | None]:
    """Corpus scores of `hypotheses` (one caption per key) against `references` (captions per key).

    tokenize=True: raw English through the PTB tokenizer, as the COCO caption evaluation does.
    tokenize=False: captions are already tokenized, space-joined (Chinese, Vietnamese, validation).
    Returns the keys of SCORE_KEYS for the requested metrics; METEOR is None (with a warning) without java.
    Keys of `references` without a hypothesis are ignored; a hypothesis without references is a ValueError.
    """
    wanted = _wanted(metrics)
    gts, res = _gather(references, hypotheses)
    java = _java() if tokenize or "METEOR" in wanted else None
    meteor = _start_meteor(java) if "METEOR" in wanted else None
    try:
        gts, res = _tokenized(gts, res, java) if tokenize else (_normalized(gts), _normalized(res))
        scores: dict[str, float | None] = dict(_python_scores(gts, res, wanted))
        if "METEOR" in wanted:
            scores["METEOR"] = _meteor_score(meteor, gts, res)
    finally:
        if meteor is not None:
            meteor.close()
    return {key: scores[key] for key in SCORE_KEYS if key in scores}


def score_chinese(
    references: Mapping[str, list[str]], hypotheses: Mapping[str, str], *, unit: str = "zh",
) -> dict[str, float | None]:
    """Corpus scores of Chinese captions given as text, as the AI Challenger evaluation computes them: both
    sides cut into jieba words (unit "zh", accurate mode, punctuation dropped; "zh-char": single characters),
    then BLEU-1..4, ROUGE_L and CIDEr. METEOR is None: its stems, synonyms and paraphrases are English.
    How a model cut its own captions (words or characters) does not matter: only its text is scored."""
    from .text import get_tokenizer

    cut = get_tokenizer(unit).tokenize
    refs = {k: [" ".join(cut(c)) for c in captions] for k, captions in references.items()}
    hyps = {k: " ".join(cut(c)) for k, c in hypotheses.items()}
    scores = score_captions(refs, hyps, tokenize=False, metrics=("BLEU", "ROUGE_L", "CIDEr"))
    return {key: scores.get(key) for key in SCORE_KEYS}  # the seven keys


def validation_scores(
    references_tokens: Mapping[str, list[list[str]]],
    hypotheses_tokens: Mapping[str, list[str]],
) -> dict[str, float]:
    """BLEU-1..4 and CIDEr of token lists, without java (fast enough for every epoch).

    CIDEr takes its idf from the references scored: use the whole validation set, not single images.
    """
    for key, tokens in hypotheses_tokens.items():
        if isinstance(tokens, str):
            raise TypeError(f"hypotheses_tokens[{key!r}] must be a list of tokens, got a str")
    hyps = {k: " ".join(tokens) for k, tokens in hypotheses_tokens.items()}
    refs = {k: [" ".join(r) for r in references_tokens[k]] for k in hyps if k in references_tokens}
    gts, res = _gather(refs, hyps)
    return _python_scores(_normalized(gts), _normalized(res), ("BLEU", "CIDEr"))


def write_coco_results(
    path: str | os.PathLike,
    hypotheses: Mapping[str, str],
    image_ids: Mapping[str, int | str] | None = None,
) -> Path:
    """Write `[{"image_id": ..., "caption": ...}]` atomically (temp file + os.replace) and return the path.

    image_ids maps each hypothesis key to the id the ground truth uses (COCO's are ints); without it the
    keys themselves are written.
    """
    if image_ids is not None:
        missing = [k for k in hypotheses if k not in image_ids]
        if missing:
            raise ValueError(f"{len(missing)} hypotheses have no image id, e.g. keys {missing[:3]!r}")
    records = []
    for key, caption in hypotheses.items():
        image_id = key if image_ids is None else image_ids[key]
        if isinstance(image_id, numbers.Integral) and not isinstance(image_id, bool):
            image_id = int(image_id)  # numpy ints are not JSON
        records.append({"image_id": image_id, "caption": caption})
    if len({json.dumps(r["image_id"]) for r in records}) != len(records):
        raise ValueError("two hypotheses share an image id: COCO results need one caption per image")
    path = Path(path)
    write_json_atomic(path, records, indent=None)
    return path


