from typing import NamedTuple

import pytest
import torch

from imcap import decoding
from imcap.decoding import DecodingOptions, beam_search, decode, greedy_search
from imcap.model import ModelConfig, ShowAttendTell
from imcap.text import END, START, UNK

P, D, V = 6, 10, 23


def tiny(seed=0) -> ShowAttendTell:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=V, feature_dim=D, embed_dim=8, hidden_dim=12, attention_dim=9)
    model = ShowAttendTell(cfg).eval()
    with torch.no_grad():  # make <end> plausible so captions have varied lengths
        model.out.bias[END] += 2.0
    return model


def features(n=5, seed=3):
    return torch.randn(n, P, D, generator=torch.Generator().manual_seed(seed))


def test_beam_one_equals_greedy():
    model, f = tiny(), features(8)
    greedy = greedy_search(model, f, max_length=12)
    beam = beam_search(model, f, DecodingOptions(beam_size=1, max_length=12))
    for g, b in zip(greedy, beam):
        assert g.tokens == b[0].tokens
        assert g.log_prob == pytest.approx(b[0].log_prob, abs=1e-5)
        assert torch.allclose(g.alphas, b[0].alphas, atol=1e-6)


@pytest.mark.parametrize("beam", [1, 3, 5])
def test_batch_equals_one_by_one(beam):
    model, f = tiny(), features(6)
    options = DecodingOptions(beam_size=beam, max_length=10, n_best=beam)
    batched = decode(model, f, options)
    for i in range(f.size(0)):
        single = decode(model, f[i : i + 1], options)[0]
        assert [h.tokens for h in single] == [h.tokens for h in batched[i]]
        for s, b in zip(single, batched[i]):
            assert s.score == pytest.approx(b.score, abs=1e-5)


def test_beam_finds_at_least_as_probable_captions_as_greedy():
    model, f = tiny(1), features(10, seed=4)
    greedy = greedy_search(model, f, max_length=10)
    beam = beam_search(model, f, DecodingOptions(beam_size=5, max_length=10))
    for g, b in zip(greedy, beam):
        if g.finished:
            assert b[0].log_prob >= g.log_prob - 1e-5


def test_n_best_sorted_alphas_match_tokens_and_sum_to_one():
    model, f = tiny(), features(3)
    hyps = beam_search(model, f, DecodingOptions(beam_size=4, n_best=4, max_length=8))
    for image in hyps:
        scores = [h.score for h in image]
        assert scores == sorted(scores, reverse=True) and len(image) >= 1
        for h in image:
            assert h.alphas.shape == (len(h.tokens), P)
            assert torch.allclose(h.alphas.sum(-1), torch.ones(len(h.tokens)), atol=1e-5)
            assert len(h.tokens) <= 9 and END not in h.tokens[:-1]


def test_a_caption_comes_back_when_no_hypothesis_ends():
    model = tiny()
    with torch.no_grad():
        model.out.bias[END] = -1e9  # <end> is never chosen
    f = features(2)
    for options in (DecodingOptions(beam_size=1, max_length=7), DecodingOptions(beam_size=3, max_length=7, n_best=2)):
        for image in decode(model, f, options):
            assert image and all(len(h.tokens) == 7 and not h.finished for h in image)


def test_length_penalty_prefers_longer_captions():
    model, f = tiny(2), features(12, seed=5)
    plain = beam_search(model, f, DecodingOptions(beam_size=5, max_length=12))
    long = beam_search(model, f, DecodingOptions(beam_size=5, max_length=12, length_penalty=2.0))
    assert sum(len(h[0].tokens) for h in long) >= sum(len(h[0].tokens) for h in plain)


