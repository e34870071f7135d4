import pytest
import torch

from imcap.decoding import DecodingOptions, beam_search, decode, greedy_search
from imcap.model import ModelConfig, ShowAttendTell
from imcap.text import END

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


def test_options_are_validated():
    with pytest.raises(ValueError):
        DecodingOptions(beam_size=0)
    with pytest.raises(ValueError):
        DecodingOptions(beam_size=2, n_best=3)
