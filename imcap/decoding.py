"""Greedy search, beam search and sampling over any decoder with the step contract of model.py (Decoder):

    memory = model.attend_memory(features); state = model.init_state(memory)
    log_probs, state, alpha = model.step(tokens, state, memory)

The searches run under inference mode; sample_captions (SCST's, scst.py) keeps the graph.

Beam search runs all images x beams as one batch of rows (B * K) and reorders rows with index_select;
there is no Python loop over images. The memory stays one row per image: the beams of an image share it.
Both searches drop the rows of images that are done from the batch (COMPACT_SHARE), so that a step costs
only the images still searching, whatever the others do; what an image gets does not depend on the other
images of the batch (up to the last bits of the model's matmuls, which round differently for different row
counts). Both searches always return a caption: when no
hypothesis has ended by max_length, the best unfinished one is returned.
"""

from __future__ import annotations

import torch

from typing import Any, Protocol

from .captions import DecodingOptions, Hypothesis
from .text import END, PAD, START, UNK


class Decoder(Protocol):
    """What the searches need of a decoder (model.ShowAttendTell, ensemble.Ensemble): per-image work once, then
    one step for a batch of rows. memory: row-indexed tensors, one row per image (the beams and samples of an
    image share its row: rows i * W .. i * W + W - 1 of the state read memory row i); state: row-indexed
    tensors, one row per hypothesis."""

    config: Any  # .vocab_size

    def attend_memory(self, features: torch.Tensor) -> tuple[torch.Tensor, ...]: ...  # (B, P, D) -> memory

    def init_state(self, memory: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]: ...  # (B, ...) each

    def step(self, tokens: torch.Tensor, state: tuple[torch.Tensor, ...], memory: tuple[torch.Tensor, ...]
             ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor]: ...  # (R, V) log p, state, (R, P) alpha


def length_normalize(log_prob: torch.Tensor, length: torch.Tensor | int, penalty: float) -> torch.Tensor:
    """GNMT length penalty (Wu et al. 2016): log p / ((5 + L) / 6) ** penalty."""
    if penalty == 0.0:
        return log_prob
    length = torch.as_tensor(length, dtype=log_prob.dtype, device=log_prob.device)
    return log_prob / ((5.0 + length) / 6.0) ** penalty


@torch.inference_mode()
def decode(model: Decoder, features: torch.Tensor, options: DecodingOptions = DecodingOptions()) -> list[list[Hypothesis]]:
    """Caption a batch of feature grids (B, P, D); returns n_best hypotheses per image, best first."""
    if options.beam_size == 1:
        return [[h] for h in greedy_search(model, features, options.max_length, options.allow_unk, options.no_repeat_ngram)]
    return beam_search(model, features, options)