@pytest.mark.parametrize("options, words", [
    (dict(beam_size=0), "beam size must be an integer from 1 to 10, got 0"),
    (dict(beam_size=100_000), "beam size must be an integer from 1 to 10"),
    (dict(beam_size=2.5), "beam size must be an integer"),
    (dict(max_length=1_000_000_000), "max length must be an integer from 1 to 60"),
    (dict(beam_size=2, n_best=3), "n-best must be between 1 and the beam size (2), got 3"),
    (dict(length_penalty=float("nan")), "length penalty must be from 0 to 5.0"),
    (dict(no_repeat_ngram=1), "no-repeat n-gram size must be 0 (off) or from 2 to 60, got 1"),
])
def test_options_are_validated_with_the_bounds_of_the_http_api(options, words):
    with pytest.raises(ValueError) as e:
        DecodingOptions(**options)
    assert words in str(e.value)
    DecodingOptions(beam_size=10, n_best=10, max_length=60, length_penalty=5.0)  # the bounds themselves pass


# --- the batched searches (which drop done images' rows) against a plain one-image, one-row-at-a-time search


class StubMemory(NamedTuple):
    features: torch.Tensor  # (B, P, STUB_D)
    length: torch.Tensor  # (B,) words after which <end> takes over


STUB_V, STUB_D = 13, 16


class RowwiseStub:
    """The search contract (attend_memory, init_state, step) with row-wise operations only: exact arithmetic
    and per-row (log-)softmax, so a row's results never depend on the other rows of the batch, to the bit.
    Image i writes pseudo-random words and its <end> takes over after about features[i, 0, 0] words."""

    def __init__(self, vocab_size=STUB_V):
        self.V = vocab_size

    def attend_memory(self, features):
        return StubMemory(features, features[:, 0, 0].clone())

    def init_state(self, memory):
        return (memory.features[:, 0, 1 : self.V + 1].clone(), torch.zeros(memory.length.shape))  # h (B, V), t (B,)

    def step(self, tokens, state, memory):
        h, t = state
        W = h.size(0) // memory.length.size(0)  # rows per image: the memory has one row per image
        length, features = memory.length.repeat_interleave(W), memory.features.repeat_interleave(W, 0)
        h = torch.frac(h * 7.31 + tokens.unsqueeze(1) * 0.373 + 0.117)  # (B, V) in [0, 1)
        t = t + 1
        end = torch.zeros(self.V)
        end[END] = 3.0
        logits = 4.0 * h + (t - length).unsqueeze(1) * end  # (B, V)
        alpha = torch.softmax(features[:, :, 2] * h[:, :1] * 4.0, dim=1)  # (B, P)
        return torch.log_softmax(logits, dim=1), (h, t), alpha


def stub_features(lengths):
    f = torch.rand(len(lengths), P, STUB_D, generator=torch.Generator().manual_seed(7))
    f[:, 0, 0] = torch.tensor(lengths, dtype=torch.float)
    return f


@torch.no_grad()
def reference_search(model, features, beam_size, max_length, length_penalty=0.0, no_repeat_ngram=0):
    """The rule of beam_search, written plainly: one image at a time, every hypothesis stepped on its own
    (a batch of one row), hypotheses as Python lists. Returns all (up to beam_size) hypotheses per image."""
    K, L = beam_size, max_length
    results = []
    for i in range(features.size(0)):
        memory = model.attend_memory(features[i : i + 1])
        beams = [(torch.tensor(0.0), [], [], model.init_state(memory))]  # (log p, words, alphas, state)
        finished, n_finished = [], 0  # (score, log p, words, alphas)
        for t in range(L + 1):
            candidates = []
            for lp_beam, words, alphas, state in beams:
                lp, next_state, alpha = model.step(torch.tensor([words[-1] if words else START]), state, memory)
                for v in range(lp.size(1)):
                    if v == UNK:  # never chosen (DecodingOptions.allow_unk False)
                        continue
                    if no_repeat_ngram and repeats_an_ngram(words + [v], no_repeat_ngram):
                        continue
                    candidates.append((lp_beam + lp[0, v], words + [v], alphas + [alpha[0]], next_state))
            candidates = sorted(candidates, key=lambda c: -float(c[0]))[: 2 * K]
            if n_finished < K:
                for lp_c, words, alphas, _ in candidates[:K]:
                    if words[-1] == END:
                        finished.append((decoding.length_normalize(lp_c, t + 1, length_penalty), lp_c, words, alphas))
                        n_finished += 1
            if t == L or n_finished >= K:
                break
            beams = [c for c in candidates if c[1][-1] != END][:K]
        if n_finished < K:
            finished += [(decoding.length_normalize(lp_b, L, length_penalty), lp_b, w, a) for lp_b, w, a, _ in beams]
        finished = sorted(finished, key=lambda h: -float(h[0]))[:K]
        results.append([decoding.Hypothesis(w, float(lp), float(s), torch.stack(a)) for s, lp, w, a in finished])
    return results


