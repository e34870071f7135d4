"""Caption metrics against hand-checked values, with and without java."""

import json
import math
import os
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from imcap import metrics
from imcap.metrics import java_available, score_captions, validation_scores, write_coco_results

NO_METEOR = ("BLEU", "ROUGE_L", "CIDEr")

# A small corpus of distinct scenes: CIDEr's idf needs several images to weigh n-grams.
CORPUS = {
    "1": ["a man rides a brown horse on the beach", "a person riding a horse along the sand"],
    "2": ["two dogs play with a red ball in the park", "a pair of dogs chase a ball on the grass"],
    "3": ["a plate of pasta with tomato sauce", "spaghetti with red sauce on a white plate"],
    "4": ["a child flies a kite under a blue sky", "a young girl holding a kite string outdoors"],
}
MATCHED = {k: refs[0] for k, refs in CORPUS.items()}
SHIFTED = {k: CORPUS[str(int(k) % 4 + 1)][0] for k in CORPUS}  # each image gets the next image's caption


# METEOR's java loads its paraphrase tables for ~10 s: the suite's one METEOR run starts in the background
# as soon as this module starts and the other tests run meanwhile. Its call scores METEOR alone, so it never
# redirects stdout (a global) while other tests capture it. Tests that hide java come after test_meteor.
METEOR_REFS = {"a": ["A man rides a brown horse on the beach."], "b": ["Two dogs play with a red ball."]}
METEOR_HYPS = {"a": "A man rides a horse on the beach.", "b": "two dogs are playing with a ball"}


@pytest.fixture(scope="module", autouse=True)
def meteor_future(request):
    wanted = any(item.name == "test_meteor_with_java" for item in request.session.items)
    if not (wanted and java_available()):
        yield None
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        yield pool.submit(score_captions, METEOR_REFS, METEOR_HYPS, metrics=("METEOR",))