@torch.inference_mode()
def greedy_search(model: Decoder, features: torch.Tensor, max_length: int = 30, allow_unk: bool = False,
                  no_repeat_ngram: int = 0) -> list[Hypothesis]:
    """Take the most probable word at each step (never <unk> unless allow_unk, nor a word that repeats an n-gram
    of the caption with no_repeat_ngram = n) until <end> or max_length words.

    Rows of images whose caption has ended are dropped from the batch (see COMPACT_SHARE), so that later
    steps cost only the images still writing.
    """
    B, L = features.size(0), max_length
    memory = image_memory = model.attend_memory(features)  # (A) rows, (B) rows
    buffers = None  # storage of the memory's rows after the first drop, reused by the later ones
    state = model.init_state(memory)
    device, dtype = features.device, _score_dtype(features)
    live = torch.arange(B, device=device)  # (A,) images still in the batch: row a of every per-step tensor is image live[a]
    tokens = torch.full((B,), START, dtype=torch.long, device=device)  # (A,)
    done = torch.zeros(B, dtype=torch.bool, device=device)  # (A,) caption ended (row not dropped yet)
    log_probs = features.new_zeros(B, dtype=dtype)  # (B,)
    lengths = torch.full((B,), L, device=device)  # (B,) unfinished captions keep max_length words
    out_tokens = torch.zeros(L + 1, B, dtype=torch.long, device=device)  # (T, B) word of each image at each step
    out_alphas = features.new_zeros(L + 1, B, features.size(1), dtype=dtype)  # (T, B, P)
    words = torch.zeros(B, 0, dtype=torch.long, device=device)  # (A, t) each row's words so far (no_repeat_ngram)
    for t in range(L + 1):  # max_length words, then one last chance for <end>
        lp, state, alpha = model.step(tokens, state, memory)  # (A, V), state, (A, P)
        lp, alpha = lp.to(dtype), alpha.to(dtype)  # bf16/fp16 under autocast: the sums are kept in fp32
        if not allow_unk:
            lp[:, UNK] = float("-inf")
        if no_repeat_ngram:
            block_repeats(lp, words, no_repeat_ngram)
        best_lp, tokens = lp.max(dim=1)  # (A,)
        ended = tokens == END
        take = ~done & (ended | (t < L))
        log_probs.index_add_(0, live, torch.where(take, best_lp, 0.0))
        lengths.index_copy_(0, live, torch.where(~done & ended, t + 1, lengths[live]))
        done |= ended
        out_tokens[t].index_copy_(0, live, tokens)
        out_alphas[t].index_copy_(0, live, alpha)
        if no_repeat_ngram:
            words = torch.cat([words, tokens.unsqueeze(1)], 1)
        n_done = int(done.sum())
        if n_done == done.numel():
            break
        if n_done >= COMPACT_SHARE * done.numel():  # drop the rows of ended captions
            keep = (~done).nonzero().squeeze(1)  # (A',)
            live, tokens, done, words = live[keep], tokens[keep], done[keep], words[keep]
            state = _rows(state, keep)
            memory, buffers = _image_rows(image_memory, live, buffers)
    seq = out_tokens[: t + 1].T.cpu().tolist()  # (B, T), one copy from the device, not one per image
    alphas = out_alphas[: t + 1].transpose(0, 1).cpu()  # (B, T, P)
    lengths, log_probs = lengths.tolist(), log_probs.tolist()
    return [Hypothesis(seq[b][: lengths[b]], log_probs[b], log_probs[b], alphas[b, : lengths[b]].clone()) for b in range(B)]


def block_repeats(lp: torch.Tensor, words: torch.Tensor, n: int) -> None:
    """Set lp[r, w] = -inf (in place) wherever word w after row r's words would repeat an n-gram they hold.
    lp: (R, V) next-word log probabilities; words: (R, t) each row's words so far (without <start>); n >= 2."""
    t = words.size(1)
    if t < n:  # no complete n-gram yet
        return
    prefix = words[:, t - n + 1:]  # (R, n-1) the last n-1 words
    windows = words[:, : t - 1].unfold(1, n - 1, 1)  # (R, t-n+1, n-1) the earlier (n-1)-grams that have a next word
    row, at = (windows == prefix.unsqueeze(1)).all(2).nonzero(as_tuple=True)  # (H,), (H,) each earlier match
    lp[row, words[row, at + n - 1]] = float("-inf")  # the word that followed it


# The rows of images that are done are dropped from the batch once they are at least this share of it.
# Dropping copies the kept images' memory (P x (D + A) floats each; beam search's beams share their image's)
# and their state. Measured on 500 images of imcap's default model (P = 49), 2026-12-02, A/B in one process:
# beam search k = 3 and 5 ran 5-10% faster at 0.1 (or 0.05) than at 0.25, and slower at 0.5; greedy search
# was the same at 0.25, 0.1 and 0.05 within the noise.
COMPACT_SHARE = 0.1


def _score_dtype(features: torch.Tensor) -> torch.dtype:
    """The dtype the searches sum log probabilities and keep attention in: float32 at least, whatever the
    features or (under autocast) the model's steps come in."""
    return torch.promote_types(features.dtype, torch.float32)