def repeats_an_ngram(words, n):
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) < len(grams)


# lengths from 1 word to never ending (> max_length 12): images finish at very different steps
STUB_LENGTHS = [1, 14, 3, 2, 9, 30, 5, 1, 12, 7, 4, 11, 40, 6, 2, 8, 10, 3, 13, 5]


def assert_same(got, want, exact=True):
    assert len(got) == len(want)
    for image_got, image_want in zip(got, want):
        assert [h.tokens for h in image_got] == [h.tokens for h in image_want]
        for g, w in zip(image_got, image_want):
            if exact:
                assert (g.log_prob, g.score) == (w.log_prob, w.score)
                assert torch.equal(g.alphas, w.alphas)
            else:
                assert g.log_prob == pytest.approx(w.log_prob, abs=1e-4) and g.score == pytest.approx(w.score, abs=1e-4)
                assert torch.allclose(g.alphas, w.alphas, atol=1e-5)


@pytest.mark.parametrize("share", [0.0, 0.1, float("inf")])  # drop done images' rows: every step, default, never
@pytest.mark.parametrize("penalty", [0.0, 1.5])
@pytest.mark.parametrize("beam", [1, 2, 3, 5])
def test_batched_search_equals_plain_reference(beam, penalty, share, monkeypatch):
    monkeypatch.setattr(decoding, "COMPACT_SHARE", share)
    model, f, L = RowwiseStub(), stub_features(STUB_LENGTHS), 12
    want = reference_search(model, f, beam, L, penalty)
    assert len({len(image[0].tokens) for image in want}) >= 8 and not all(image[0].finished for image in want)
    options = DecodingOptions(beam_size=beam, max_length=L, length_penalty=penalty, n_best=beam)
    assert_same(beam_search(model, f, options), want)
    best = decode(model, f, DecodingOptions(beam_size=beam, max_length=L, length_penalty=penalty, n_best=1))
    if beam == 1:  # decode's greedy search: the same words, log p and alphas; its score is log p
        want = [[decoding.Hypothesis(h.tokens, h.log_prob, h.log_prob, h.alphas) for h in image] for image in want]
    assert_same(best, [image[:1] for image in want])


@pytest.mark.parametrize("share", [0.0, 0.1])
@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("beam", [1, 3])
def test_no_repeat_ngram_bans_exactly_the_words_that_repeat_one(beam, n, share, monkeypatch):
    """With no_repeat_ngram n the batched searches find what the plain search finds when it skips every
    candidate whose last n words occurred before in it; the stub, left alone, repeats n-grams."""
    monkeypatch.setattr(decoding, "COMPACT_SHARE", share)
    model, f, L = RowwiseStub(vocab_size=6), stub_features(STUB_LENGTHS), 12
    plain = decode(model, f, DecodingOptions(beam_size=beam, max_length=L, n_best=beam))
    assert any(repeats_an_ngram(h.tokens, n) for image in plain for h in image)
    want = reference_search(model, f, beam, L, no_repeat_ngram=n)
    options = DecodingOptions(beam_size=beam, max_length=L, n_best=beam, no_repeat_ngram=n)
    got = beam_search(model, f, options) if beam > 1 else decode(model, f, options)
    if beam == 1:  # greedy: its score is log p
        want = [[decoding.Hypothesis(h.tokens, h.log_prob, h.log_prob, h.alphas) for h in image] for image in want]
    assert_same(got, want)
    assert not any(repeats_an_ngram(h.tokens, n) for image in got for h in image)


