"""Several trained decoders searching as one: the average of their word distributions at each step.

    model = Ensemble([captioner_a.model, captioner_b.model])
    hyps = decode(model, features, options)     # decoding.py's greedy and beam search, unchanged

The ensemble has the step contract of model.py (attend_memory / init_state / step), so the searches need no
change. Its memory is one flat tuple of row-indexed tensors (the annotations and their mean, which all members
share, then each member's projection of them), its state the members' states concatenated; the searches
reorder and compact both like a single model's. At each step the members' probabilities are
averaged, log(mean_i p_i(w)), and so are their attention maps. The members must share the vocabulary and
read the same annotation grid (the same encoder, image size and weights): check_members says so in one line.

Everything about ensembles is here: the model, which runs a RUN_DIR's ensemble.json lists (an ensemble
preset writes it: write_members, read_members), whether runs can decode as one (check_members) and their name
in file names and the server's model info (member_names).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path, PurePath

import torch
from torch import nn

from . import checkpoint as ckpt
from .fileio import write_json_atomic
from .model import Memory, ShowAttendTell

ENSEMBLE_FILE = ckpt.ENSEMBLE_FILE  # RUN_DIR/ensemble.json: {"members": ["m1", "m2", ...]}, subfolders of RUN_DIR


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


def write_members(run_dir: str | os.PathLike, members: Sequence[str]) -> None:
    """Make RUN_DIR an ensemble of its subfolders `members` (trained runs): RUN_DIR/ensemble.json."""
    write_json_atomic(Path(run_dir) / ENSEMBLE_FILE, {"members": list(members)})


def read_members(run_dir: str | os.PathLike) -> list[Path] | None:
    """The member run directories listed by RUN_DIR/ensemble.json, or None when RUN_DIR is not an ensemble."""
    file = Path(run_dir) / ENSEMBLE_FILE
    if not file.is_file():
        return None
    try:
        members = json.loads(file.read_text())["members"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise ckpt.CheckpointError(f"{file}: unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if not isinstance(members, list) or len(members) < 2 or not all(isinstance(m, str) and m for m in members):
        raise ckpt.CheckpointError(f"{file}: 'members' must list at least 2 run directories")
    for m in members:  # subfolders, as a preset writes them (--ensemble takes runs anywhere), never ensembles
        if PurePath(m).is_absolute() or not PurePath(m).parts or ".." in PurePath(m).parts:
            raise ckpt.CheckpointError(f"{file}: 'members' must be subfolders of {run_dir}, got {ckpt.shown(m)}")
        if (Path(run_dir) / m / ENSEMBLE_FILE).is_file():
            raise ckpt.CheckpointError(f"{file}: member {m!r} is an ensemble itself; list its member runs instead")
    return [Path(run_dir) / m for m in members]


def check_members(captioners: Sequence) -> None:
    """CheckpointError in one line unless these loaded runs (api.Captioner) can decode as one: single models,
    the same vocabulary, the same features (encoder, image size, weights), no fine-tuned encoder."""
    first = captioners[0]
    for c in captioners:
        if isinstance(c.model, Ensemble):
            raise ckpt.CheckpointError(f"{c.meta['path']}: is an ensemble already; list its member runs instead")
    for c in captioners[1:]:
        where = f"{c.meta['path']} and {first.meta['path']}"
        if c.vocab != first.vocab:
            raise ckpt.CheckpointError(f"{where}: cannot ensemble runs with different vocabularies")
        if c.encoder_spec != first.encoder_spec:
            raise ckpt.CheckpointError(f"{where}: cannot ensemble runs on different features "
                                       f"({c.encoder_spec.name}-{c.encoder_spec.image_size} vs "
                                       f"{first.encoder_spec.name}-{first.encoder_spec.image_size})")
    if any(c.encoder_weights is not None for c in captioners):
        raise ckpt.CheckpointError(f"{', '.join(c.meta['path'] for c in captioners)}: cannot ensemble runs with "
                                   "fine-tuned encoders")


def member_names(checkpoints: Sequence[str | os.PathLike], here: str | os.PathLike | None = None) -> list[str]:
    """Short names of the members' checkpoint directories: runs/f8k/best -> f8k (its run), another checkpoint
    directory its own name; one inside `here` (a RUN_DIR) by its own name (best, checkpoint)."""
    names = []
    for p in map(Path, checkpoints):
        inside_run = p.name in ("best", "checkpoint", "best.old", "checkpoint.old")
        if here is not None and p.parent.resolve() == Path(here).resolve():
            names.append(p.name)
        else:
            names.append(p.parent.name if inside_run else p.name)
    return names
