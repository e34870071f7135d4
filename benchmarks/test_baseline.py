"""The benchmark's baseline computes the same function as the fast path, and its FLOP count is the right one.
Beside the benchmark it checks (pytest runs benchmarks/ too: pyproject.toml's testpaths)."""

import pytest
import torch
from baseline import TutorialDecoder, cell_parameters, tutorial_beam_search
from run import decode_tokens, train_flops, training_step
from torch.utils.flop_counter import FlopCounterMode

from imcap.decoding import DecodingOptions, decode
from imcap.model import ModelConfig, ShowAttendTell
from imcap.text import END

P, D, V = 6, 10, 23


def tiny(rnn="lstm", seed=0, **kw) -> ShowAttendTell:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=V, feature_dim=D, embed_dim=8, hidden_dim=12, attention_dim=9, rnn=rnn, **kw)
    return ShowAttendTell(cfg).eval()


def batch(seed=0):
    """3 images, 7 captions of different lengths, two images with several captions."""
    g = torch.Generator().manual_seed(seed)
    features = torch.rand(3, P, D, generator=g)  # (I, P, D)
    lengths = torch.tensor([9, 4, 6, 9, 3, 5, 7])  # (B,)
    captions = torch.randint(4, V, (7, 9), generator=g)  # (B, L)
    captions[:, 0] = 1
    captions[torch.arange(7), lengths - 1] = END
    image_index = torch.tensor([0, 0, 1, 2, 2, 2, 1])
    return features, captions, lengths, image_index


@pytest.mark.parametrize("rnn", ["lstm", "gru"])
def test_baseline_gives_the_fast_paths_logits_and_alphas(rnn):
    model = tiny(rnn)
    baseline = TutorialDecoder(model).eval()
    features, captions, lengths, image_index = batch()
    with torch.no_grad():
        logits, alphas = model(features, captions, lengths, image_index)
        b_logits, b_alphas = baseline(features, captions, lengths, image_index)
    mask = torch.arange(captions.size(1) - 1) < (lengths - 1).unsqueeze(1)  # (B, T) positions that predict a word
    assert torch.allclose(logits[mask], b_logits[mask], atol=1e-5)
    assert torch.allclose(alphas[mask], b_alphas[mask], atol=1e-5)
    assert torch.allclose(b_alphas.sum(2), mask.float(), atol=1e-5)  # zero past each caption's end


@pytest.mark.parametrize("rnn", ["lstm", "gru"])
def test_baseline_gives_the_fast_paths_gradients(rnn):
    """Also for the features (a fine-tuned encoder's): the fast path sums the steps' gradients of W_a a and a
    in its own buffers (fastpath._StepPrefixes)."""
    model = tiny(rnn, dropout=0.0).train()
    baseline = TutorialDecoder(model).train()
    features, captions, lengths, image_index = batch(1)
    feature_grads = []
    for module in (model, baseline):
        features = features.detach().requires_grad_()
        logits, alphas = module(features, captions, lengths, image_index)
        mask = torch.arange(captions.size(1) - 1) < (lengths - 1).unsqueeze(1)
        (logits[mask].square().sum() + (alphas[mask] * torch.arange(P)).sum()).backward()
        feature_grads.append(features.grad)
    assert torch.allclose(*feature_grads, atol=1e-5)
    pairs = [
        (model.embedding, baseline.embedding), (model.attention.feature_proj, baseline.encoder_att),
        (model.attention.hidden_proj, baseline.decoder_att), (model.attention.score, baseline.full_att),
        (model.init_h, baseline.init_h), (model.f_beta, baseline.f_beta),
        (model.out_h, baseline.out_h), (model.out_z, baseline.out_z), (model.out, baseline.fc),
    ]
    for fast, base in pairs:
        for (name, p), q in zip(fast.named_parameters(), base.parameters()):
            assert torch.allclose(p.grad, q.grad, atol=1e-5), name
    if rnn == "lstm":
        assert torch.allclose(model.init_c.weight.grad, baseline.init_c.weight.grad, atol=1e-5)
    cell = baseline.decode_step
    for g, q in zip(cell_parameters(model, lambda p: p.grad), (cell.weight_ih, cell.weight_hh, cell.bias_ih)):
        assert torch.allclose(g, q.grad, atol=1e-5)


