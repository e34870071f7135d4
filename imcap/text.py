"""Tokenizers (en / zh words / zh characters / space-separated) and the Vocabulary that maps tokens to ids.

Languages:
    en       lower-cased words and numbers; punctuation dropped; clitics split off PTB-style
             ("dog's" -> "dog" "'s", "don't" -> "do" "n't"); hyphenated words kept ("t-shirt").
    zh       jieba word segmentation in its default mode (accurate mode with the HMM for unknown words:
             `jieba.lcut(text, cut_all=False, HMM=True)`), lower-cased after segmenting; whitespace and
             punctuation (ASCII and full-width) dropped; whitespace inside a sentence ("站 在") is removed before
             segmenting (kept only between two Latin letters or digits).
    zh-char  characters: each CJK character (and kana, hangul) is a token; a run of other letters and digits
             ("T" in "T恤", "3", "ok") is one token, lower-cased; whitespace and punctuation dropped. Full-width
             letters and digits are folded to ASCII (NFKC) first.
    space    lower-cased, punctuation removed, split on whitespace: Vietnamese and other languages
             written with spaces between words or syllables. "vi" is an alias.
"""

from __future__ import annotations

import json
import logging
import os
import re
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

from .fileio import write_json_atomic

# Special tokens and their ids; they always come first in a vocabulary.
PAD, START, END, UNK = 0, 1, 2, 3
SPECIAL_TOKENS = ("<pad>", "<start>", "<end>", "<unk>")

# The tokenizer languages: name -> what its tokens are (one line, for --help); the CLI's choices come from here.
LANGUAGE_TOKENS = {"en": "English words", "zh": "jieba words", "space": "words split at spaces, as in Vietnamese (vi)",
                   "zh-char": "characters"}
LANGUAGES = tuple(LANGUAGE_TOKENS)
ALIASES = {"vi": "space"}  # other names offered to users
_ALIASES = {**ALIASES, "english": "en", "chinese": "zh", "zh_char": "zh-char"}  # also accepted
_UNSPACED = frozenset({"zh", "zh-char"})  # written without spaces between words: detokenized by joining with ""

_EN_CLITIC = re.compile(r"(?<=[^\W_])(n't|'s|'re|'ll|'m|'ve|'d)\b")
_EN_TOKEN = re.compile(r"n't|'(?:s|re|ll|m|ve|d)\b|\d+(?:[.,]\d+)+|[^\W_]+(?:['-][^\W_]+)*")
# zh-char: one CJK / kana / hangul character, or a run of the other letters and digits
_WIDE = "\u2e80-\u9fff\ua960-\ua97f\uac00-\ud7ff\uf900-\ufaff\U00020000-\U0003ffff"
_ZH_CHAR_TOKEN = re.compile(rf"[^\W_{_WIDE}]+|[^\W_]")


_SPACE_RUN = re.compile(r"\s+")
_LATIN = re.compile(rf"[^\W_{_WIDE}]")


def join_cjk_spaces(text: str) -> str:
    """`text` without whitespace inside except a single space between two Latin letters or digits ("OK 3"):
    Chinese is written without spaces, so a stray space or line break ("站 在", "左手\\n拿着") is noise that
    would otherwise change how jieba segments the sentence."""
    def keep(m: re.Match) -> str:
        before, after = m.string[m.start() - 1 : m.start()], m.string[m.end() : m.end() + 1]
        return " " if _LATIN.fullmatch(before or "。") and _LATIN.fullmatch(after or "。") else ""

    return _SPACE_RUN.sub(keep, text.strip())


def _is_punct_or_space(token: str) -> bool:
    """True when every character is whitespace, punctuation (P*) or a symbol (S*)."""
    return all(ch.isspace() or unicodedata.category(ch)[0] in "PS" for ch in token)


def _strip_punct(text: str) -> str:
    """Replace punctuation and symbol characters by spaces."""
    return "".join(" " if unicodedata.category(ch)[0] in "PS" else ch for ch in text)


class Tokenizer:
    """Splits a caption into tokens for one language ("en", "zh", "zh-char", "space"; "vi" means "space")."""

    def __init__(self, language: str) -> None:
        self.language = normalize_language(language)
        self._jieba = None  # imported on first zh use: it is slow to load

    def __repr__(self) -> str:
        return f"Tokenizer({self.language!r})"

    def tokenize(self, text: str) -> list[str]:
        """Tokens of `text`, lower-cased, without punctuation."""
        text = unicodedata.normalize("NFC", text).replace("\u2019", "'")
        if self.language == "zh":  # segment before lower-casing: jieba knows "T恤", not "t恤"
            return [t.lower() for t in self._segmenter().lcut(join_cjk_spaces(text), cut_all=False, HMM=True)
                    if not _is_punct_or_space(t)]
        if self.language == "zh-char":
            return _ZH_CHAR_TOKEN.findall(unicodedata.normalize("NFKC", text).lower())
        text = text.lower()
        if self.language == "en":
            return _EN_TOKEN.findall(_EN_CLITIC.sub(r" \1", text))
        return _strip_punct(text).split()

    def detokenize(self, tokens: Sequence[str]) -> str:
        """Tokens back to a caption string: joined by spaces ("" for zh and zh-char)."""
        return ("" if self.language in _UNSPACED else " ").join(tokens)

    def _segmenter(self):
        if self._jieba is None:
            import jieba

            jieba.setLogLevel(logging.WARNING)  # silence "Building prefix dict ..." on stderr
            self._jieba = jieba
        return self._jieba


