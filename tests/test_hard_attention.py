"""Hard (stochastic) attention, paper section 4.1: sampling, its loss terms, and training with it."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from imcap.model import HardSamples, ModelConfig, ShowAttendTell, caption_loss
from imcap.text import END, START
from imcap.train import TrainConfig, train

B, P, D, V = 3, 6, 10, 17


def model(**kw) -> ShowAttendTell:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, feature_dim=D, embed_dim=8, hidden_dim=12, attention_dim=9, dropout=0.0, **kw)
    return ShowAttendTell(cfg)


def batch():
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([5, 7, 4])
    captions = torch.zeros(B, 7, dtype=torch.long)
    for b, n in enumerate(lengths.tolist()):
        captions[b, 0], captions[b, n - 1] = START, END
        captions[b, 1 : n - 1] = torch.randint(4, V, (n - 2,), generator=g)
    return torch.randn(B, P, D, generator=g), captions, lengths


def test_hard_model_without_sampling_and_at_inference_is_the_soft_model():
    soft, hard = model(), model(attention="hard", hard_sample_prob=0.0)
    features, captions, lengths = batch()
    torch.testing.assert_close(soft.train()(features, captions, lengths)[0], hard.train()(features, captions, lengths)[0])
    always = model(attention="hard", hard_sample_prob=1.0).eval()  # inference reads the expected context
    torch.testing.assert_close(soft.eval()(features, captions, lengths)[0], always(features, captions, lengths)[0])


def test_sampled_locations_log_probability_and_entropy():
    m = model(attention="hard", hard_sample_prob=1.0).train()
    with torch.no_grad():
        m.attention.score.weight.zero_()  # uniform attention: every location has probability 1/P
    features, captions, lengths = batch()
    logits, alphas, samples = m(features, captions, lengths, return_samples=True)
    steps = (lengths - 1).float()
    assert samples.sampled.all()
    torch.testing.assert_close(samples.log_prob, -steps * math.log(P))
    torch.testing.assert_close(samples.entropy, steps * math.log(P))
    # sampling changes the words' probabilities: the contexts are single annotation vectors, not the mean
    soft_logits = m.eval()(features, captions, lengths)[0]
    assert not torch.allclose(logits, soft_logits)


def test_reinforce_term_pushes_up_locations_of_better_than_baseline_captions():
    logits = torch.randn(B, 6, V)
    targets = torch.randint(4, V, (B, 6))
    lengths = torch.tensor([7, 5, 3])
    log_prob = torch.tensor([-2.0, -3.0, -1.0], requires_grad=True)
    samples = HardSamples(log_prob, torch.zeros(B), torch.tensor([True, True, False]))
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (B, T)
    reward = torch.stack([-nll[b, : n - 1].mean() for b, n in enumerate(lengths.tolist())])
    baseline = float(reward[:2].mean())
    loss, parts = caption_loss(logits, targets, torch.full((B, 6, P), 1 / P), lengths, alpha_c=0.0,
                               samples=samples, baseline=baseline, reinforce_weight=1.0, entropy_weight=0.0)
    loss.backward()
    expected = -(reward - baseline) / B
    expected[2] = 0.0  # this caption used the expected context: nothing to reinforce
    torch.testing.assert_close(log_prob.grad, expected)
    assert (log_prob.grad[:2] < 0).tolist() == (reward[:2] > baseline).tolist()  # descent raises their log p(s)
    assert parts["reward"] == pytest.approx(float(reward.sum()) / B)


def test_entropy_bonus_is_subtracted():
    logits, targets, lengths = torch.randn(1, 2, V), torch.tensor([[5, END]]), torch.tensor([3])
    entropy = torch.tensor([1.5], requires_grad=True)
    samples = HardSamples(torch.zeros(1), entropy, torch.tensor([False]))
    loss, _ = caption_loss(logits, targets, torch.full((1, 2, P), 1 / P), lengths, samples=samples, entropy_weight=0.1)
    loss.backward()
    assert float(entropy.grad) == pytest.approx(-0.1)


def test_hard_attention_training_resumes_exactly_and_keeps_its_baseline(tiny_data, tmp_path):
    model_cfg = {"embed_dim": 16, "hidden_dim": 24, "attention_dim": 16, "dropout": 0.3, "attention": "hard"}
    cfg = TrainConfig(epochs=3, batch_size=16, lr=3e-3, warmup_steps=3, patience=0, seed=3, val_max_length=12)
    quiet = dict(progress=False, log=lambda *a: None)
    train(tiny_data, tmp_path / "straight", model_config=model_cfg, train_config=cfg, **quiet)
    train(tiny_data, tmp_path / "resumed", model_config=model_cfg, train_config=cfg, stop_after_steps=7, **quiet)
    train(tiny_data, tmp_path / "resumed", model_config=model_cfg, train_config=cfg, **quiet)
    a = load_file(tmp_path / "straight/checkpoint/model.safetensors")
    b = load_file(tmp_path / "resumed/checkpoint/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    meta = json.loads((tmp_path / "straight/best/checkpoint.json").read_text())
    assert meta["model_config"]["attention"] == "hard"
    # the baseline, a moving average of the words' mean log-likelihood, starts near a uniform guess's and rises
    assert -math.log(meta["model_config"]["vocab_size"]) + 0.1 < float(a["reward_baseline"]) < 0