@pytest.mark.parametrize("kw", [{}, {"rnn": "gru"}, {"gate": False, "deep_output": False}])
def test_train_flops_count_the_fast_paths_matmuls(kw):
    """On captions of one length and distinct images the fast path does exactly the useful work; the baseline
    does the projection W_a a once per caption and step instead of once per image, and its context sum is no matmul."""
    model = tiny(**kw).train()
    B, L = 6, 7
    g = torch.Generator().manual_seed(2)
    captions, lengths = torch.randint(4, V, (B, L), generator=g), torch.full((B,), L)
    features = torch.rand(B, P, D, generator=g)
    useful = train_flops(model.config, P, B, lengths)
    counted = []
    for module in (model, TutorialDecoder(model).train()):
        with FlopCounterMode(display=False) as counter:
            training_step(module, torch.optim.Adam(module.parameters()), features, captions, lengths, None)
        counted.append(counter.get_total_flops())
    S, A = B * (L - 1), model.config.attention_dim
    assert counted[0] == useful
    assert counted[1] == useful - S * 2 * 2 * P * D + (S - B) * 2 * 2 * P * D * A


def test_one_image_at_a_time_equals_batched():
    model = tiny(seed=3)
    with torch.no_grad():  # as run.decoding_model: words drive the state, peaky logits, <end> raised
        model.embedding.weight *= 3
        model.out.weight *= 3
        model.out.bias[END] += 0.1
    features = torch.randn(8, P, D, generator=torch.Generator().manual_seed(3))
    lengths = set()
    for k in (1, 3, 5):
        options = DecodingOptions(beam_size=k, max_length=12)
        batched = decode_tokens(model, features, options, chunk=8)
        assert decode_tokens(model, features, options, chunk=1) == batched, k
        assert decode_tokens(model, features, options, chunk=3) == batched, k
        lengths |= {len(t) for t in batched}
    assert len(lengths) > 2  # captions end at different steps: the comparison is not trivial


def talkative(rnn="lstm") -> tuple[ShowAttendTell, torch.Tensor]:
    """A small random model made to write captions of 2 to 12 words, some unfinished at max_length 12 (the
    trick of run.decoding_model: words drive the state, peaky logits, <end> raised), and 20 images of
    nonnegative features with a per-image channel pattern, as run.decoding_features."""
    torch.manual_seed(1)
    cfg = ModelConfig(vocab_size=100, feature_dim=32, embed_dim=16, hidden_dim=32, attention_dim=16, rnn=rnn)
    model = ShowAttendTell(cfg).eval()
    with torch.no_grad():
        model.embedding.weight *= 10
        model.out.weight *= 5
        model.out.bias[END] += 1.0
    g = torch.Generator().manual_seed(1)
    features = (torch.randn(20, 1, 32, generator=g) + torch.randn(20, 9, 32, generator=g)).clamp(min=0)  # (20, 9, 32)
    return model, features


@pytest.mark.parametrize("rnn, k", [("lstm", 1), ("lstm", 3), ("lstm", 5), ("gru", 3)])
def test_tutorial_beam_search_finds_imcaps_captions(rnn, k):
    """The benchmark's one-image-at-a-time beam search baseline searches by imcap.decoding's rules: same best
    caption, log p and attention for every image, whether the search ends with k finished hypotheses or at
    max_length."""
    model, features = talkative(rnn)
    best = [hyps[0] for hyps in decode(model, features, DecodingOptions(beam_size=k, max_length=12))]
    baseline = TutorialDecoder(model).eval()
    for image, hyp in zip(features, best):
        tokens, log_prob, alphas = tutorial_beam_search(baseline, image, beam_size=k, max_length=12)
        assert tokens == hyp.tokens
        assert log_prob == pytest.approx(hyp.score, abs=1e-4)
        assert torch.allclose(alphas, hyp.alphas, atol=1e-5)
    if rnn == "lstm":  # the comparison is not trivial: captions of several lengths, finished and not
        assert len({len(h.tokens) for h in best}) >= 4
        assert any(h.finished for h in best) and any(not h.finished for h in best)
