import json
import subprocess
import sys
from pathlib import Path

import pytest

from imcap.text import END, PAD, SPECIAL_TOKENS, START, UNK, Tokenizer, Vocabulary, get_tokenizer

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------- tokenizers

@pytest.mark.parametrize("text, tokens", [
    ("A dog.", ["a", "dog"]),
    ("The dog's toy is red.", ["the", "dog", "'s", "toy", "is", "red"]),
    ("Two men don't run, 3 dogs do!", ["two", "men", "do", "n't", "run", "3", "dogs", "do"]),
    ("A man in a T-shirt , with 2.5 kg of \u201capples\u201d .", ["a", "man", "in", "a", "t-shirt", "with", "2.5", "kg", "of", "apples"]),
    ("  The   DOG\tjumps\n", ["the", "dog", "jumps"]),
    ("...", []),
    ("", []),
])
def test_en_tokenize(text, tokens):
    assert get_tokenizer("en").tokenize(text) == tokens


def test_en_round_trip():
    tok = get_tokenizer("en")
    tokens = tok.tokenize("A child in a pink dress is climbing up a set of stairs in an entry way .")
    assert tok.detokenize(tokens) == "a child in a pink dress is climbing up a set of stairs in an entry way"
    assert tok.tokenize(tok.detokenize(tokens)) == tokens


def test_zh_tokenize_drops_punctuation():
    tok = get_tokenizer("zh")
    tokens = tok.tokenize("一个男人在骑自行车。")
    assert tokens == ["一个", "男人", "在", "骑", "自行车"]
    assert tok.detokenize(tokens) == "一个男人在骑自行车"
    tokens = tok.tokenize("两个人，在 街道上！“走路”（快速）、《书》：好？")
    assert "".join(tokens) == "两个人在街道上走路快速书好"
    assert all(t.strip() and t not in "，！“”（）、《》：？" for t in tokens)


def test_space_tokenize_vietnamese():
    tok = get_tokenizer("vi")
    assert tok.language == "space"
    tokens = tok.tokenize("Một người đàn ông đang đi xe đạp .")
    assert tokens == ["một", "người", "đàn", "ông", "đang", "đi", "xe", "đạp"]
    assert tok.detokenize(tokens) == "một người đàn ông đang đi xe đạp"
    assert tok.tokenize("chơi, ô và vợt\t . ") == ["chơi", "ô", "và", "vợt"]


def test_space_tokenize_normalizes_unicode():
    decomposed = "ngu\u031bo\u031b\u0300i"  # "người" written with combining marks (NFD)
    assert get_tokenizer("space").tokenize(decomposed) == ["người"]


def test_unknown_language_is_a_clear_error():
    with pytest.raises(ValueError, match="klingon.*en, zh, space"):
        get_tokenizer("klingon")
    assert isinstance(get_tokenizer("en"), Tokenizer)


def test_jieba_is_lazy_and_silent():
    code = ("import sys, imcap.text as t; assert 'jieba' not in sys.modules; "
            "print(t.get_tokenizer('zh').tokenize('一个男人在骑自行车。'))")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "自行车" in run.stdout
    assert run.stderr == ""


# ------------------------------------------------------------------------------------------- vocabulary

CORPUS = [["a", "dog", "runs"], ["a", "cat", "runs"], ["a", "dog", "sits"], ["the", "dog"]]


def test_vocabulary_build_order_and_min_count():
    vocab = Vocabulary.build(CORPUS, min_count=2)
    # counts: a 3, dog 3, runs 2; by count desc then token
    assert vocab.tokens == [*SPECIAL_TOKENS, "a", "dog", "runs"]
    assert (PAD, START, END, UNK) == (0, 1, 2, 3)
    assert [vocab.id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert len(vocab) == 7
    assert len(Vocabulary.build(CORPUS, min_count=1)) == 4 + 6
    assert Vocabulary.build(reversed(CORPUS), min_count=1) == Vocabulary.build(CORPUS, min_count=1)


def test_vocabulary_encode_decode():
    vocab = Vocabulary.build(CORPUS, min_count=2)
    ids = vocab.encode(["a", "dog", "flies"])
    assert ids == [4, 5, UNK]
    assert vocab.id("flies") == UNK and vocab.token(5) == "dog"
    assert vocab.decode([START, 4, 5, 6, END, 4, PAD]) == ["a", "dog", "runs"]
    assert vocab.decode([PAD, 4, UNK]) == ["a", "<unk>"]
    with pytest.raises(IndexError):
        vocab.token(99)


def test_vocabulary_decode_accepts_tensors():
    torch = pytest.importorskip("torch")
    vocab = Vocabulary.build(CORPUS, min_count=2)
    assert vocab.decode(torch.tensor([START, 4, 6, END, 5])) == ["a", "runs"]


def test_vocabulary_save_load_round_trip(tmp_path):
    vocab = Vocabulary.build(CORPUS + [["xe", "đạp", "xe"]], min_count=2, language="vi")
    path = tmp_path / "vocab.json"
    vocab.save(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data == {"tokens": vocab.tokens, "min_count": 2, "language": "space"}
    assert data["tokens"][:4] == ["<pad>", "<start>", "<end>", "<unk>"]
    loaded = Vocabulary.load(path)
    assert loaded == vocab and loaded.id("xe") == vocab.id("xe")
    assert Vocabulary.from_dict(vocab.to_dict()) == vocab
    assert [p.name for p in tmp_path.iterdir()] == ["vocab.json"]  # no temporary file left


def test_vocabulary_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="must start with"):
        Vocabulary(["a", "b"])
    with pytest.raises(ValueError, match="min_count"):
        Vocabulary.build(CORPUS, min_count=0)
    bad = tmp_path / "vocab.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="vocab.json: not a vocabulary file"):
        Vocabulary.load(bad)
    with pytest.raises(FileNotFoundError):
        Vocabulary.load(tmp_path / "missing.json")
