"""What a training step optimises: one unit per objective, behind the interface the training loop calls.

The loop (train.Trainer) owns the model, optimizer, schedule, checkpoints and validation, and asks its
objective for the rest:

    len(objective)                 units of an epoch (captions for cross-entropy, images for SCST)
    objective.epoch_order(gen)     the epoch's units in order, from a seeded generator (exact resume)
    objective.prepare(part)        the host side of a micro-batch: CPU tensors, no RNG (a feeding thread may run it)
    objective.backward(idx, micro) the loss of one micro-batch and its backward -> (loss, named parts)
    objective.after_backward()     once all micro-batches of a step are in, before clipping
    objective.after_step(parts)    after the optimizer step, with the step's parts summed over processes

Each unit reads its own settings, a frozen record (CrossEntropySettings, SelfCriticalSettings) made from the
TrainConfig fields it names: TrainConfig stays one flat record because checkpoints and command-line flags
name its fields, and `owned_fields` says which of them belong to which objective (the CLI refuses a flag of
another objective than the one trained). A new objective is a class with these methods, its settings record,
and an entry in OBJECTIVES (its name is TrainConfig.objective).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Protocol

import torch

from .datasets import split_rows
from .devices import autocast
from .model import caption_loss
from .scst import reward_references, scst_loss
from .text import END, START, Vocabulary

if TYPE_CHECKING:
    from .features import FeatureStore
    from .train import Trainer
    from .train_config import TrainConfig


class Objective(Protocol):
    units: str  # what len() and a batch count: "captions" or "images"

    def __len__(self) -> int: ...

    def epoch_order(self, generator: torch.Generator) -> torch.Tensor: ...

    def prepare(self, part: torch.Tensor) -> tuple[torch.Tensor, ...]: ...

    def backward(self, idx: torch.Tensor, micro: tuple[torch.Tensor, ...]) -> tuple[float, dict[str, float]]: ...

    def after_backward(self) -> None: ...

    def after_step(self, parts: dict[str, float]) -> None: ...


@dataclass(frozen=True)
class CrossEntropySettings:
    """What cross-entropy reads of TrainConfig: the fields of these names."""

    alpha_c: float  # weight of the doubly stochastic attention penalty (lambda)
    label_smoothing: float
    group_by_image: bool  # batches hold all captions of their images
    hard_reinforce_weight: float  # hard attention: lambda_r
    hard_entropy_weight: float  # hard attention: lambda_e
    hard_baseline_decay: float  # hard attention: moving average of the reward baseline


@dataclass(frozen=True)
class SelfCriticalSettings:
    """What SCST reads of TrainConfig: the fields scst_<name>."""

    samples: int  # captions sampled per image
    baseline: str  # "greedy" or "mean"
    max_length: int  # words per sampled caption
    temperature: float  # sampling temperature


def settings(unit: Any, cfg: TrainConfig) -> Any:
    """The objective class `unit`'s settings record, from cfg's fields (unit.prefix + each field's name)."""
    return unit.Settings(**{f.name: getattr(cfg, unit.prefix + f.name) for f in fields(unit.Settings)})


def owned_fields(name: str) -> list[str]:
    """The TrainConfig fields objective `name` (a key of OBJECTIVES) reads."""
    unit = OBJECTIVES[name]
    return [unit.prefix + f.name for f in fields(unit.Settings)]


class CaptionPairs:
    """Every (image, caption) pair of one split as padded id tensors, with features from the store."""

    def __init__(self, images: list[dict], vocab: Vocabulary, store: FeatureStore, split: str, max_length: int):
        rows, caps = [], []
        for i in split_rows(images, split, store.ok):
            for tokens in images[i]["tokens"]:
                if tokens:
                    rows.append(i)
                    caps.append([START, *vocab.encode(tokens[:max_length]), END])
        self.store = store
        self.rows = torch.tensor(rows, dtype=torch.long)  # (N,) feature row of each caption
        self.lengths = torch.tensor([len(c) for c in caps], dtype=torch.long)  # (N,)
        self.captions = torch.zeros(len(caps), max(map(len, caps), default=2), dtype=torch.long)  # (N, L)
        for j, c in enumerate(caps):
            self.captions[j, : len(c)] = torch.tensor(c)

    def __len__(self) -> int:
        return len(self.rows)

    def epoch_order(self, generator: torch.Generator, group_by_image: bool) -> torch.Tensor:
        """A shuffled order of all captions; grouped: images shuffled, each image's captions together."""
        if not group_by_image:
            return torch.randperm(len(self), generator=generator)
        images = torch.unique(self.rows)
        rank = torch.empty(int(images.max()) + 1, dtype=torch.long)
        rank[images[torch.randperm(len(images), generator=generator)]] = torch.arange(len(images))
        return torch.argsort(rank[self.rows], stable=True)

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """features (I, P, D) of the batch's distinct images, captions (B, L), lengths (B,), image index (B,)."""
        rows, captions, lengths, image_index = self.batch_rows(idx)
        return self.store.get(rows.numpy()), captions, lengths, image_index

    def batch_rows(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Like batch, with the feature rows (I,) of the distinct images in place of their features."""
        lengths = self.lengths[idx]
        captions = self.captions[idx, : int(lengths.max())]  # (B, L) trimmed to the longest
        rows, image_index = torch.unique(self.rows[idx], return_inverse=True)
        return rows, captions, lengths, image_index


class CrossEntropy:
    """Teacher forcing (the paper's objective): cross-entropy of every word, plus lambda times the doubly
    stochastic attention penalty; with hard attention also the REINFORCE terms of the sampled locations
    (model.caption_loss), whose baseline moves after every step."""

    units = "captions"
    Settings, prefix = CrossEntropySettings, ""

    def __init__(self, trainer: Trainer):
        self.t = trainer
        self.settings = settings(type(self), trainer.cfg)
        self.pairs = CaptionPairs(trainer.images, trainer.vocab, trainer.store, "train",
                                  int(trainer.meta.get("max_length", 30)))

    def __len__(self) -> int:
        return len(self.pairs)

    def epoch_order(self, generator: torch.Generator) -> torch.Tensor:
        return self.pairs.epoch_order(generator, self.settings.group_by_image)

    def prepare(self, part: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """annotations (I, P, D) or the tuner's pixels, captions (B, L), lengths (B,), image index (B,)."""
        rows, captions, lengths, image_index = self.pairs.batch_rows(part)
        return self.t.source(rows), captions, lengths, image_index

    def backward(self, idx: torch.Tensor, micro: tuple[torch.Tensor, ...]) -> tuple[float, dict[str, float]]:
        """Teacher forcing on one micro-batch, normalised by the whole batch's words and captions, and its backward."""
        t, cfg = self.t, self.settings
        lengths_all = self.pairs.lengths[idx]
        totals = (float((lengths_all - 1).sum()), float(len(idx)))  # words and captions of the whole batch
        source, captions, lengths, image_index = (x.to(t.device, non_blocking=True) for x in micro)
        hard = t.model_config.attention == "hard"
        with autocast(t.device, t.precision):
            features = t.encode(source)  # (I, P, D)
            out = t.net(features, captions, lengths, image_index, return_samples=hard)
        logits, alphas = out[0].float(), out[1].float()  # (B, T, V), (B, T, P): the loss in fp32
        loss, parts = caption_loss(logits, captions[:, 1:], alphas, lengths, alpha_c=cfg.alpha_c,
                                   label_smoothing=cfg.label_smoothing, totals=totals,
                                   samples=out[2] if hard else None, baseline=float(t.model.reward_baseline),
                                   reinforce_weight=cfg.hard_reinforce_weight, entropy_weight=cfg.hard_entropy_weight)
        # DDP averages gradients over processes: undo it (exact, world is a power of 2 in practice), shards add up
        t.scaler.scale(loss * t.dist.world).backward()
        return float(loss.detach()), parts

    def after_backward(self) -> None:
        pass  # DDP has all-reduced the gradients in the last micro-batch's backward

    def after_step(self, parts: dict[str, float]) -> None:
        if "reward" in parts:  # hard attention: move the baseline towards this batch's mean reward
            b = self.t.model.reward_baseline
            decay = self.settings.hard_baseline_decay if self.t.progress.global_step > 0 else 0.0
            b.fill_(decay * float(b) + (1 - decay) * parts["reward"])


class SelfCritical:
    """Self-critical sequence training (scst.py): REINFORCE on the CIDEr-D of sampled captions, by image.

    Rewards use the training references (their document frequencies fixed for the run)."""

    units = "images"
    Settings, prefix = SelfCriticalSettings, "scst_"

    def __init__(self, trainer: Trainer):
        self.t = trainer
        self.settings = settings(type(self), trainer.cfg)
        images, max_len = trainer.images, int(trainer.meta.get("max_length", 30))
        rows = [i for i in split_rows(images, "train", trainer.store.ok) if any(images[i]["tokens"])]
        self.images = torch.tensor(rows, dtype=torch.long)  # sorted feature rows of the training images
        self.cider = reward_references([[trainer.vocab.encode(t[:max_len]) for t in images[i]["tokens"] if t]
                                        for i in rows])

    def __len__(self) -> int:
        return len(self.images)

    def epoch_order(self, generator: torch.Generator) -> torch.Tensor:
        return self.images[torch.randperm(len(self.images), generator=generator)]

    def prepare(self, part: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """feature rows (I,), annotations (I, P, D)."""
        return part, self.t.source(part)

    def backward(self, idx: torch.Tensor, micro: tuple[torch.Tensor, ...]) -> tuple[float, dict[str, float]]:
        """Self-critical loss of one micro-batch of images (sampled on the device), and its backward."""
        t, cfg = self.t, self.settings
        rows, features = micro[0], micro[1].to(t.device, non_blocking=True)
        references = torch.searchsorted(self.images, rows.contiguous()).tolist()  # their CIDEr-D reference sets
        with autocast(t.device, t.precision):
            loss, parts = scst_loss(t.model, features, references, self.cider, samples=cfg.samples,
                                    max_length=cfg.max_length, baseline=cfg.baseline,
                                    total_rows=len(idx) * cfg.samples, temperature=cfg.temperature)
        t.scaler.scale(loss).backward()
        return float(loss.detach()), {k: v * len(rows) / len(idx) for k, v in parts.items()}  # -> batch means

    def after_backward(self) -> None:
        self.t.dist.sum_gradients(self.t.model.parameters())  # sampling runs outside the DDP wrapper

    def after_step(self, parts: dict[str, float]) -> None:
        pass


OBJECTIVES: dict[str, type] = {"xe": CrossEntropy, "scst": SelfCritical}
