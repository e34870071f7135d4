"""The Show, Attend and Tell decoder (Xu et al. 2015, section 3), in one file.

Notation (the paper's):
    features  a        (B, P, D)  annotation vectors, one per grid location (P = H * W)
    alpha              (B, P)     attention weights over locations at one step, sum to 1
    beta               (B, 1)     gating scalar, beta = sigmoid(f_beta(h_{t-1}))
    context   z_hat    (B, D)     beta * sum_i alpha_i a_i
    h, c               (B, n)     recurrent state
    E y_{t-1}          (B, m)     embedding of the previous word

Equations:
    h0 = tanh(f_init_h(mean_i a_i)),  c0 = tanh(f_init_c(mean_i a_i))
    e_ti = w^T tanh(W_a a_i + W_h h_{t-1} + b)        (W_a a is computed once per image)
    alpha_t = softmax(e_t)
    (h_t, c_t) = LSTM([E y_{t-1}; z_hat_t], (h_{t-1}, c_{t-1}))
    p(y_t) = softmax(L_o(dropout(tanh(E y_{t-1} + L_h h_t + L_z z_hat_t))))      (deep output, eq. 7)

The tanh inside the deep output follows the authors' reference code (arctic-captions); the paper's
equation 7 leaves it implicit. A GRU replaces the LSTM with `rnn="gru"` (its state is then just h).

Hard attention (section 4.1, `attention="hard"`): in training, each caption either samples one location
s_t ~ Multinoulli(alpha_t) per step and reads z_t = a_{s_t}, or (with probability 1 - hard_sample_prob,
the paper's 0.5) uses the expected context as soft attention does. forward(..., return_samples=True)
returns the sampled locations' log-probability and the attention entropy for the REINFORCE loss in
caption_loss. At inference a hard-attention model reads the expected context (the paper's deterministic
test-time approximation), so decoding is deterministic and the search contract is unchanged.

Search (greedy, beam) lives in decoding.py and drives the model through a small contract:
    memory = model.attend_memory(features)      # per-image work done once: projections, mean
    state  = model.init_state(memory)           # tuple of (B, n) tensors
    log_probs, state, alpha = model.step(tokens, state, memory)
Search reorders rows itself with index_select on every tensor of `state` and `memory`. The memory may have one
row per image while the state has W consecutive rows per image (beam search's beams): step() reads each image's
memory once for its W rows, and the search never copies it per beam.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelConfig:
    vocab_size: int  # V, including <pad> <start> <end> <unk>
    feature_dim: int = 1280  # D, channels of the encoder grid (EfficientNet-Lite0: 1280)
    embed_dim: int = 256  # m, word embedding size (also the deep output's size)
    hidden_dim: int = 512  # n, recurrent state size
    attention_dim: int = 512  # size of the attention MLP's hidden layer
    rnn: str = "lstm"  # "lstm" (the paper) or "gru"
    dropout: float = 0.5  # dropout before the output projection L_o
    gate: bool = True  # gating scalar beta on the context (paper section 4.2.1)
    deep_output: bool = True  # p(y) from E y + L_h h + L_z z (eq. 7); False: from h alone
    attention: str = "soft"  # "soft" (deterministic, section 4.2) or "hard" (stochastic, section 4.1)
    hard_sample_prob: float = 0.5  # hard: share of captions that sample locations; the rest use the expectation

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


class Memory(NamedTuple):
    """What the decoder attends over; every tensor is indexed by batch row (reordered by search)."""

    features: torch.Tensor  # (B, P, D) annotation vectors a
    projected: torch.Tensor  # (B, P, A) 2 (W_a a + b) (SoftAttention.project), computed once per image
    mean: torch.Tensor  # (B, D) mean annotation, for the initial state


class HardSamples(NamedTuple):
    """What hard attention sampled in one teacher-forced pass, per caption (rows in the input order)."""

    log_prob: torch.Tensor  # (B,) sum_t log alpha_t[s_t] over the caption's steps (0 for unsampled captions)
    entropy: torch.Tensor  # (B,) sum_t H(alpha_t) over the caption's steps
    sampled: torch.Tensor  # (B,) bool: this caption sampled locations (else it used the expected context)


class SoftAttention(nn.Module):
    """e = w^T tanh(W_a a + b + W_h h); alpha = softmax(e); context = sum alpha a.

    Computed through tanh(x) = 2 sigmoid(2x) - 1 as e' = 2 w^T sigmoid(2 (W_a a + b + W_h h)): e' - e = -(sum w)
    is the same at every location, so the softmax gives the same alpha (which is also why w needs no bias).
    The (B, P, A) nonlinearity is the largest elementwise op of a step, and PyTorch's CPU sigmoid is about 5x
    faster than its tanh (AVX2, docs/performance.md). memory.projected holds 2 (W_a a + b) (project()), so
    no extra pass doubles x.
    """

    def __init__(self, feature_dim: int, hidden_dim: int, attention_dim: int):
        super().__init__()
        self.feature_proj = nn.Linear(feature_dim, attention_dim)  # W_a (with the bias b)
        self.hidden_proj = nn.Linear(hidden_dim, attention_dim, bias=False)  # W_h
        self.score = nn.Linear(attention_dim, 1, bias=False)  # w

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """(B, P, D) -> (B, P, A) 2 (W_a a + b), once per image."""
        return 2 * self.feature_proj(features)

    def forward(
        self, memory: Memory, h: torch.Tensor, hidden_proj: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """memory: M images; h: (M * W, n), W consecutive rows per image (beam search's beams share their image's
        memory, so it is read once per image and not copied per beam). Returns context (M * W, D), alpha (M * W, P).
        hidden_proj: what computes W_h h (default self.hidden_proj; teacher forcing passes a _StepLinear)."""
        M, P, _ = memory.projected.shape
        W = h.size(0) // M
        if M * W != h.size(0):
            raise ValueError(f"{h.size(0)} state rows do not split into the memory's {M} images")
        hidden = 2 * (hidden_proj or self.hidden_proj)(h).view(M, W, 1, -1)  # (M, W, 1, A)
        w = 2 * self.score.weight.T  # (A, 1)
        if torch.is_grad_enabled() and (hidden.requires_grad or memory.projected.requires_grad):
            x2 = memory.projected.unsqueeze(1) + hidden  # (M, W, P, A) = 2 (W_a a + b + W_h h)
            e = (x2.sigmoid_() @ w).squeeze(3)  # (M, W, P), e' above; in place: no 2nd (M, W, P, A)
        else:
            e = _energy_in_blocks(memory.projected, hidden, w)  # (M, W, P), the same without autograd
        alpha = F.softmax(e, dim=2)  # (M, W, P)
        context = torch.bmm(alpha, memory.features)  # (M, W, D): each image's features read once for its W rows
        return context.view(M * W, -1), alpha.view(M * W, P)


def _energy_in_blocks(
    projected: torch.Tensor, hidden: torch.Tensor, w: torch.Tensor, block_floats: int = 2**18,
) -> torch.Tensor:
    """e' = sigmoid(projected + hidden) @ w, (M, P, A), (M, W, 1, A), (A, 1) -> (M, W, P), a few images at a time.

    In decoding (no autograd) the (M, W, P, A) sum need not exist whole: a beam search over 250 images x 3 beams
    would write and read 75 MB per step for it. One block of about 1 MB is reused and stays in cache, so
    the sum, the sigmoid and the product with w each cost one cache-resident pass (docs/performance.md).
    """
    M, P, A = projected.shape
    W = hidden.size(1)
    images = max(1, block_floats // (W * P * A))
    e = projected.new_empty(M, W, P, 1)
    block = projected.new_empty(min(images, M), W, P, A)
    for start in range(0, M, images):
        m = min(images, M - start)
        x = torch.add(projected[start : start + m].unsqueeze(1), hidden[start : start + m], out=block[:m])
        torch.matmul(x.sigmoid_(), w, out=e[start : start + m])
    return e.squeeze(3)


class ShowAttendTell(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.rnn not in ("lstm", "gru"):
            raise ValueError(f"rnn must be 'lstm' or 'gru', not {config.rnn!r}")
        if config.attention not in ("soft", "hard"):
            raise ValueError(f"attention must be 'soft' or 'hard', not {config.attention!r}")
        self.config = c = config
        self.embedding = nn.Embedding(c.vocab_size, c.embed_dim)  # E
        self.attention = SoftAttention(c.feature_dim, c.hidden_dim, c.attention_dim)
        self.init_h = nn.Linear(c.feature_dim, c.hidden_dim)  # f_init_h
        self.init_c = nn.Linear(c.feature_dim, c.hidden_dim) if c.rnn == "lstm" else None  # f_init_c
        self.f_beta = nn.Linear(c.hidden_dim, 1) if c.gate else None
        # The recurrent cell on input [E y; z]: its gates are W_e E y + W_z z + W_h h (+ biases), G of them.
        G = (4 if c.rnn == "lstm" else 3) * c.hidden_dim
        self.gates_e = nn.Linear(c.embed_dim, G)  # W_e, with the input bias
        self.gates_z = nn.Linear(c.feature_dim, G, bias=False)  # W_z
        self.gates_h = nn.Linear(c.hidden_dim, G, bias=c.rnn == "gru")  # W_h (a GRU's b_hn sits inside r * (.))
        if c.deep_output:
            self.out_h = nn.Linear(c.hidden_dim, c.embed_dim)  # L_h
            self.out_z = nn.Linear(c.feature_dim, c.embed_dim)  # L_z
        self.dropout = nn.Dropout(c.dropout)
        self.out = nn.Linear(c.embed_dim if c.deep_output else c.hidden_dim, c.vocab_size)  # L_o
        # hard attention's moving-average baseline of the per-word log-likelihood (updated by training)
        self.register_buffer("reward_baseline", torch.zeros(()), persistent=c.attention == "hard")
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        for layer in (self.gates_e, self.gates_z, self.gates_h):  # as nn.LSTMCell / nn.GRUCell initialise
            for p in layer.parameters():
                nn.init.uniform_(p, -c.hidden_dim**-0.5, c.hidden_dim**-0.5)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Also accepts weights saved before the cell's parameters were split (an nn.LSTMCell/GRUCell `rnn`), and
        before the attention score lost its bias (which could not change alpha)."""
        if "attention.score.bias" in state_dict:
            state_dict = {k: v for k, v in state_dict.items() if k != "attention.score.bias"}
        if "rnn.weight_ih" in state_dict:
            state_dict = dict(state_dict)
            m = self.config.embed_dim
            w_ih, w_hh = state_dict.pop("rnn.weight_ih"), state_dict.pop("rnn.weight_hh")
            b_ih, b_hh = state_dict.pop("rnn.bias_ih"), state_dict.pop("rnn.bias_hh")
            state_dict["gates_e.weight"], state_dict["gates_z.weight"] = w_ih[:, :m], w_ih[:, m:]
            state_dict["gates_h.weight"] = w_hh
            if self.config.rnn == "lstm":
                state_dict["gates_e.bias"] = b_ih + b_hh
            else:
                state_dict["gates_e.bias"], state_dict["gates_h.bias"] = b_ih, b_hh
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # --- the search contract -------------------------------------------------------------------

    def attend_memory(self, features: torch.Tensor) -> Memory:
        """Per-image work done once before decoding. features: (B, P, D)."""
        return Memory(features, self.attention.project(features), features.mean(dim=1))

    def init_state(self, memory: Memory) -> tuple[torch.Tensor, ...]:
        h = torch.tanh(self.init_h(memory.mean))  # (B, n)
        if self.init_c is None:
            return (h,)
        return (h, torch.tanh(self.init_c(memory.mean)))  # (B, n), (B, n)

    def step(
        self, tokens: torch.Tensor, state: tuple[torch.Tensor, ...], memory: Memory
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor]:
        """One decoding step. tokens: (B,) previous words -> log_probs (B, V), new state, alpha (B, P).

        memory may hold fewer rows than the state, B = M * W: then rows w * W .. w * W + W - 1 of tokens and state
        (beam search's beams) all attend over image w of the memory."""
        emb = self.embedding(tokens)  # (B, m)
        state, context, alpha, _ = self._advance(self.gates_e(emb), state, memory)
        logits = self._output(emb, state[0], context)  # (B, V)
        return F.log_softmax(logits, dim=-1), state, alpha

    # --- teacher-forced training ---------------------------------------------------------------

    def forward(
        self, features: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor,
        image_index: torch.Tensor | None = None, return_samples: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, HardSamples]:
        """Teacher forcing.

        features: (I, P, D); captions: (B, L) = <start> w_1 .. w_k <end> <pad>..; lengths: (B,) = k + 2;
        image_index: (B,) the feature row of each caption (default: row b for caption b), so an image with
        several captions in the batch is projected once.
        Returns logits (B, L-1, V) predicting captions[:, 1:], and alphas (B, L-1, P); positions at or
        past a caption's end are zero (mask them with lengths - 1).
        Rows are processed longest first so that finished captions cost nothing at later steps, and the
        word gates and the output layer run only on the positions that predict a word.
        return_samples: also return HardSamples (hard attention in training mode samples locations; otherwise
        nothing is sampled and its log_prob is 0).
        """
        B, L = captions.shape
        if image_index is None:
            image_index = torch.arange(B)
        steps = lengths - 1  # (B,) predictions per caption
        order = torch.argsort(steps, descending=True, stable=True)
        captions, steps = captions[order], steps[order]
        memory = Memory(*(m.index_select(0, image_index[order]) for m in self.attend_memory(features)))  # rows (B)
        state = self.init_state(memory)
        memory = _StepPrefixes(memory)  # memory[:n] for step t, without a memory-sized gradient per step
        # Packed, time-major, as the steps run: step t works on the n_t rows still writing (a prefix: sorted).
        # Only those S = sum_t n_t positions go through the embedding's gates and the output layer.
        counts = [int(n) for n in (steps.unsqueeze(0) > torch.arange(int(steps.max())).unsqueeze(1)).sum(1)]
        row = torch.cat([torch.arange(n) for n in counts])  # (S,) sorted row of each packed position
        col = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))  # (S,) its step t
        emb = self.embedding(captions[row, col])  # (S, m): E y_{t-1}
        gates_e = self.gates_e(emb).split(counts)  # per step (n_t, G): the words' share of the gates, batched
        hard = self.config.attention == "hard" and self.training
        sampled = (torch.rand(B) < self.config.hard_sample_prob) if hard else torch.zeros(B, dtype=torch.bool)
        log_prob_s, entropy = captions.new_zeros(B, dtype=torch.float), captions.new_zeros(B, dtype=torch.float)
        linears = _StepLinears(self) if torch.is_grad_enabled() else None  # weight gradients batched over steps
        hs, contexts, alphas = [], [], []
        for t, n in enumerate(counts):
            state = tuple(s[:n] for s in state)
            sample = sampled[:n] if hard else None
            state, context, alpha, lp_s = self._advance(gates_e[t], state, memory.rows(n), sample, linears)
            hs.append(state[0])  # (n, n_hidden)
            contexts.append(context)  # (n, D)
            alphas.append(alpha)  # (n, P)
            if return_samples:
                entropy = entropy + F.pad(-(alpha * alpha.clamp_min(1e-12).log()).sum(1), (0, B - n))
                if lp_s is not None:
                    log_prob_s = log_prob_s + F.pad(lp_s, (0, B - n))
        logits = self._output(emb, torch.cat(hs), torch.cat(contexts))  # (S, V), batched over time
        at = (order[row], col)  # each packed position in (B, L-1), in the caller's row order
        logits = logits.new_zeros(B, L - 1, logits.size(1)).index_put_(at, logits)  # (B, L-1, V)
        alphas = logits.new_zeros(B, L - 1, features.size(1)).index_put_(at, torch.cat(alphas))  # (B, L-1, P)
        if return_samples:
            inverse = torch.argsort(order)
            return logits, alphas, HardSamples(log_prob_s[inverse], entropy[inverse], sampled[inverse])
        return logits, alphas

    # --- shared pieces ---------------------------------------------------------------------------

    def _advance(
        self, gates_e: torch.Tensor, state: tuple[torch.Tensor, ...], memory: Memory, sample: torch.Tensor | None = None,
        linears: "_StepLinears | None" = None,
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Attend with h_{t-1}, gate, and run the recurrent cell: one step without the output layer.

        gates_e: (B, G) = W_e E y_{t-1} + b, the word's share of the gates (batched over time in training).
        sample: (B,) bool, hard attention: these rows read one sampled location a_s instead of the expected
        context; then the 4th result is (B,) log alpha_s for those rows (0 for the others), else None. Only
        teacher forcing samples, with one memory row per state row.
        linears: teacher forcing's W_h (attention), W_z and W_h (cell), whose weight gradients wait for all steps.
        LSTM (gate order i, f, g, o as nn.LSTMCell):  c = sig(f) c + sig(i) tanh(g);  h = sig(o) tanh(c).
        GRU (as nn.GRUCell):  r, u = sig(x_r + h_r), sig(x_u + h_u);  n = tanh(x_n + r h_n);  h = (1-u) n + u h.
        """
        h = state[0]
        hidden_proj, gates_z, gates_h = ((linears.hidden_proj, linears.gates_z, linears.gates_h) if linears
                                         else (self.attention.hidden_proj, self.gates_z, self.gates_h))
        context, alpha = self.attention(memory, h, hidden_proj)  # (B, D), (B, P)
        log_prob_s = None
        if sample is not None:
            s = torch.multinomial(alpha.detach(), 1)  # (B, 1) a location per row
            rows = torch.arange(h.size(0))
            context = torch.where(sample.unsqueeze(1), memory.features[rows, s.squeeze(1)], context)  # (B, D)
            log_prob_s = torch.where(sample, alpha.gather(1, s).squeeze(1).clamp_min(1e-12).log(), 0.0)  # (B,)
        if self.f_beta is not None:
            context = torch.sigmoid(self.f_beta(h)) * context  # beta: (B, 1)
        gates_x = gates_e + gates_z(context)  # (B, G): + W_z z
        if self.config.rnn == "lstm":
            i, f, g, o = (gates_x + gates_h(h)).chunk(4, dim=1)  # (B, n) each
            c = torch.sigmoid(f) * state[1] + torch.sigmoid(i) * torch.tanh(g)
            return (torch.sigmoid(o) * torch.tanh(c), c), context, alpha, log_prob_s
        x_r, x_z, x_n = gates_x.chunk(3, dim=1)
        h_r, h_z, h_n = gates_h(h).chunk(3, dim=1)  # (B, n) each
        r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
        return ((1 - z) * n + z * h,), context, alpha, log_prob_s

    def _output(self, emb: torch.Tensor, h: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Deep output layer; works on (B, ., .) or (B, T, .) alike."""
        if self.config.deep_output:
            x = torch.tanh(emb + self.out_h(h) + self.out_z(context))  # (.., m)
        else:
            x = h
        return self.out(self.dropout(x))  # (.., V)


class _StepLinears:
    """The linears that teacher forcing applies at every step of the recurrence (W_h h for attention, the
    cell's W_z z and W_h h), with their weight gradients batched over the steps.

    Autograd would compute each step's weight gradient as a small (out, n_t) x (n_t, in) matmul and add it
    to the weight's gradient, a weight-sized pass per step (16 MB for W_z at the paper's sizes). Here each
    step's backward only computes its input's gradient and keeps (grad_out, input); a pass-through node in
    front of all the steps (autograd runs it after the last of them) computes the weight's and bias'
    gradients once, as one matmul over all the steps' rows.
    """

    def __init__(self, model: "ShowAttendTell"):
        self.hidden_proj = self._wrap(model.attention.hidden_proj)
        self.gates_z = self._wrap(model.gates_z)
        self.gates_h = self._wrap(model.gates_h)

    @staticmethod
    def _wrap(layer: nn.Linear):
        if not layer.weight.requires_grad:
            return layer
        kept: list[tuple[torch.Tensor, torch.Tensor]] = []  # (grad_out, input) of each step, filled in backward
        weight, bias = _BatchedWeightGrad.apply(layer.weight, layer.bias, kept)
        return lambda x: _StepLinear.apply(x, weight, bias, kept)


class _BatchedWeightGrad(torch.autograd.Function):
    """Identity on (weight, bias) in forward; in backward, their gradients from the kept (grad_out, input) pairs."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, bias: torch.Tensor | None, kept: list):
        ctx.kept, ctx.has_bias = kept, bias is not None
        ctx.set_materialize_grads(False)
        return weight.view_as(weight), (bias.view_as(bias) if bias is not None else None)

    @staticmethod
    def backward(ctx, grad_weight: torch.Tensor | None, grad_bias: torch.Tensor | None):
        if ctx.kept:
            grad_out = torch.cat([g for g, _ in ctx.kept])  # (S, out)
            dw = grad_out.T @ torch.cat([x for _, x in ctx.kept])  # (out, in)
            grad_weight = dw if grad_weight is None else grad_weight + dw
            if ctx.has_bias:
                db = grad_out.sum(0)
                grad_bias = db if grad_bias is None else grad_bias + db
            ctx.kept.clear()
        return grad_weight, grad_bias if ctx.has_bias else None, None


class _StepLinear(torch.autograd.Function):
    """x W^T + b whose backward gives x its gradient and keeps (grad_out, x) for _BatchedWeightGrad."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, kept: list) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.kept = kept
        ctx.set_materialize_grads(False)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor | None):
        if grad is None:
            return None, None, None, None
        x, weight = ctx.saved_tensors
        ctx.kept.append((grad, x))
        return (grad @ weight if ctx.needs_input_grad[0] else None), None, None, None