def _java_children() -> list[int]:
    """Ids of java processes whose parent is this process (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        comm, rest = text[text.index("(") + 1 : text.rindex(")")], text[text.rindex(")") + 2 :].split()
        if comm == "java" and int(rest[1]) == os.getpid():
            found.append(int(stat.parent.name))
    return found


# ---------------------------------------------------------------------------------- pure Python


def test_identical_caption_scores_one():
    caption = "a man rides a brown horse on the beach"
    s = score_captions({"x": [caption, "something else entirely"]}, {"x": caption}, tokenize=False, metrics=NO_METEOR)
    assert list(s) == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE_L", "CIDEr"]
    assert s["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert s["ROUGE_L"] == pytest.approx(1.0, abs=1e-12)


def test_bleu_by_hand():
    refs = {
        "1": ["the cat sat", "a cat is on the mat"],  # hyp length 4: closest reference length 3
        "2": ["a dog runs fast", "the big dog runs"],  # hyp length 2: closest reference length 4
    }
    hyps = {"1": "the the the cat", "2": "a dog"}
    # unigrams: "the" x3 clipped to 1, "cat" 1 -> 2/4; "a", "dog" -> 2/2.        total 4/6
    # bigrams: "the the" x2 -> 0, "the cat" -> 1 of 3; "a dog" -> 1 of 1.        total 2/4
    # corpus lengths: hypotheses 6, references 3 + 4 = 7 -> brevity penalty exp(1 - 7/6)
    bp = math.exp(1 - 7 / 6)
    s = score_captions(refs, hyps, tokenize=False, metrics=("BLEU",))
    assert set(s) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"}
    assert s["BLEU-1"] == pytest.approx(bp * 4 / 6, abs=1e-6)
    assert s["BLEU-2"] == pytest.approx(bp * math.sqrt(4 / 6 * 2 / 4), abs=1e-6)


def test_cider_rewards_matching_captions_and_zero_without_shared_ngrams():
    matched = score_captions(CORPUS, MATCHED, tokenize=False, metrics=("CIDEr",))["CIDEr"]
    shifted = score_captions(CORPUS, SHIFTED, tokenize=False, metrics=("CIDEr",))["CIDEr"]
    unrelated = {k: "zebra xylophone quantum" for k in CORPUS}
    assert matched > shifted >= 0.0
    assert matched > 1.0  # pycocoevalcap's CIDEr is scaled by 10
    assert score_captions(CORPUS, unrelated, tokenize=False, metrics=("CIDEr",)) == {"CIDEr": 0.0}


def test_cider_of_a_single_image_is_zero():
    # pycocoevalcap quirk: idf = log(#images) - log(df) is 0 for every n-gram of a one-image corpus.
    s = score_captions({"x": ["a red car"]}, {"x": "a red car"}, tokenize=False, metrics=("CIDEr",))
    assert s == {"CIDEr": 0.0}


def test_pretokenized_input_keeps_case_and_collapses_whitespace():
    refs = {"x": ["a  dog runs  on grass"]}
    s = score_captions(refs, {"x": " a dog runs on grass "}, tokenize=False, metrics=NO_METEOR)
    assert s["BLEU-4"] == pytest.approx(1.0, abs=1e-6) and s["ROUGE_L"] == pytest.approx(1.0)
    s = score_captions({"x": ["a dog runs on grass"]}, {"x": "A dog runs on grass"}, tokenize=False, metrics=("BLEU",))
    assert s["BLEU-1"] == pytest.approx(4 / 5, abs=1e-6)


def test_chinese_tokens():
    caption = "一个 男人 在 海滩 上 骑马"
    s = score_captions({"x": [caption]}, {"x": caption}, tokenize=False, metrics=NO_METEOR)
    assert s["BLEU-4"] == pytest.approx(1.0, abs=1e-6)


def test_validation_scores_match_score_captions():
    refs_tokens = {k: [r.split() for r in refs] for k, refs in CORPUS.items()}
    hyps_tokens = {k: h.split() for k, h in SHIFTED.items()} | {"1": CORPUS["1"][0].split()}
    v = validation_scores(refs_tokens, hyps_tokens)
    hyps = {k: " ".join(t) for k, t in hyps_tokens.items()}
    s = score_captions(CORPUS, hyps, tokenize=False, metrics=("BLEU", "CIDEr"))
    assert v == pytest.approx(s, abs=1e-12)
    assert set(v) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr"}


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="no references.*'missing'"):
        score_captions({"a": ["a dog"]}, {"a": "a dog", "missing": "a cat"}, tokenize=False)
    with pytest.raises(ValueError, match="empty"):
        score_captions({"a": []}, {"a": "a dog"}, tokenize=False)
    with pytest.raises(ValueError, match="unknown metric"):
        score_captions({"a": ["a dog"]}, {"a": "a dog"}, metrics=("SPICE",))
    with pytest.raises(ValueError, match="no hypotheses"):
        score_captions({"a": ["a dog"]}, {}, tokenize=False)
    with pytest.raises(TypeError, match="list of str"):
        score_captions({"a": "a dog"}, {"a": "a dog"}, tokenize=False)
    with pytest.raises(TypeError, match="must be a str"):
        score_captions({"a": ["a dog"]}, {"a": ["a", "dog"]}, tokenize=False)
    with pytest.raises(ValueError, match="no references"):
        validation_scores({"a": [["a", "dog"]]}, {"b": ["a", "dog"]})


def test_write_coco_results_round_trip(tmp_path):
    hyps = {"391895": "a man rides a bike", "522418": "一个 男人 在 骑车"}
    ids = {"391895": 391895, "522418": 522418}
    out = write_coco_results(tmp_path / "sub" / "results.json", hyps, image_ids=ids)
    assert json.loads(out.read_text(encoding="utf-8")) == [
        {"image_id": 391895, "caption": "a man rides a bike"},
        {"image_id": 522418, "caption": "一个 男人 在 骑车"},
    ]
    write_coco_results(out, {"img_a.jpg": "a cat"})  # overwrite; keys used as ids
    assert json.loads(out.read_text(encoding="utf-8")) == [{"image_id": "img_a.jpg", "caption": "a cat"}]
    assert sorted(p.name for p in out.parent.iterdir()) == ["results.json"]  # no temp file left
    with pytest.raises(ValueError, match="no image id"):
        write_coco_results(out, hyps, image_ids={"391895": 1})


def test_simple_tokenizer_handles_case_and_punctuation():
    assert metrics._simple_tokenize("A dog.") == "a dog"
    tok = metrics._simple_tokenize
    assert tok("It's a man's (big) hat -- isn't it?") == "it 's a man 's -lrb- big -rrb- hat is n't it"
    assert tok("A 3.5 inch drop in the U.S.A.\r\nat 10:30") == "a 3.5 inch drop in the u.s.a. at 10:30"


# ------------------------------------------------------------------------------------ with java

needs_java = pytest.mark.skipif(not java_available(), reason="java not on PATH or does not start: PTB/METEOR untested")

TRICKY = [
    "A dog.",
    "Two dogs, one brown and one white, play in the snow!",
    "It's a man's (big) hat -- isn't it?",
    "“Smart” quotes’ and a dog’s bone…",
    "A 3.5 inch, 1,000 ft. drop at 10:30 a.m. in the U.S.A.",
    "line\rbreak and\u2028separator",
    "",
    "   ...",
]


@needs_java
def test_ptb_tokenizer_matches_fallback_and_keeps_lines_aligned():
    ptb = metrics._ptb_tokenize(TRICKY, metrics._java())
    assert ptb[0] == "a dog" and ptb[5] == "line break and separator" and ptb[6:] == ["", ""]
    assert ptb == [metrics._simple_tokenize(s) for s in TRICKY]


@needs_java
def test_tokenize_ignores_case_and_punctuation_and_stdout_stays_clean(capfd):
    refs = {"x": ["a dog runs on the grass"], "y": ["A cat, sleeping on a sofa."]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # java is here: no fallback warning
        hyps = {"x": "A dog runs on the grass.", "y": "a cat sleeping on a sofa"}
        raw = score_captions(refs, hyps, metrics=NO_METEOR)
    assert raw["BLEU-4"] == pytest.approx(1.0, abs=1e-6) and raw["ROUGE_L"] == pytest.approx(1.0)
    assert capfd.readouterr().out == ""


@needs_java
def test_meteor_with_java(meteor_future):
    s = meteor_future.result(timeout=180)
    assert list(s) == ["METEOR"]
    assert 0.0 < s["METEOR"] <= 1.0
    assert _java_children() == []  # METEOR's java was closed


# ------------------------------------------------------------------------- java hidden (run last)


def _check_without_java(recwarn_list):
    messages = [str(w.message) for w in recwarn_list]
    assert any("METEOR is None" in m for m in messages), messages
    assert any("pure-Python" in m for m in messages), messages
    assert all("\n" not in m for m in messages)


def test_without_java_meteor_is_none_and_tokenization_falls_back(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    assert not java_available()
    with pytest.warns(RuntimeWarning) as record:
        s = score_captions({"x": ["a dog runs on the grass"]}, {"x": "A dog runs on the grass."})
    _check_without_java(record.list)
    assert list(s) == list(metrics.SCORE_KEYS)
    assert s["METEOR"] is None
    assert s["BLEU-4"] == pytest.approx(1.0, abs=1e-6) and s["ROUGE_L"] == pytest.approx(1.0)


def test_java_that_fails_to_start_counts_as_missing(monkeypatch, tmp_path):
    fake = tmp_path / "java"
    fake.write_text("#!/bin/sh\necho 'Error: could not create the Java Virtual Machine' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert not java_available()
    with pytest.warns(RuntimeWarning) as record:
        s = score_captions(CORPUS, MATCHED)
    _check_without_java(record.list)
    assert s["METEOR"] is None and s["CIDEr"] > 1.0


@needs_java
def test_meteor_that_does_not_answer_is_killed_not_waited_for(monkeypatch):
    monkeypatch.setattr(metrics, "_timeout", lambda n: 0.5)  # METEOR's tables take far longer to load
    with pytest.warns(RuntimeWarning, match="METEOR failed.*Timeout"):
        s = score_captions({"x": ["a dog"]}, {"x": "a dog"}, tokenize=False, metrics=("METEOR",))
    assert s == {"METEOR": None}
    assert _java_children() == []
