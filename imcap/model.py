"""The Show, Attend and Tell decoder (Xu et al. 2015, section 3), in one file.

Notation (the paper's):
    features  a        (B, P, D)  annotation vectors, one per grid location (P = H * W)
    alpha              (B, P)     attention weights over locations at one step, sum to 1
    beta               (B, 1)     gating scalar, beta = sigmoid(f_beta(h_{t-1}))
    context   z_hat    (B, D)     beta * sum_i alpha_i a_i
    h, c               (B, n)     recurrent state;  E y_{t-1} (B, m): embedding of the previous word
Equations:
    h0 = tanh(f_init_h(mean_i a_i)),  c0 = tanh(f_init_c(mean_i a_i))
    e_ti = w^T tanh(W_a a_i + b + W_h h_{t-1}),  alpha_t = softmax(e_t)        (W_a a + b once per image)
    (h_t, c_t) = LSTM([E y_{t-1}; z_hat_t], (h_{t-1}, c_{t-1}))
    p(y_t) = softmax(L_o(dropout(tanh(E y_{t-1} + L_h h_t + L_z z_hat_t))))      (deep output, eq. 7)
The deep output's tanh follows the authors' code (arctic-captions). rnn="gru": a GRU, whose state is just h.

Hard attention (section 4.1, attention="hard"): in training, a caption either samples a location s_t ~ alpha_t
per step and reads z_t = a_{s_t}, or (probability 1 - hard_sample_prob) reads the expected context; forward(...,
return_samples=True) returns what caption_loss needs for REINFORCE. Inference reads the expected context.

Search (decoding.py) calls attend_memory(features) -> memory (per-image work, once), init_state(memory) -> state
and step(tokens, state, memory) -> (log_probs, state, alpha), and reorders the rows of state and memory itself;
the memory may have one row per image and the state W consecutive rows (beams) per image.
On the CPU the attention energies and teacher forcing's steps run through fastpath.py (the same values and
gradients, faster there). Every tensor is made on the device of the inputs or parameters.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .checks import require_choice, require_int, require_number

from . import fastpath
from .compat import upgrade_state_dict


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

    MAX_DIM = 16384  # bound of feature_dim, embed_dim, hidden_dim, attention_dim (not a field)
    MAX_VOCAB = 1 << 20  # bound of vocab_size

    def validate(self, where: str = "") -> "ModelConfig":
        """Self, or ValueError naming the first field out of range (prefixed by `where`, e.g. "model_config.")."""
        require_int(where + "vocab_size", self.vocab_size, 1, self.MAX_VOCAB)
        for name in ("feature_dim", "embed_dim", "hidden_dim", "attention_dim"):
            require_int(where + name, getattr(self, name), 1, self.MAX_DIM)
        require_choice(where + "rnn", self.rnn, ("lstm", "gru"))
        require_choice(where + "attention", self.attention, ("soft", "hard"))
        require_number(where + "dropout", self.dropout, 0, 1, open_high=True)
        require_number(where + "hard_sample_prob", self.hard_sample_prob, 0, 1)
        for name in ("gate", "deep_output"):
            require_choice(where + name, getattr(self, name), (True, False))
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


class Memory(NamedTuple):
    """What the decoder attends over; every tensor is indexed by batch row (reordered by search)."""
    features: torch.Tensor  # (B, P, D) annotation vectors a
    projected: torch.Tensor  # (B, P, A) W_a a + b (SoftAttention.project), computed once per image
    mean: torch.Tensor  # (B, D) mean annotation, for the initial state


class HardSamples(NamedTuple):
    """What hard attention sampled in one teacher-forced pass, per caption (rows in the input order)."""
    log_prob: torch.Tensor  # (B,) sum_t log alpha_t[s_t] over the caption's steps (0 for unsampled captions)
    entropy: torch.Tensor  # (B,) sum_t H(alpha_t) over the caption's steps
    sampled: torch.Tensor  # (B,) bool: this caption sampled locations (else it used the expected context)


class SoftAttention(nn.Module):
    """e = w^T tanh(W_a a + b + W_h h); alpha = softmax(e); context = sum_i alpha_i a_i. (w needs no bias.)"""

    def __init__(self, feature_dim: int, hidden_dim: int, attention_dim: int):
        super().__init__()
        self.feature_proj = nn.Linear(feature_dim, attention_dim)  # W_a (with the bias b)
        self.hidden_proj = nn.Linear(hidden_dim, attention_dim, bias=False)  # W_h
        self.score = nn.Linear(attention_dim, 1, bias=False)  # w

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """(B, P, D) -> (B, P, A) W_a a + b, once per image."""
        return self.feature_proj(features)

    def forward(self, memory: Memory, h: torch.Tensor, hidden_proj: Callable | None = None) -> tuple[torch.Tensor, ...]:
        """memory: M images; h: (M * W, n), W consecutive rows per image -> context (M * W, D), alpha (M * W, P).
        hidden_proj: what computes W_h h (default self.hidden_proj; the fast teacher forcing passes its own)."""
        M, P, _ = memory.projected.shape
        W = h.size(0) // M
        if M * W != h.size(0):
            raise ValueError(f"{h.size(0)} state rows do not split into the memory's {M} images")
        hidden = (hidden_proj or self.hidden_proj)(h).view(M, W, 1, -1)  # (M, W, 1, A)
        if fastpath.enabled(self.score.weight):  # the same alpha, through a sigmoid (fastpath.energies)
            e = fastpath.energies(memory.projected, hidden, self.score.weight)  # (M, W, P)
        else:
            e = self.score(torch.tanh(memory.projected.unsqueeze(1) + hidden)).squeeze(3)  # (M, W, P)
        alpha = F.softmax(e.float(), dim=2)  # (M, W, P) in fp32 under autocast too (CPU autocast keeps bf16)
        context = torch.bmm(alpha, memory.features)  # (M, W, D): each image's features read once for its W rows
        return context.view(M * W, -1), alpha.view(M * W, P)


DECODER = "show-attend-tell"  # the name checkpoints give this decoder (checkpoint.json "decoder")


class ShowAttendTell(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = c = config.validate()
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
        """Also accepts the weights of earlier layouts (compat.py), converted to give the same results."""
        state_dict = upgrade_state_dict(state_dict, self.config.embed_dim, self.config.rnn)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # --- the search contract -------------------------------------------------------------------
    def attend_memory(self, features: torch.Tensor) -> Memory:
        """Per-image work done once before decoding. features: (B, P, D)."""
        return Memory(features, self.attention.project(features), features.mean(dim=1))

    def init_state(self, memory: Memory) -> tuple[torch.Tensor, ...]:
        h = torch.tanh(self.init_h(memory.mean))  # (B, n)
        return (h,) if self.init_c is None else (h, torch.tanh(self.init_c(memory.mean)))  # (B, n) each

    def step(self, tokens: torch.Tensor, state: tuple[torch.Tensor, ...],
             memory: Memory) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor]:
        """tokens: (B,) previous words -> log_probs (B, V), new state, alpha (B, P). memory: B or M images; with
        M, B = M * W and rows w * W .. w * W + W - 1 of tokens and state attend over image w."""
        emb = self.embedding(tokens)  # (B, m)
        state, context, alpha, _ = self._advance(self.gates_e(emb), state, memory)
        logits = self._output(emb, state[0], context)  # (B, V)
        return F.log_softmax(logits.float(), dim=-1), state, alpha  # fp32 under autocast too (CPU's keeps bf16)

    # --- teacher-forced training ---------------------------------------------------------------
    def forward(self, features: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor,
                image_index: torch.Tensor | None = None, return_samples: bool = False) -> tuple[torch.Tensor, ...]:
        """Teacher forcing. features: (I, P, D); captions: (B, L) = <start> w_1 .. w_k <end> <pad>..; lengths: (B,)
        = k + 2; image_index: (B,) the feature row of each caption (default b), so an image is projected once.
        Returns logits (B, L-1, V) predicting captions[:, 1:] and alphas (B, L-1, P), zero at or past a caption's
        end, and with return_samples HardSamples (hard attention in training samples; else log_prob is 0).
        Rows run longest first, so finished captions cost nothing at later steps."""
        B, L = captions.shape
        device = captions.device
        image_index = torch.arange(B, device=device) if image_index is None else image_index  # (B,)
        steps = lengths - 1  # (B,) predictions per caption
        order = torch.argsort(steps, descending=True, stable=True)  # (B,) longest first
        captions, steps = captions[order], steps[order]
        memory = Memory(*(m.index_select(0, image_index[order]) for m in self.attend_memory(features)))  # rows (B)
        state = self.init_state(memory)
        # Packed, time-major: step t works on the n_t rows still writing (a prefix); only those S positions pay.
        writing = steps.unsqueeze(0) > torch.arange(L - 1, device=device).unsqueeze(1)  # (L-1, B)
        col, row = writing.nonzero(as_tuple=True)  # (S,), (S,): the step t and sorted row of each packed position
        counts = [n for n in writing.sum(1).tolist() if n]  # n_t of each step
        emb = self.embedding(captions[row, col])  # (S, m): E y_{t-1}
        gates_e = self.gates_e(emb).split(counts)  # per step (n_t, G): the words' share of the gates, batched
        hard = self.config.attention == "hard" and self.training
        sampled = (torch.rand(B, device=device) < self.config.hard_sample_prob if hard
                   else torch.zeros(B, dtype=torch.bool, device=device))  # (B,)
        log_prob_s = entropy = features.new_zeros(B)  # (B,) each
        fast = fastpath.TeacherForcing(self, memory) if fastpath.enabled(self.out.weight) else None
        linears = fast.linears if fast else None  # the step linears (default: the model's own)
        outs = []  # per step: h (n, n_hidden), context (n, D), alpha (n, P)
        for t, n in enumerate(counts):
            state = tuple(s[:n] for s in state)  # (n, n_hidden) each
            rows = fast.rows(n) if fast else Memory(*(m[:n] for m in memory))  # (n, ...) each
            sample = sampled[:n] if hard else None
            state, context, alpha, lp_s = self._advance(gates_e[t], state, rows, sample, linears)
            outs.append((state[0], context, alpha))
            if return_samples:
                entropy = entropy + F.pad(-(alpha * alpha.clamp_min(1e-12).log()).sum(1), (0, B - n))  # (B,)
                if lp_s is not None:
                    log_prob_s = log_prob_s + F.pad(lp_s, (0, B - n))  # (B,)
        hs, contexts, alphas = (torch.cat(x) for x in zip(*outs))  # (S, n_hidden), (S, D), (S, P)
        logits = self._output(emb, hs, contexts)  # (S, V), batched over time
        at = (order[row], col)  # each packed position in (B, L-1), in the caller's row order
        logits = logits.new_zeros(B, L - 1, logits.size(1)).index_put_(at, logits)  # (B, L-1, V)
        alphas = alphas.new_zeros(B, L - 1, features.size(1)).index_put_(at, alphas)  # (B, L-1, P), fp32
        if return_samples:
            inverse = torch.argsort(order)  # (B,)
            return logits, alphas, HardSamples(log_prob_s[inverse], entropy[inverse], sampled[inverse])
        return logits, alphas

    def _advance(self, gates_e: torch.Tensor, state: tuple[torch.Tensor, ...], memory: Memory,
                 sample: torch.Tensor | None = None, linears: tuple[Callable, ...] | None = None) -> tuple:
        """Attend with h_{t-1}, gate, and run the recurrent cell: one step without the output layer.

        gates_e: (B, G) = W_e E y_{t-1} + b (batched over time in training). sample: (B,) bool, hard attention
        (teacher forcing): these rows read a sampled location a_s; then the 4th result is (B,) log alpha_s (0 for
        the others), else None. linears: what computes W_h h (attention), W_z z and W_h h (default: own layers).
        LSTM (gate order i, f, g, o as nn.LSTMCell):  c = sig(f) c + sig(i) tanh(g);  h = sig(o) tanh(c).
        GRU (as nn.GRUCell):  r, u = sig(x_r + h_r), sig(x_u + h_u);  n = tanh(x_n + r h_n);  h = (1-u) n + u h.
        """
        h = state[0]
        hidden_proj, gates_z, gates_h = linears or (self.attention.hidden_proj, self.gates_z, self.gates_h)
        context, alpha = self.attention(memory, h, hidden_proj)  # (B, D), (B, P)
        log_prob_s = None
        if sample is not None:
            s = torch.multinomial(alpha.detach(), 1).squeeze(1)  # (B,) a location per row
            a_s = memory.features[torch.arange(h.size(0), device=s.device), s]  # (B, D)
            context = torch.where(sample.unsqueeze(1), a_s, context)  # (B, D)
            log_prob_s = torch.where(sample, alpha.gather(1, s.unsqueeze(1)).squeeze(1).clamp_min(1e-12).log(), 0.0)
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
        x = torch.tanh(emb + self.out_h(h) + self.out_z(context)) if self.config.deep_output else h  # (.., m)
        return self.out(self.dropout(x))  # (.., V)


def doubly_stochastic_penalty(alphas: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum_i (1 - sum_t alpha_ti)^2 averaged over the batch (paper eq. 14). alphas: (B, T, P); mask: (B, T) words."""
    coverage = (alphas * mask.unsqueeze(2)).sum(dim=1)  # (B, P)
    return ((1.0 - coverage) ** 2).sum(dim=1).mean()