def _rows(tensors: tuple, index: torch.Tensor, out: list[torch.Tensor] | None = None) -> tuple:
    """index_select rows (dim 0) of every tensor of a state tuple or a Memory NamedTuple; with `out` (tensors
    with at least len(index) rows, not overlapping `tensors`), into their first rows: reusing the memory's
    hundreds of MB saves the page faults of fresh allocations, which cost twice the copy."""
    if out is None:
        rows = [x.index_select(0, index) for x in tensors]
    else:
        rows = [torch.index_select(x, 0, index, out=o[: index.numel()]) for x, o in zip(tensors, out)]
    return type(tensors)(*rows) if hasattr(tensors, "_fields") else tuple(rows)


def _buffers(tensors: tuple, rows: int) -> list[torch.Tensor]:
    """Uninitialised tensors shaped like `tensors` with `rows` rows, for _rows(..., out=)."""
    return [x.new_empty((rows, *x.shape[1:])) for x in tensors]


def _image_rows(image_memory: tuple, live: torch.Tensor, buffers: list[torch.Tensor] | None) -> tuple:
    """The memory rows of the images still searching, `live`, copied into `buffers` (made at the first drop, with
    as many rows as then kept, and reused by the later drops, which keep fewer). Returns (memory, buffers)."""
    if buffers is None:
        buffers = _buffers(image_memory, live.numel())
    return _rows(image_memory, live, out=buffers), buffers


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x: (B, K, ...), index: (B, J) -> (B, J, ...): per-image row selection."""
    return x[torch.arange(x.size(0), device=x.device).unsqueeze(1), index]


@torch.inference_mode()
def beam_search(model: Decoder, features: torch.Tensor, options: DecodingOptions = DecodingOptions()) -> list[list[Hypothesis]]:
    """Batched beam search over B images x K beams; returns options.n_best hypotheses per image.

    At each step the 2K best extensions of each image are ranked; an <end> ranked within the first K
    finishes a hypothesis (kept in a pool of the K best finished, by length-penalised score), the K best
    other extensions go on. An image is done once K hypotheses have finished; at max_length the beams
    still open join the pool as unfinished hypotheses, so every image gets a caption.

    The rows of done images are dropped from the batch (see COMPACT_SHARE). No sequence is copied while
    searching: each step records, per image and beam slot, the word chosen, the slot it extended (a
    back-pointer) and the attention; a pool entry is (score, log p, last step, slot extended there, last word),
    and the n-best are traced back through the back-pointers at the end.
    """
    B, K, L, P = features.size(0), options.beam_size, options.max_length, features.size(1)
    neg_inf = float("-inf")
    image_memory = model.attend_memory(features)  # rows (B)
    # all K beams start identical, so step 0 runs one row per image; later steps K: rows a * W .. a * W + W - 1
    # of the state and tokens are the beams of image live[a], W = 1 then K; the memory has one row per image
    memory = image_memory  # (A) rows: the model reads an image's memory for all W rows of its beams
    buffers = None  # storage of the memory's rows after the first drop, reused by the later ones
    state = model.init_state(memory)
    device, dtype = features.device, _score_dtype(features)
    live = torch.arange(B, device=device)  # (A,) images still in the batch
    tokens = torch.full((B,), START, dtype=torch.long, device=device)  # (A * W,)
    beam_lp = torch.full((B, K), neg_inf, dtype=dtype, device=device)  # (A, K) log p of each open beam
    beam_lp[:, 0] = 0.0  # one alive at the start
    n_finished = torch.zeros(B, dtype=torch.long, device=device)  # (A,)
    rank = torch.arange(2 * K, device=device).unsqueeze(0)  # (1, 2K)
    # history, by step and image (B, not A): the beam in slot j after step t ends with word hist_word[t, b, j]
    # and extends the beam in slot hist_parent[t, b, j] at step t, which attended with hist_alpha[t, b, that slot]
    hist_word = torch.zeros(L + 1, B, K, dtype=torch.long, device=device)
    hist_parent = torch.zeros(L + 1, B, K, dtype=torch.long, device=device)
    hist_alpha = features.new_zeros(L + 1, B, K, P, dtype=dtype)
    # finished hypotheses, best first: score, log p, last step, slot extended at the last step, last word
    pool = ([torch.full((B, K), neg_inf, dtype=dtype, device=device) for _ in range(2)]
            + [torch.zeros(B, K, dtype=torch.long, device=device) for _ in range(3)])
    final = [p.clone() for p in pool]  # (B, K) each: the pools of images dropped from the batch
    words = torch.zeros(B, 0, dtype=torch.long, device=device)  # (A * W, t) each row's words (no_repeat_ngram only)

    def add_to_pool(*candidates):  # (A, J) each, in the order of pool; -inf scores are not candidates
        nonlocal pool
        score, pos = torch.cat([pool[0], candidates[0]], 1).topk(K, dim=1)  # (A, K)
        pool = [score] + [_take(torch.cat([p, c], 1), pos) for p, c in zip(pool[1:], candidates[1:])]

    def retire(index):  # copy the pools of live images `index` (A',) to `final`
        for f, p in zip(final, pool):
            f.index_copy_(0, live[index], p[index])

    for t in range(L + 1):  # L words, then one last chance for <end>
        lp, state, alpha = model.step(tokens, state, memory)  # (A*W, V), state, (A*W, P)
        lp, alpha = lp.to(dtype), alpha.to(dtype)  # bf16/fp16 under autocast: the beams' sums are kept in fp32
        if not options.allow_unk:
            lp[:, UNK] = neg_inf
        if options.no_repeat_ngram:
            block_repeats(lp, words, options.no_repeat_ngram)
        A, V, W = beam_lp.size(0), lp.size(1), 1 if t == 0 else K
        hist_alpha[t].index_copy_(0, live, alpha.view(A, W, P).expand(A, K, P))
        total = beam_lp.unsqueeze(2) + lp.view(A, W, V)  # (A, K, V); at step 0 all but slot 0 are -inf
        top_lp, top_idx = total.view(A, K * V).topk(min(2 * K, K * V), dim=1)  # (A, 2K) best first
        top_beam, top_tok = top_idx // V, top_idx % V  # (A, 2K)

        is_end = top_tok == END
        done = n_finished >= K
        accept = is_end & (rank[:, : top_lp.size(1)] < K) & ~done.unsqueeze(1) & (top_lp > neg_inf)
        if bool(accept.any()):
            score = torch.where(accept, length_normalize(top_lp, t + 1, options.length_penalty), neg_inf)
            add_to_pool(score, top_lp, torch.full_like(top_beam, t), top_beam, top_tok)
            n_finished += accept.sum(1)
            done = n_finished >= K
        n_done = int(done.sum())
        if t == L or n_done == A:
            break

        cont_lp, cont_pos = torch.where(is_end, neg_inf, top_lp).topk(K, dim=1)  # (A, K) best open beams
        parent, word = _take(top_beam, cont_pos), _take(top_tok, cont_pos)  # (A, K)
        hist_parent[t].index_copy_(0, live, parent)
        hist_word[t].index_copy_(0, live, word)
        beam_lp = cont_lp
        rows = (torch.arange(A, device=device).unsqueeze(1) * W + (parent if W == K else 0)).expand(A, K)  # (A, K) parents' rows
        compact = n_done >= COMPACT_SHARE * A
        if compact:  # drop the rows of done images
            keep, gone = (~done).nonzero().squeeze(1), done.nonzero().squeeze(1)  # (A',), (A - A',)
            retire(gone)
            pool = [p[keep] for p in pool]
            live, beam_lp, n_finished, word, rows = live[keep], beam_lp[keep], n_finished[keep], word[keep], rows[keep]
            memory, buffers = _image_rows(image_memory, live, buffers)  # (A') rows
        state = _rows(state, rows.flatten())
        tokens = word.flatten()
        if options.no_repeat_ngram:
            words = torch.cat([words.index_select(0, rows.flatten()), tokens.unsqueeze(1)], 1)  # (A' * K, t + 1)

    open_ = ~done.unsqueeze(1) & (beam_lp > neg_inf)  # (A, K) beams that never ended (t == L)
    if bool(open_.any()):
        score = torch.where(open_, length_normalize(beam_lp, L, options.length_penalty), neg_inf)
        add_to_pool(score, beam_lp, torch.full_like(pool[2], L - 1), hist_parent[L - 1, live], hist_word[L - 1, live])
    retire(torch.arange(live.numel(), device=device))

    # trace the n-best back: slot is the beam slot at step u of each hypothesis
    N = options.n_best
    score, log_prob, last, slot, last_word = (f[:, :N] for f in final)  # (B, N) each
    T = int(last.max()) + 1 if B else 0
    seq = torch.zeros(B, N, T, dtype=torch.long, device=device)  # (B, N, T)
    alphas = features.new_zeros(B, N, T, P, dtype=dtype)  # (B, N, T, P)
    image = torch.arange(B, device=device).unsqueeze(1)  # (B, 1)
    for u in range(T - 1, -1, -1):  # positions past a hypothesis' last step get junk, cut below
        before = last > u  # (B, N) word u was chosen by a beam that went on
        seq[:, :, u] = torch.where(before, hist_word[u, image, slot], last_word)
        slot = torch.where(before, hist_parent[u, image, slot], slot)
        alphas[:, :, u] = hist_alpha[u, image, slot]

    seq, alphas = seq.cpu().tolist(), alphas.cpu()  # one copy from the device, not one per hypothesis
    results = []
    for b, (scores, lps, lasts) in enumerate(zip(score.tolist(), log_prob.tolist(), last.tolist())):
        hyps = []
        for j in range(N):
            if scores[j] == neg_inf:
                break
            n = lasts[j] + 1
            hyps.append(Hypothesis(seq[b][j][:n], lps[j], scores[j], alphas[b, j, :n].clone()))
        results.append(hyps)
    return results


def sample_captions(model: Decoder, features: torch.Tensor, samples: int, max_length: int,
                    temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw `samples` captions per image from the model at `temperature`, keeping the graph.

    features: (I, P, D). Returns tokens (I * samples, T) and their log probabilities (I * samples, T), rows
    grouped by image; positions after a caption's <end> hold PAD and log probability 0. A caption that
    reaches max_length words without <end> stops there. <pad> and <start> are never drawn: the policy is the
    model's distribution renormalised over the other tokens, sharpened by the temperature (p^(1/T), renormalised;
    1: the model's own); the log probabilities are the policy's, the sampled distribution. Runs on the
    features' device; log probabilities are float32 under autocast too.
    """
    memory = model.attend_memory(features)  # rows (I): an image's samples share its memory (model.step)
    state = tuple(s.repeat_interleave(samples, dim=0) for s in model.init_state(memory))  # rows (R = I * samples)
    R = state[0].size(0)
    device = features.device
    tokens = torch.full((R,), START, dtype=torch.long, device=device)  # (R,)
    alive = torch.ones(R, dtype=torch.bool, device=device)  # (R,)
    banned = torch.tensor([PAD, START], device=device)  # never words: sampling them would make captions with holes
    out_tokens, out_lp = [], []
    for _ in range(max_length + 1):  # max_length words, then one last chance for <end>
        lp, state, _alpha = model.step(tokens, state, memory)  # (R, V)
        lp = lp.float().index_fill(1, banned, float("-inf"))  # fp32 under autocast too (the REINFORCE term's)
        lp = lp / temperature if temperature != 1.0 else lp
        lp = lp - lp.logsumexp(1, keepdim=True)  # the policy: the model's distribution over real words
        tokens = torch.multinomial(lp.detach().exp(), 1).squeeze(1)  # (R,)
        tokens = torch.where(alive, tokens, PAD)
        out_tokens.append(tokens)
        out_lp.append(torch.where(alive, lp.gather(1, tokens.unsqueeze(1)).squeeze(1), 0.0))
        alive = alive & (tokens != END)
        if not bool(alive.any()):
            break
    return torch.stack(out_tokens, 1), torch.stack(out_lp, 1)
