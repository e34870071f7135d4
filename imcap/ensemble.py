"""Several trained decoders searching as one: the average of their word distributions at each step.

    model = Ensemble([captioner_a.model, captioner_b.model])
    hyps = decode(model, features, options)     # decoding.py's greedy and beam search, unchanged

The ensemble has the step contract of model.py (attend_memory / init_state / step), so the searches need no
change. Its memory is one flat tuple of row-indexed tensors (the annotations and their mean, which all members
share, then each member's projection of them), its state the members' states concatenated; the searches
reorder and compact both like a single model's. At each step the members' probabilities are
averaged, log(mean_i p_i(w)), and so are their attention maps. The members must share the vocabulary and
read the same annotation grid (the same encoder, image size and weights); Captioner.load_ensemble checks it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .model import Memory, ShowAttendTell


class Ensemble(nn.Module):
    def __init__(self, members: Sequence[ShowAttendTell]):
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 models, got {len(members)}")
        sizes = {m.config.vocab_size for m in members}
        if len(sizes) != 1:
            raise ValueError(f"ensemble members have different vocabulary sizes: {sorted(sizes)}")
        self.members = nn.ModuleList(members)
        self.config = members[0].config  # vocab_size and feature_dim, for code that asks the model
        self._log_n = math.log(len(members))
        self._state_sizes = [2 if m.config.rnn == "lstm" else 1 for m in members]  # tensors per state: (h, c) or (h,)

    def attend_memory(self, features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """features: (B, P, D) -> (features, mean (B, D), member 1's projection (B, P, A1), member 2's, ...)."""
        return (features, features.mean(dim=1), *(m.attention.project(features) for m in self.members))

    def init_state(self, memory: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return tuple(x for m, mem in zip(self.members, self._memories(memory)) for x in m.init_state(mem))

    def step(
        self, tokens: torch.Tensor, state: tuple[torch.Tensor, ...], memory: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor]:
        """tokens: (B,) -> log of the members' mean probabilities (B, V), new flat state, mean alpha (B, P)."""
        log_probs, states, alphas = [], [], []
        i = 0
        for m, mem, n in zip(self.members, self._memories(memory), self._state_sizes):
            lp, s, alpha = m.step(tokens, state[i : i + n], mem)  # (B, V), n x (B, h), (B, P)
            i += n
            log_probs.append(lp)
            states.extend(s)
            alphas.append(alpha)
        mean_lp = torch.logsumexp(torch.stack(log_probs), dim=0) - self._log_n  # (B, V)
        return mean_lp, tuple(states), torch.stack(alphas).mean(dim=0)

    def _memories(self, memory: tuple[torch.Tensor, ...]) -> list[Memory]:
        features, mean = memory[0], memory[1]
        return [Memory(features, projected, mean) for projected in memory[2:]]
