import pytest
import torch

from imcap.model import ModelConfig, ShowAttendTell, caption_loss, doubly_stochastic_penalty
from imcap.text import END, START

B, P, D, V = 3, 6, 10, 17


def tiny(rnn="lstm", **kw) -> ShowAttendTell:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, feature_dim=D, embed_dim=8, hidden_dim=12, attention_dim=9, rnn=rnn, **kw)
    return ShowAttendTell(cfg).eval()


def batch():
    g = torch.Generator().manual_seed(1)
    features = torch.randn(B, P, D, generator=g)
    lengths = torch.tensor([5, 7, 4])
    captions = torch.zeros(B, 7, dtype=torch.long)
    for b, n in enumerate(lengths.tolist()):
        captions[b, 0], captions[b, n - 1] = START, END
        captions[b, 1 : n - 1] = torch.randint(4, V, (n - 2,), generator=g)
    return features, captions, lengths


@pytest.mark.parametrize("rnn", ["lstm", "gru"])
def test_forward_shapes_and_attention_sums_to_one(rnn):
    model = tiny(rnn)
    features, captions, lengths = batch()
    logits, alphas = model(features, captions, lengths)
    assert logits.shape == (B, 6, V) and alphas.shape == (B, 6, P)
    for b, n in enumerate(lengths.tolist()):
        assert torch.allclose(alphas[b, : n - 1].sum(-1), torch.ones(n - 1), atol=1e-6)
        assert torch.all(alphas[b, n - 1 :] == 0)  # finished rows cost nothing and stay zero


@pytest.mark.parametrize("rnn", ["lstm", "gru"])
@pytest.mark.parametrize("gate,deep", [(True, True), (False, False)])
def test_teacher_forcing_equals_stepping(rnn, gate, deep):
    """forward() (sorted rows, output layer batched over time) == the search contract's step()."""
    model = tiny(rnn, gate=gate, deep_output=deep)
    features, captions, lengths = batch()
    logits, alphas = model(features, captions, lengths)
    memory = model.attend_memory(features)
    state = model.init_state(memory)
    for t in range(6):
        log_probs, state, alpha = model.step(captions[:, t], state, memory)
        for b, n in enumerate(lengths.tolist()):
            if t < n - 1:
                assert torch.allclose(log_probs[b], logits[b, t].log_softmax(-1), atol=1e-5)
                assert torch.allclose(alpha[b], alphas[b, t], atol=1e-6)


def test_doubly_stochastic_penalty_by_hand():
    alphas = torch.tensor([[[0.5, 0.5], [1.0, 0.0], [0.3, 0.7]]])  # (1, T=3, P=2), last step is padding
    mask = torch.tensor([[True, True, False]])
    # coverage = [1.5, 0.5] -> (1-1.5)^2 + (1-0.5)^2 = 0.5
    assert doubly_stochastic_penalty(alphas, mask).item() == pytest.approx(0.5)


def test_loss_ignores_padding_and_decreases_when_overfitting():
    model = tiny(dropout=0.0)
    model.train()
    features, captions, lengths = batch()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(100):
        logits, alphas = model(features, captions, lengths)
        loss, parts = caption_loss(logits, captions[:, 1:], alphas, lengths, alpha_c=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(parts["xent"])
    assert losses[-1] < 0.3 * losses[0]
    # padding targets do not matter: changing them leaves the loss unchanged
    model.eval()
    logits, alphas = model(features, captions, lengths)
    other = captions.clone()
    other[0, 5:] = 9
    a, _ = caption_loss(logits, captions[:, 1:], alphas, lengths)
    b, _ = caption_loss(logits, other[:, 1:], alphas, lengths)
    assert a.item() == b.item()


def test_bad_rnn_name():
    with pytest.raises(ValueError, match="rnn"):
        ShowAttendTell(ModelConfig(vocab_size=5, rnn="transformer"))


def test_captions_sharing_an_image_equal_repeated_features():
    """image_index (each image projected once) gives what repeating the features per caption gives."""
    model = tiny()
    features, captions, lengths = batch()
    index = torch.tensor([2, 0, 2])
    a = model(features[index], captions, lengths)
    b = model(features, captions, lengths, image_index=index)
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(a, b))


@pytest.mark.parametrize("rnn", ["lstm", "gru"])
def test_cell_equals_torch_cells_and_old_checkpoints_load(rnn):
    """The explicit cell computes what nn.LSTMCell / nn.GRUCell compute; their weights load into it."""
    model = tiny(rnn, gate=False)
    cfg = model.config
    cell = (torch.nn.LSTMCell if rnn == "lstm" else torch.nn.GRUCell)(cfg.embed_dim + cfg.feature_dim, cfg.hidden_dim)
    old = {k: v for k, v in model.state_dict().items() if not k.startswith("gates_")}
    old.update({f"rnn.{k}": v for k, v in cell.state_dict().items()})
    model.load_state_dict(old)
    features, captions, _ = batch()
    memory = model.attend_memory(features)
    state = model.init_state(memory)
    emb = model.embedding(captions[:, 0])
    new_state, context, _, _ = model._advance(model.gates_e(emb), state, memory)
    x = torch.cat([emb, context], dim=1)
    expected = cell(x, state) if rnn == "lstm" else (cell(x, state[0]),)
    for a, b in zip(new_state, expected):
        assert torch.allclose(a, b, atol=1e-6)


def test_attention_is_the_papers_tanh_mlp_and_old_score_biases_load():
    """alpha = softmax(w^T tanh(W_a a + b + W_h h)) (on the CPU computed with a sigmoid, fastpath.energies); a
    checkpoint from before the score lost its (inert) bias loads."""
    model = tiny()
    features, _, _ = batch()
    h = torch.randn(B, 12)
    att = model.attention
    e = torch.tanh(att.feature_proj(features) + att.hidden_proj(h).unsqueeze(1)) @ att.score.weight.squeeze(0)
    _, alpha = att(model.attend_memory(features), h)
    assert torch.allclose(alpha, torch.softmax(e + 3.0, dim=1), atol=1e-6)  # any bias gives the same alpha
    old = {**model.state_dict(), "attention.score.bias": torch.tensor([0.7])}
    tiny().load_state_dict(old)


@pytest.mark.parametrize("grad", [False, True])
def test_rows_sharing_an_image_attend_as_if_the_memory_were_copied(grad):
    """Beam search keeps one memory row per image for its W beams: attention over the shared memory gives what
    it gives over a memory repeated per row, with and without autograd (and the same gradients)."""
    model = tiny()
    features, _, _ = batch()
    W = 3
    h = torch.randn(B * W, 12, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        shared = model.attention(model.attend_memory(features), h)
        copied = model.attention(model.attend_memory(features.repeat_interleave(W, 0)), h)
    for got, want in zip(shared, copied):
        assert torch.allclose(got, want, atol=1e-6)
    if grad:
        g = torch.randn_like(shared[0])
        wrt = [h, model.attention.feature_proj.weight]
        grads = [torch.autograd.grad((out[0] * g).sum(), wrt) for out in (shared, copied)]
        for got, want in zip(*grads):
            assert torch.allclose(got, want, atol=1e-5)