def test_block_repeats_bans_the_word_after_each_earlier_occurrence_of_the_last_words():
    words = torch.tensor([[5, 6, 7, 5, 6], [4, 4, 4, 4, 4], [1, 2, 3, 1, 9]])
    lp = torch.zeros(3, 10)
    decoding.block_repeats(lp, words, 3)  # last two words (5 6) came before, followed by 7; (4 4) by 4; (1 9): never
    assert [torch.isinf(row).nonzero().flatten().tolist() for row in lp] == [[7], [4], []]
    lp = torch.zeros(3, 10)
    decoding.block_repeats(lp, words[:, :2], 3)  # two words hold no trigram yet
    assert not torch.isinf(lp).any()


@pytest.mark.parametrize("beam", [1, 2, 3, 5])
def test_batched_search_equals_plain_reference_on_a_model(beam):
    """As above on a real (random) model; its rows are not bitwise independent of the batch (matmuls block
    rows differently), hence the tolerance. Made like benchmarks/run.py's decoding_model, so that images end
    after 1 to 12 words or never."""
    torch.manual_seed(20)
    config = ModelConfig(vocab_size=40, feature_dim=D, embed_dim=16, hidden_dim=24, attention_dim=9)
    model = ShowAttendTell(config).eval()
    with torch.no_grad():
        model.embedding.weight *= 10
        model.out.weight *= 5
        model.out.bias[END] += 1.5
    f, L = features(16, seed=11).clamp(min=0), 12
    want = reference_search(model, f, beam, L, 0.5)
    assert len({len(h.tokens) for image in want for h in image}) >= 3 and not all(image[0].finished for image in want)
    options = DecodingOptions(beam_size=beam, max_length=L, n_best=beam, length_penalty=0.5)
    assert_same(beam_search(model, f, options), want, exact=False)
    if beam == 1:
        greedy = decode(model, f, DecodingOptions(beam_size=1, max_length=L))
        want = [[decoding.Hypothesis(h.tokens, h.log_prob, h.log_prob, h.alphas) for h in image] for image in want]
        assert_same(greedy, want, exact=False)


@pytest.mark.parametrize("beam", [3, 5])
def test_batched_search_equals_plain_reference_with_fewer_words_than_candidates(beam):
    """V = 4 < 2K: dead beams (log p -inf) rank among the 2K candidates and go on, yet change nothing."""
    model, f, L = RowwiseStub(vocab_size=4), stub_features(STUB_LENGTHS), 8
    want = reference_search(model, f, beam, L, 0.5)
    assert_same(beam_search(model, f, DecodingOptions(beam_size=beam, max_length=L, n_best=beam, length_penalty=0.5)), want)


@pytest.mark.parametrize("beam", [1, 3])
def test_unk_is_never_chosen_unless_allowed(beam):
    torch.manual_seed(0)
    model = ShowAttendTell(ModelConfig(vocab_size=12, feature_dim=8, embed_dim=6, hidden_dim=7, attention_dim=5)).eval()
    with torch.no_grad():
        model.out.bias[UNK] += 50.0  # the model's favourite word is <unk>
    f = torch.rand(4, 3, 8)
    shown = decode(model, f, DecodingOptions(beam_size=beam, max_length=6, n_best=beam))
    assert all(UNK not in h.tokens for hyps in shown for h in hyps)
    research = decode(model, f, DecodingOptions(beam_size=beam, max_length=6, allow_unk=True))
    assert all(UNK in hyps[0].tokens for hyps in research)