def normalize_language(language: str) -> str:
    """The canonical language name ("en", "zh", "zh-char", "space"); ValueError for an unknown one."""
    name = _ALIASES.get(str(language).lower(), str(language).lower())
    if name not in LANGUAGES:
        expected = f"{', '.join(LANGUAGES)} (or {', '.join(ALIASES)})"
        raise ValueError(f"unknown language {language!r}: expected one of {expected}")
    return name


def get_tokenizer(language: str) -> Tokenizer:
    """The tokenizer for `language` ("en", "zh", "zh-char", "space" or "vi"); ValueError for unknown languages."""
    return Tokenizer(language)


class Vocabulary:
    """Token <-> id mapping; ids 0-3 are <pad> <start> <end> <unk>, the rest by count (desc) then token."""

    def __init__(self, tokens: Sequence[str], min_count: int = 1, language: str = "en") -> None:
        tokens = list(tokens)
        if tuple(tokens[:4]) != SPECIAL_TOKENS:
            raise ValueError(f"vocabulary must start with {' '.join(SPECIAL_TOKENS)}, got {tokens[:4]}")
        if len(set(tokens)) != len(tokens):
            dup = next(t for t, n in Counter(tokens).items() if n > 1)
            raise ValueError(f"vocabulary lists token {dup!r} more than once")
        self._tokens = tokens
        self._ids = {t: i for i, t in enumerate(tokens)}
        self.min_count = int(min_count)
        self.language = normalize_language(language)

    @classmethod
    def build(cls, token_lists: Iterable[Sequence[str]], min_count: int = 5, language: str = "en") -> Vocabulary:
        """Vocabulary of the tokens seen at least `min_count` times, by count (desc) then token."""
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        counts = Counter(t for tokens in token_lists for t in tokens)
        words = sorted((t for t, n in counts.items() if n >= min_count and t not in SPECIAL_TOKENS),
                       key=lambda t: (-counts[t], t))
        return cls([*SPECIAL_TOKENS, *words], min_count=min_count, language=language)

    def __len__(self) -> int:
        return len(self._tokens)

    def __contains__(self, token: str) -> bool:
        return token in self._ids

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} tokens, min_count={self.min_count}, language={self.language!r})"

    @property
    def tokens(self) -> list[str]:
        """All tokens in id order (a copy)."""
        return list(self._tokens)

    def id(self, token: str) -> int:
        """Id of `token`; UNK when it is not in the vocabulary."""
        return self._ids.get(token, UNK)

    def token(self, id: int) -> str:
        """Token with id `id`; IndexError when out of range."""
        i = int(id)
        if not 0 <= i < len(self._tokens):
            raise IndexError(f"token id {i} out of range for a vocabulary of {len(self._tokens)}")
        return self._tokens[i]

    def encode(self, tokens: Iterable[str]) -> list[int]:
        """Ids of `tokens` (unknown -> UNK); no <start>/<end> added."""
        return [self._ids.get(t, UNK) for t in tokens]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Tokens of `ids` up to the first END, skipping PAD and START. Accepts ints, numpy or torch values."""
        out = []
        for i in ids:
            i = int(i)
            if i == END:
                break
            if i not in (PAD, START):
                out.append(self.token(i))
        return out

    def to_dict(self) -> dict:
        """The vocab.json object: {"tokens": [...], "min_count": n, "language": ...}."""
        return {"tokens": list(self._tokens), "min_count": self.min_count, "language": self.language}

    @classmethod
    def from_dict(cls, data: dict) -> Vocabulary:
        """Inverse of to_dict; ValueError when `data` is not a vocabulary object."""
        if not isinstance(data, dict) or not isinstance(data.get("tokens"), list):
            raise ValueError("not a vocabulary: expected an object with a 'tokens' list")
        return cls(data["tokens"], min_count=data.get("min_count", 1), language=data.get("language", "en"))

    def save(self, path: str | os.PathLike) -> None:
        """Write vocab.json atomically (temporary file + os.replace)."""
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Vocabulary:
        """Read a vocab.json; ValueError with a one-line message naming the file when it is not one."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls.from_dict(data)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such vocabulary file") from None
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
            raise ValueError(f"{path}: not a vocabulary file ({e})") from None