class _StepPrefixes:
    """The rows [:n] of each memory tensor for one step of teacher forcing.

    Autograd gives the backward of every step's x[:n] a gradient the size of all of x, zero-filled past row n,
    and then adds it to the sum of the others: at imcap's default sizes that filled and added 12.8 MB per
    step for W_a a alone. Here each step's slice adds its gradient into rows [:n] of one buffer per tensor,
    and a pass-through node in front of all the slices hands that buffer on as x's gradient once, after the
    last of them (autograd runs it last: every slice depends on it).
    """

    def __init__(self, memory: Memory):
        # the gradient sums, made on first use; a plain list, so the autograd nodes that share it hold no cycle
        self.buffers: list[torch.Tensor | None] = [None] * len(memory)
        self.memory = Memory(*(_GradientSum.apply(m, self.buffers, i) if m.requires_grad else m
                               for i, m in enumerate(memory)))

    def rows(self, n: int) -> Memory:
        return Memory(*(_PrefixRows.apply(m, n, self.buffers, i) if m.requires_grad else m[:n]
                        for i, m in enumerate(self.memory)))


class _GradientSum(torch.autograd.Function):
    """Identity in forward; in backward, x's gradient is the buffer its _PrefixRows slices added into."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, buffers: list, i: int) -> torch.Tensor:
        ctx.buffers, ctx.i = buffers, i
        ctx.set_materialize_grads(False)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor | None):
        total = ctx.buffers[ctx.i]
        ctx.buffers[ctx.i] = None  # handed on once
        if grad is not None:  # x also used whole, outside the steps
            total = grad if total is None else total + grad
        return total, None, None


class _PrefixRows(torch.autograd.Function):
    """x[:n] whose backward adds into buffers[i] and gives x no gradient of its own."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, n: int, buffers: list, i: int) -> torch.Tensor:
        ctx.n, ctx.buffers, ctx.i, ctx.shape = n, buffers, i, x.shape
        ctx.set_materialize_grads(False)
        return x[:n]

    @staticmethod
    def backward(ctx, grad: torch.Tensor | None):
        if grad is not None:
            buffers = ctx.buffers
            if buffers[ctx.i] is None:
                buffers[ctx.i] = grad.new_zeros(ctx.shape)
            buffers[ctx.i][: ctx.n] += grad
        return None, None, None, None