def caption_loss(
    logits: torch.Tensor, targets: torch.Tensor, alphas: torch.Tensor, lengths: torch.Tensor, *, alpha_c: float = 1.0,
    label_smoothing: float = 0.0, totals: tuple[float, float] | None = None, samples: HardSamples | None = None,
    baseline: float = 0.0, reinforce_weight: float = 1.0, entropy_weight: float = 0.01,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy over real words (padding masked) + alpha_c * doubly stochastic penalty.

    logits: (B, T, V) with T = L-1; targets: (B, T) = captions[:, 1:]; lengths: (B,) caption lengths L_b.
    totals: (words, captions) of the whole batch when this is one shard of it (distributed training), so the
    shards' losses add up to the batch's. samples (hard attention, paper eq. 12): adds, per sampling caption,
        - reinforce_weight * (r - baseline) * log p(s)  -  entropy_weight * H(alpha)
    with the reward r = the caption's mean log p(y_t | s) (per word, so caption length adds no variance) and
    `baseline` its moving average; parts["reward"] is this shard's sum of r / captions, for that average.
    """
    mask = torch.arange(targets.size(1), device=targets.device).unsqueeze(0) < (lengths - 1).unsqueeze(1)  # (B, T)
    words, captions = totals or (float(mask.sum()), float(targets.size(0)))
    nll = F.cross_entropy(logits[mask], targets[mask], label_smoothing=label_smoothing, reduction="none")  # (words,)
    xent = nll.sum() / words
    penalty = doubly_stochastic_penalty(alphas, mask) * targets.size(0) / captions
    loss = xent + alpha_c * penalty
    parts = {"xent": float(xent.detach()), "attention_penalty": float(penalty.detach())}
    if samples is not None:
        row = torch.arange(targets.size(0), device=targets.device).unsqueeze(1).expand_as(mask)[mask]  # (words,)
        per_caption = nll.new_zeros(targets.size(0)).index_add_(0, row, nll.detach())  # (B,)
        reward = -per_caption / (lengths - 1).clamp_min(1)  # (B,) mean log-likelihood per word
        advantage = torch.where(samples.sampled, reward - baseline, 0.0)
        reinforce = -(advantage * samples.log_prob).sum() / captions
        entropy = samples.entropy.sum() / captions
        loss = loss + reinforce_weight * reinforce - entropy_weight * entropy
        parts.update(reward=float(reward.sum()) / captions, entropy=float(entropy.detach()))
    return loss, parts
