"""The CPU fast path (imcap/fastpath.py) computes what model.py's plain path computes: values and gradients."""

import pytest
import torch

from imcap import fastpath
from imcap.model import Memory, ModelConfig, ShowAttendTell, caption_loss
from imcap.text import END, START

B, P, D, V, H = 4, 6, 10, 17, 12


def tiny(**kw) -> ShowAttendTell:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, feature_dim=D, embed_dim=8, hidden_dim=H, attention_dim=9, **kw)
    return ShowAttendTell(cfg)


def batch():
    """4 captions of different lengths over 3 images (two captions share image 2)."""
    g = torch.Generator().manual_seed(1)
    features = torch.randn(3, P, D, generator=g)
    lengths = torch.tensor([5, 7, 4, 7])
    captions = torch.zeros(B, 7, dtype=torch.long)
    for b, n in enumerate(lengths.tolist()):
        captions[b, 0], captions[b, n - 1] = START, END
        captions[b, 1 : n - 1] = torch.randint(4, V, (n - 2,), generator=g)
    return features, captions, lengths, torch.tensor([2, 0, 1, 2])


def close(got: torch.Tensor, want: torch.Tensor, what: str = ""):
    """Equal within float32 rounding: 1e-5 relative to the tensor's largest element."""
    got, want = got.detach(), want.detach()
    scale = float(want.abs().max()) if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * max(scale, 1e-3), msg=lambda m: f"{what}: {m}")


@pytest.fixture
def paths(monkeypatch):
    """run(force, f): f() with the fast path forced on (True) or off (False), restored after."""

    def run(force: bool, f):
        monkeypatch.setattr(fastpath, "FORCE", force)
        try:
            return f()
        finally:
            monkeypatch.setattr(fastpath, "FORCE", None)

    return run


def test_the_fast_path_is_chosen_by_device(monkeypatch):
    assert fastpath.enabled(torch.zeros(1)) and not fastpath.enabled(torch.zeros(1, device="meta"))
    monkeypatch.setattr(fastpath, "FORCE", False)
    assert not fastpath.enabled(torch.zeros(1))
    monkeypatch.setattr(fastpath, "FORCE", True)
    assert fastpath.enabled(torch.zeros(1, device="meta"))


CONFIGS = [
    {"rnn": "lstm"}, {"rnn": "gru"}, {"rnn": "lstm", "gate": False, "deep_output": False},
    {"rnn": "gru", "gate": False, "deep_output": False}, {"attention": "hard"}, {"attention": "hard", "rnn": "gru"},
]


@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_teacher_forcing_fast_equals_plain(paths, kw):
    """Training mode (dropout, and for hard attention the sampled locations, drawn from one seed in the same
    order): loss, logits, alphas, hard attention's samples, and every parameter's and the features' gradient."""
    model = tiny(**kw).train()
    features, captions, lengths, image_index = batch()

    def run():
        torch.manual_seed(7)
        model.zero_grad(set_to_none=True)
        a = features.clone().requires_grad_()
        logits, alphas, samples = model(a, captions, lengths, image_index, return_samples=True)
        loss, _ = caption_loss(logits, captions[:, 1:], alphas, lengths, samples=samples, baseline=-2.0)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        return loss.detach(), logits.detach(), alphas.detach(), samples, grads, a.grad

    fast, plain = paths(True, run), paths(False, run)
    for what, got, want in zip(("loss", "logits", "alphas"), fast[:3], plain[:3]):
        close(got, want, what)
    assert torch.equal(fast[3].sampled, plain[3].sampled)
    close(fast[3].log_prob, plain[3].log_prob, "log p(s)")
    close(fast[3].entropy, plain[3].entropy, "entropy")
    if kw.get("attention") == "hard":
        assert fast[3].sampled.any() and (fast[3].log_prob != 0).any()  # the comparison covers sampling
    assert fast[4].keys() == plain[4].keys()
    for name in plain[4]:
        close(fast[4][name], plain[4][name], name)
    close(fast[5], plain[5], "features")