def doubly_stochastic_penalty(alphas: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum_i (1 - sum_t alpha_ti)^2 averaged over the batch (paper eq. 14).

    alphas: (B, T, P); mask: (B, T) true where a word is predicted.
    """
    coverage = (alphas * mask.unsqueeze(2)).sum(dim=1)  # (B, P)
    return ((1.0 - coverage) ** 2).sum(dim=1).mean()


def caption_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    alphas: torch.Tensor,
    lengths: torch.Tensor,
    *,
    alpha_c: float = 1.0,
    label_smoothing: float = 0.0,
    totals: tuple[float, float] | None = None,
    samples: HardSamples | None = None,
    baseline: float = 0.0,
    reinforce_weight: float = 1.0,
    entropy_weight: float = 0.01,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy over real words (padding masked) + alpha_c * doubly stochastic penalty.

    logits: (B, T, V) with T = L-1; targets: (B, T) = captions[:, 1:]; lengths: (B,) caption lengths L_b.
    totals: (words, captions) of the whole batch when this is one shard of it (distributed training):
    the word and caption sums are divided by those, so the shards' losses add up to the batch's loss.

    samples (hard attention, paper eq. 12): adds, per caption that sampled locations s,
        - reinforce_weight * (r - baseline) * log p(s)  -  entropy_weight * H(alpha)
    with the reward r = the caption's mean log p(y_t | s) (per word rather than the paper's sum, so caption
    length adds no variance) and `baseline` its moving average; parts["reward"] is this shard's sum of r
    over captions / captions, for updating that average.
    """
    T = targets.size(1)
    mask = torch.arange(T, device=targets.device).unsqueeze(0) < (lengths - 1).unsqueeze(1)  # (B, T)
    words, captions = totals or (float(mask.sum()), float(targets.size(0)))
    nll = F.cross_entropy(logits[mask], targets[mask], label_smoothing=label_smoothing, reduction="none")  # (words,)
    xent = nll.sum() / words
    penalty = doubly_stochastic_penalty(alphas, mask) * targets.size(0) / captions
    loss = xent + alpha_c * penalty
    parts = {"xent": float(xent.detach()), "attention_penalty": float(penalty.detach())}
    if samples is not None:
        row = torch.arange(targets.size(0), device=targets.device).unsqueeze(1).expand_as(mask)[mask]  # (words,)
        per_caption = torch.zeros(targets.size(0), dtype=nll.dtype).index_add_(0, row, nll.detach())
        reward = -per_caption / (lengths - 1).clamp_min(1)  # (B,) mean log-likelihood per word
        advantage = torch.where(samples.sampled, reward - baseline, 0.0)
        reinforce = -(advantage * samples.log_prob).sum() / captions
        entropy = samples.entropy.sum() / captions
        loss = loss + reinforce_weight * reinforce - entropy_weight * entropy
        parts.update(reward=float(reward.sum()) / captions, entropy=float(entropy.detach()))
    return loss, parts
