"""Greedy and beam search over any decoder with the step contract of model.py.

    memory = model.attend_memory(features); state = model.init_state(memory)
    log_probs, state, alpha = model.step(tokens, state, memory)

Beam search runs all images x beams as one batch of rows (B * K) and reorders rows with index_select;
there is no Python loop over images. Both searches always return a caption: when no hypothesis has
ended by max_length, the best unfinished one is returned.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .text import END, START


@dataclass(frozen=True)
class DecodingOptions:
    beam_size: int = 3  # 1 = greedy
    max_length: int = 30  # words per caption, <end> not counted
    length_penalty: float = 0.0  # score = log p / ((5 + L) / 6) ** length_penalty (0: plain log p)
    n_best: int = 1  # hypotheses returned per image (<= beam_size)

    def __post_init__(self):
        if self.beam_size < 1:
            raise ValueError(f"beam size must be >= 1, got {self.beam_size}")
        if self.max_length < 1:
            raise ValueError(f"max length must be >= 1, got {self.max_length}")
        if not 1 <= self.n_best <= self.beam_size:
            raise ValueError(f"n-best must be between 1 and the beam size ({self.beam_size}), got {self.n_best}")


@dataclass
class Hypothesis:
    tokens: list[int]  # word ids, without <start>; ends with <end> when the caption finished
    log_prob: float  # sum of log probabilities of the tokens
    score: float  # log_prob after the length penalty; what hypotheses are ranked by
    alphas: torch.Tensor  # (len(tokens), P) attention for each emitted token

    @property
    def finished(self) -> bool:
        return bool(self.tokens) and self.tokens[-1] == END


def length_normalize(log_prob: torch.Tensor, length: torch.Tensor | int, penalty: float) -> torch.Tensor:
    """GNMT length penalty (Wu et al. 2016): log p / ((5 + L) / 6) ** penalty."""
    if penalty == 0.0:
        return log_prob
    length = torch.as_tensor(length, dtype=log_prob.dtype)
    return log_prob / ((5.0 + length) / 6.0) ** penalty


@torch.inference_mode()
def decode(model, features: torch.Tensor, options: DecodingOptions = DecodingOptions()) -> list[list[Hypothesis]]:
    """Caption a batch of feature grids (B, P, D); returns n_best hypotheses per image, best first."""
    if options.beam_size == 1:
        return [[h] for h in greedy_search(model, features, options.max_length)]
    return beam_search(model, features, options)


@torch.inference_mode()
def greedy_search(model, features: torch.Tensor, max_length: int = 30) -> list[Hypothesis]:
    """Take the most probable word at each step until <end> or max_length words."""
    B = features.size(0)
    memory = model.attend_memory(features)
    state = model.init_state(memory)
    tokens = torch.full((B,), START, dtype=torch.long)
    done = torch.zeros(B, dtype=torch.bool)
    log_probs = torch.zeros(B)
    lengths = torch.full((B,), max_length)  # unfinished captions keep max_length words
    out_tokens, out_alphas = [], []
    for t in range(max_length + 1):  # max_length words, then one last chance for <end>
        lp, state, alpha = model.step(tokens, state, memory)  # (B, V), state, (B, P)
        best_lp, tokens = lp.max(dim=1)  # (B,)
        ended = tokens == END
        take = ~done & (ended | (t < max_length))
        log_probs += torch.where(take, best_lp, 0.0)
        lengths = torch.where(~done & ended, t + 1, lengths)
        done |= ended
        out_tokens.append(tokens)
        out_alphas.append(alpha)
        if bool(done.all()):
            break
    seq = torch.stack(out_tokens, 1)  # (B, T)
    alphas = torch.stack(out_alphas, 1)  # (B, T, P)
    return [
        Hypothesis(seq[b, : lengths[b]].tolist(), float(log_probs[b]), float(log_probs[b]), alphas[b, : lengths[b]].clone())
        for b in range(B)
    ]


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x: (B, K, ...), index: (B, J) -> (B, J, ...): per-image row selection."""
    return x[torch.arange(x.size(0)).unsqueeze(1), index]