@pytest.mark.parametrize("rnn", ["lstm", "gru"])
def test_teacher_forcing_without_autograd_fast_equals_plain(paths, rnn):
    model = tiny(rnn=rnn).eval()
    features, captions, lengths, image_index = batch()
    with torch.no_grad():
        fast, plain = (paths(f, lambda: model(features, captions, lengths, image_index)) for f in (True, False))
    for got, want in zip(fast, plain):
        close(got, want)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("W", [1, 3])
@pytest.mark.parametrize("rnn", ["lstm", "gru"])
def test_decoding_step_with_shared_memory_fast_equals_plain(paths, rnn, W, grad):
    """model.step over a memory of one row per image and W state rows per image (beam search, SCST sampling):
    log-probs, state and alpha, and with autograd (SCST) the gradients of every parameter and of the state."""
    model = tiny(rnn=rnn).eval()
    features = batch()[0]  # (M = 3, P, D)
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(4, V, (3 * W,), generator=g)
    h = torch.randn(3 * W, H, generator=g)

    def run():
        model.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(grad):
            memory = model.attend_memory(features)
            state = tuple(s.repeat_interleave(W, 0) for s in model.init_state(memory))  # (3 W, n) each
            state = (state[0] + h.requires_grad_(grad),) + state[1:]
            lp, new_state, alpha = model.step(tokens, state, memory)
            out = [lp.detach(), *(s.detach() for s in new_state), alpha.detach()]
            if grad:
                (lp.exp()[:, 4:9].sum() + new_state[0].square().sum() + alpha[:, 0].sum()).backward()
                out += [p.grad.clone() for p in model.parameters() if p.grad is not None] + [h.grad]
                h.grad = None
        return out

    fast, plain = paths(True, run), paths(False, run)
    assert len(fast) == len(plain)
    for i, (got, want) in enumerate(zip(fast, plain)):
        close(got, want, f"output {i}")


def test_energies_are_the_papers_up_to_a_constant_per_row():
    """e' = 2 w^T sigmoid(2 (W_a a + b + W_h h)) = w^T tanh(W_a a + b + W_h h) + sum(w), with and without autograd."""
    g = torch.Generator().manual_seed(3)
    projected, hidden, w = torch.randn(3, P, 9, generator=g), torch.randn(3, 2, 1, 9, generator=g), torch.randn(1, 9, generator=g)
    want = (torch.tanh(projected.unsqueeze(1) + hidden) @ w.T).squeeze(3) + w.sum()  # (3, 2, P)
    close(fastpath.energies(projected, hidden, w), want)
    close(fastpath.energies(projected.requires_grad_(), hidden, w).detach(), want)


def test_energies_in_blocks_equal_the_whole_computation():
    """Decoding (no autograd) computes the energies a few images at a time; the blocks, the last one short,
    give what the whole (M, W, P, A) computation gives, for one and several rows per image."""
    model = tiny().eval()
    features = batch()[0]
    M = features.size(0)
    memory = model.attend_memory(features)
    w = model.attention.score.weight
    for W in (1, 3):
        h = torch.randn(M * W, H)
        with torch.no_grad():
            hidden = model.attention.hidden_proj(h).view(M, W, 1, -1)  # (M, W, 1, A)
            whole = (torch.sigmoid(2 * (memory.projected.unsqueeze(1) + hidden)) @ (2 * w.T)).squeeze(3)
            per_image = W * memory.projected[0].numel()  # W * P * A floats
            for images in (1, 2, M - 1, M + 3):
                e = fastpath.energies(memory.projected, hidden, w, block_floats=images * per_image)
                close(e, whole, f"W={W}, {images} images per block")


def test_memory_holds_the_papers_projection():
    model = tiny()
    features = batch()[0]
    memory = model.attend_memory(features)
    assert isinstance(memory, Memory)
    assert torch.equal(memory.projected, model.attention.feature_proj(features))  # W_a a + b, not scaled
