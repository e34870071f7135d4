"""The model, the searches and checkpoints on an accelerator (the `accelerator` fixture of conftest.py), against
the CPU."""

import pytest
import torch

from imcap import fastpath
from imcap.checkpoint import load_checkpoint, save_checkpoint
from imcap.decoding import DecodingOptions, decode
from imcap.model import ModelConfig, ShowAttendTell, caption_loss
from imcap.text import END, START


def model_and_batch(**kw):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=40, feature_dim=24, embed_dim=16, hidden_dim=20, attention_dim=12, dropout=0.0, **kw)
    model = ShowAttendTell(config)
    g = torch.Generator().manual_seed(1)
    features = torch.rand(3, 6, 24, generator=g)  # (I, P, D)
    lengths = torch.tensor([7, 5, 4, 6, 3, 7])  # (B,) with <start> and <end>
    captions = torch.randint(4, 40, (6, 7), generator=g)  # (B, L)
    captions[:, 0] = START
    captions[torch.arange(6), lengths - 1] = END
    captions[torch.arange(7).unsqueeze(0) >= lengths.unsqueeze(1)] = 0
    image_index = torch.tensor([0, 0, 1, 1, 2, 2])
    return model, (features, captions, lengths, image_index)


def loss_and_grads(model, batch):
    features, captions, lengths, image_index = batch
    logits, alphas = model(features, captions, lengths, image_index)[:2]
    loss, _ = caption_loss(logits, captions[:, 1:], alphas, lengths)
    model.zero_grad()
    loss.backward()
    # clones: on the CPU .cpu() returns the gradient itself, which model.to(device) then moves in place
    grads = {k: p.grad.cpu().clone() for k, p in model.named_parameters() if p.grad is not None}
    return logits.detach().cpu().clone(), loss.item(), grads


@pytest.mark.parametrize("rnn", ["lstm", "gru"])
def test_teacher_forcing_on_the_device_equals_the_cpu(accelerator, rnn):
    model, batch = model_and_batch(rnn=rnn)
    want_logits, want_loss, want_grads = loss_and_grads(model, batch)  # the CPU (fast path)
    model.to(accelerator)
    got_logits, got_loss, got_grads = loss_and_grads(model, [x.to(accelerator) for x in batch])
    assert next(model.parameters()).device.type == accelerator.type
    assert torch.allclose(got_logits, want_logits, atol=1e-4)
    assert abs(got_loss - want_loss) < 1e-4
    assert want_grads.keys() == got_grads.keys()
    for k in want_grads:
        assert torch.allclose(got_grads[k], want_grads[k], atol=1e-4, rtol=1e-3), k


def test_bf16_autocast_teacher_forcing_stays_near_fp32(accelerator):
    if accelerator.type == "cpu":
        pytest.skip("bf16 autocast on the CPU is covered by the training tests")
    model, batch = model_and_batch()
    model.to(accelerator)
    batch = [x.to(accelerator) for x in batch]
    with torch.no_grad():
        fp32 = model(*batch)[0]
        with torch.autocast(accelerator.type, dtype=torch.bfloat16):
            bf16 = model(*batch)[0].float()
    assert (bf16 - fp32).abs().max().item() < 0.05 * max(1.0, fp32.abs().max().item())


@pytest.mark.parametrize("beam", [1, 3])
def test_search_on_the_device_finds_the_cpus_captions(accelerator, beam):
    model, (features, *_) = model_and_batch()
    model.eval()
    with torch.no_grad():
        model.embedding.weight *= 10  # peaky, so that near ties are rare
        model.out.weight *= 5
    options = DecodingOptions(beam_size=beam, max_length=12, n_best=beam)
    want = decode(model, features, options)
    got = decode(model.to(accelerator), features.to(accelerator), options)
    for w, g in zip(want, got):
        assert [h.tokens for h in w] == [h.tokens for h in g]
        assert all(h.alphas.device.type == accelerator.type or h.alphas.device.type == "cpu" for h in g)
        assert all(abs(a.log_prob - b.log_prob) < 1e-3 for a, b in zip(w, g))


def test_a_checkpoint_saved_from_the_device_loads_on_the_cpu(accelerator, tmp_path):
    model, _ = model_and_batch()
    model.to(accelerator)
    save_checkpoint(tmp_path / "ck", model, {"model_config": model.config.to_dict(), "vocab": {}, "encoder": {}})
    _, weights = load_checkpoint(tmp_path / "ck")
    assert all(w.device.type == "cpu" for w in weights.values())
    for k, v in model.state_dict().items():
        assert torch.equal(weights[k], v.cpu()), k


def test_the_device_takes_the_plain_path(accelerator):
    model, _ = model_and_batch()
    assert fastpath.enabled(next(model.to(accelerator).parameters())) == (accelerator.type == "cpu")
