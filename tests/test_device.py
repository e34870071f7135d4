"""Every tensor the model, the searches and SCST make is on the device of their inputs or parameters.

There is no GPU here, so two checks stand in for one:
- the model's step contract runs on the `meta` device (plain path, and the fast path forced), forward and backward;
- the data-dependent parts (teacher forcing, the loss, greedy and beam search, SCST sampling), which read
  values and so cannot run on `meta`, run on CPU inputs with `meta` as the default device: a tensor made
  without naming a device would then be a meta tensor, and every op's outputs are recorded to find one.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from imcap import fastpath
from imcap.decoding import DecodingOptions, decode
from imcap.model import ModelConfig, ShowAttendTell, caption_loss
from imcap.scst import CiderD, scst_loss
from imcap.text import END, START

P, D, V = 5, 8, 15


def tiny(**kw) -> ShowAttendTell:
    torch.manual_seed(0)
    return ShowAttendTell(ModelConfig(vocab_size=V, feature_dim=D, embed_dim=6, hidden_dim=7, attention_dim=4, **kw))


class OutputDevices(TorchDispatchMode):
    """Records the ops whose outputs are on another device than `expected`."""

    def __init__(self, expected: str):
        super().__init__()
        self.expected, self.strays = expected, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != self.expected:
                self.strays.append(f"{func} -> {t.device}")
        return out


@pytest.mark.parametrize("force", [None, True], ids=["plain", "fast_forced"])
@pytest.mark.parametrize("W", [1, 3])
@pytest.mark.parametrize("kw", [{}, {"rnn": "gru"}, {"gate": False, "deep_output": False}])
def test_step_runs_on_the_meta_device(monkeypatch, kw, W, force):
    monkeypatch.setattr(fastpath, "FORCE", force)
    model = tiny(**kw).to("meta")
    features = torch.empty(3, P, D, device="meta")
    tokens = torch.zeros(3 * W, dtype=torch.long, device="meta")
    log = OutputDevices("meta")
    with log:
        for grad in (False, True):
            with torch.set_grad_enabled(grad):
                memory = model.attend_memory(features)
                state = tuple(s.repeat_interleave(W, 0) for s in model.init_state(memory))
                lp, state, alpha = model.step(tokens, state, memory)
            if grad:
                (lp.sum() + alpha.sum() + state[0].sum()).backward()
    assert lp.shape == (3 * W, V) and alpha.shape == (3 * W, P) and lp.device.type == "meta"
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in model.parameters() if p.requires_grad)
    assert not log.strays, log.strays


def batch():
    g = torch.Generator().manual_seed(1)
    features = torch.rand(3, P, D, generator=g)
    lengths = torch.tensor([6, 4, 5, 3])
    captions = torch.randint(4, V, (4, 6), generator=g)
    captions[:, 0] = START
    captions[torch.arange(4), lengths - 1] = END
    return features, captions, lengths, torch.tensor([0, 2, 2, 1])


@pytest.mark.parametrize("force", [None, False], ids=["fast", "plain"])
@pytest.mark.parametrize("kw", [{}, {"rnn": "gru"}, {"attention": "hard"}])
def test_training_step_makes_no_tensor_off_its_inputs_device(monkeypatch, kw, force):
    """Teacher forcing (with hard attention's sampling), the loss and the backward, on CPU inputs with `meta`
    as the default device: no op may give a meta tensor."""
    monkeypatch.setattr(fastpath, "FORCE", force)
    model = tiny(**kw).train()
    features, captions, lengths, image_index = batch()
    log = OutputDevices("cpu")
    with torch.device("meta"), log:
        logits, alphas, samples = model(features, captions, lengths, image_index, return_samples=True)
        loss, _ = caption_loss(logits, captions[:, 1:], alphas, lengths, samples=samples)
        loss.backward()
    assert not log.strays, log.strays
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("force", [None, False], ids=["fast", "plain"])
def test_searches_and_scst_make_no_tensor_off_their_inputs_device(monkeypatch, force):
    monkeypatch.setattr(fastpath, "FORCE", force)
    model = tiny().eval()
    features = batch()[0]
    cider = CiderD([[[4, 5, 6, END]], [[7, 8, END]], [[9, END]]])
    log = OutputDevices("cpu")
    with torch.device("meta"), log:
        for k in (1, 3):
            decode(model, features, DecodingOptions(beam_size=k, max_length=6, length_penalty=1.0, n_best=k))
        loss, _ = scst_loss(model, features, [0, 1, 2], cider, samples=2, max_length=5)
        loss.backward()
    assert not log.strays, log.strays