def _pad_time(x: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad dim 2 (time) of (B, J, T, ...) to `length`."""
    pad = length - x.size(2)
    if pad == 0:
        return x
    return torch.cat([x, x.new_zeros(*x.shape[:2], pad, *x.shape[3:])], dim=2)


@torch.inference_mode()
def beam_search(model, features: torch.Tensor, options: DecodingOptions = DecodingOptions()) -> list[list[Hypothesis]]:
    """Batched beam search over B images x K beams; returns options.n_best hypotheses per image.

    At each step the 2K best extensions of each image are ranked; an <end> ranked within the first K
    finishes a hypothesis (kept in a pool of the K best finished, by length-penalised score), the K best
    other extensions go on. An image is done once K hypotheses have finished; at max_length the beams
    still open join the pool as unfinished hypotheses, so every image gets a caption.
    """
    B, K, L = features.size(0), options.beam_size, options.max_length
    memory = model.attend_memory(features)
    memory = type(memory)(*(m.repeat_interleave(K, dim=0) for m in memory))  # rows (B * K)
    state = model.init_state(memory)
    tokens = torch.full((B * K,), START, dtype=torch.long)
    beam_lp = torch.full((B, K), float("-inf"))
    beam_lp[:, 0] = 0.0  # all beams start identical: keep one alive
    seqs = torch.zeros(B, K, 0, dtype=torch.long)  # (B, K, t)
    seq_alphas = features.new_zeros(B, K, 0, features.size(1))  # (B, K, t, P)

    neg_inf = float("-inf")
    pool_score = torch.full((B, K), neg_inf)  # finished hypotheses, best first
    pool_lp = torch.full((B, K), neg_inf)
    pool_len = torch.zeros(B, K, dtype=torch.long)
    pool_seq = torch.zeros(B, K, L + 1, dtype=torch.long)
    pool_alpha = features.new_zeros(B, K, L + 1, features.size(1))
    n_finished = torch.zeros(B, dtype=torch.long)
    rank = torch.arange(2 * K).unsqueeze(0)  # (1, 2K)

    def add_to_pool(score, lp, seq, alpha, length):
        nonlocal pool_score, pool_lp, pool_len, pool_seq, pool_alpha
        all_score = torch.cat([pool_score, score], 1)  # (B, K + J)
        pool_score, pos = all_score.topk(K, dim=1)  # (B, K)
        pool_lp = _take(torch.cat([pool_lp, lp], 1), pos)
        pool_len = _take(torch.cat([pool_len, length], 1), pos)
        pool_seq = _take(torch.cat([pool_seq, _pad_time(seq, L + 1)], 1), pos)
        pool_alpha = _take(torch.cat([pool_alpha, _pad_time(alpha, L + 1)], 1), pos)

    for t in range(L + 1):  # L words, then one last chance for <end>
        lp, state, alpha = model.step(tokens, state, memory)  # (B*K, V), state, (B*K, P)
        V = lp.size(1)
        total = beam_lp.unsqueeze(2) + lp.view(B, K, V)  # (B, K, V)
        top_lp, top_idx = total.view(B, K * V).topk(min(2 * K, K * V), dim=1)  # (B, 2K) best first
        top_beam, top_tok = top_idx // V, top_idx % V  # (B, 2K)
        cand_seq = torch.cat([_take(seqs, top_beam), top_tok.unsqueeze(2)], 2)  # (B, 2K, t+1)
        cand_alpha = torch.cat([_take(seq_alphas, top_beam), _take(alpha.view(B, K, -1), top_beam).unsqueeze(2)], 2)

        is_end = top_tok == END
        done = n_finished >= K
        accept = is_end & (rank[:, : top_lp.size(1)] < K) & ~done.unsqueeze(1) & (top_lp > neg_inf)
        if bool(accept.any()):
            score = torch.where(accept, length_normalize(top_lp, t + 1, options.length_penalty), neg_inf)
            add_to_pool(score, top_lp, cand_seq, cand_alpha, torch.full_like(top_beam, t + 1))
            n_finished += accept.sum(1)
            done = n_finished >= K
        if t == L or bool(done.all()):
            break

        cont_lp, cont_pos = torch.where(is_end, neg_inf, top_lp).topk(K, dim=1)  # (B, K) best open beams
        beam_lp = cont_lp
        seqs, seq_alphas = _take(cand_seq, cont_pos), _take(cand_alpha, cont_pos)
        rows = (torch.arange(B).unsqueeze(1) * K + _take(top_beam, cont_pos)).flatten()  # (B*K,)
        state = tuple(s.index_select(0, rows) for s in state)
        tokens = _take(top_tok, cont_pos).flatten()

    open_ = ~done.unsqueeze(1) & (beam_lp > neg_inf)  # (B, K) beams that never ended
    if bool(open_.any()):
        length = torch.full_like(pool_len[:, :K], seqs.size(2))
        score = torch.where(open_, length_normalize(beam_lp, seqs.size(2), options.length_penalty), neg_inf)
        add_to_pool(score, beam_lp, seqs, seq_alphas, length)

    results = []
    for b in range(B):
        hyps = []
        for j in range(options.n_best):
            if pool_score[b, j] == neg_inf:
                break
            n = int(pool_len[b, j])
            hyps.append(Hypothesis(pool_seq[b, j, :n].tolist(), float(pool_lp[b, j]), float(pool_score[b, j]), pool_alpha[b, j, :n].clone()))
        results.append(hyps)
    return results
