"""A training run's settings and where it stands: TrainConfig and Progress, both saved in every checkpoint
(checkpoint.json's train_config and progress), and the checks that a saved run can be resumed as asked.

TrainConfig is one flat record because checkpoints and the command line name its fields. Each objective
(objectives.py: cross-entropy with hard attention's REINFORCE terms, SCST) reads its own fields as a frozen
settings record (objectives.settings, owned_fields); they and end-to-end training's (finetune.py) are
grouped below.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import checkpoint as ckpt
from .checks import require_choice, require_int, require_number
from .distributed import Distributed
from .limits import MAX_BEAM_SIZE, MAX_LENGTH
from .objectives import OBJECTIVES


@dataclass
class TrainConfig:
    epochs: int = 20  # maximum epochs (one epoch = every training caption once)
    batch_size: int = 64  # captions per batch
    lr: float = 4e-4  # peak Adam learning rate
    lr_schedule: str = "cosine"  # "cosine" (warm-up then cosine decay to lr * min_lr_ratio) or "constant"
    warmup_steps: int = 100  # linear warm-up steps
    min_lr_ratio: float = 0.05  # final LR of the cosine schedule, relative to lr
    weight_decay: float = 0.0  # Adam weight decay
    grad_clip: float = 5.0  # max gradient norm (0: no clipping)
    alpha_c: float = 1.0  # weight of the doubly stochastic attention penalty (lambda)
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    patience: int = 5  # stop after this many epochs without a better validation CIDEr (0: never)
    val_beam: int = 1  # beam size of validation decoding (1 = greedy)
    val_max_length: int = 30  # words per validation caption
    # validate on the first N validation images (0: all). 5,000 is COCO's Karpathy val split: larger ones
    # (AI Challenger's 30,000) add decoding time each epoch and little precision to the CIDEr that picks the best
    val_images: int = 5000
    group_by_image: bool = True  # batches hold all captions of their images: each image is projected once
    checkpoint_every: int = 0  # also checkpoint every N steps inside an epoch (0: at epoch ends only)
    seed: int = 0  # initialisation, batch order and dropout
    init_from: str = ""  # start from these weights (a RUN_DIR's best checkpoint, or a checkpoint directory)
    objective: str = "xe"  # "xe": cross-entropy with teacher forcing; "scst": self-critical CIDEr-D (scst.py)
    scst_samples: int = 5  # SCST: captions sampled per image
    scst_baseline: str = "greedy"  # SCST: "greedy" (the paper's) or "mean" (of the image's other samples)
    scst_max_length: int = 20  # SCST: words per sampled caption
    scst_temperature: float = 1.0  # SCST: sampling temperature (< 1: samples nearer the greedy caption)
    hard_reinforce_weight: float = 1.0  # hard attention: weight of the REINFORCE term (lambda_r)
    hard_entropy_weight: float = 0.01  # hard attention: weight of the attention entropy bonus (lambda_e)
    hard_baseline_decay: float = 0.9  # hard attention: moving average of the reward baseline
    finetune_blocks: int = 0  # end-to-end (finetune.py): also train the encoder's last N blocks + head on images
    encoder_lr: float = 1e-4  # peak LR of those encoder blocks (the same schedule as lr, scaled)
    micro_batches: int = 1  # split each process's share of a batch into N backward passes, one optimizer step

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def validate(self, where: str = "") -> "TrainConfig":
        """Self, or ValueError naming the first field out of range (prefixed by `where`, e.g. "train_config.")."""
        many = 10**9
        for name, low, high in (("epochs", 0, many), ("batch_size", 1, many), ("warmup_steps", 0, many),
                                ("patience", 0, many), ("val_beam", 1, MAX_BEAM_SIZE), ("val_max_length", 1, MAX_LENGTH),
                                ("val_images", 0, many), ("checkpoint_every", 0, many), ("seed", 0, 2**32 - 1),
                                ("scst_samples", 1, 1000), ("scst_max_length", 1, MAX_LENGTH), ("finetune_blocks", 0, 1000),
                                ("micro_batches", 1, 4096)):
            require_int(where + name, getattr(self, name), low, high)
        for name, high, open_high in (("lr", math.inf, True), ("min_lr_ratio", 1, False), ("weight_decay", math.inf, True),
                                      ("grad_clip", math.inf, True), ("alpha_c", math.inf, True),
                                      ("label_smoothing", 1, True), ("hard_reinforce_weight", math.inf, True),
                                      ("hard_entropy_weight", math.inf, True), ("hard_baseline_decay", 1, False),
                                      ("encoder_lr", math.inf, True), ("scst_temperature", 10, False)):
            require_number(where + name, getattr(self, name), 0, high, open_high=open_high)
        for name, choices in (("lr_schedule", ("cosine", "constant")), ("objective", tuple(OBJECTIVES)),
                              ("scst_baseline", ("greedy", "mean")), ("group_by_image", (True, False))):
            require_choice(where + name, getattr(self, name), choices)
        if not isinstance(self.init_from, str):
            raise ValueError(f"'{where}init_from' must be a run directory, got {str(self.init_from)[:40]!r}")
        return self


@dataclass
class Progress:
    """Where training is; saved in every checkpoint."""

    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # batches done in the current epoch
    global_step: int = 0
    best_cider: float = -1.0
    best_epoch: int = -1
    epochs_since_best: int = 0
    history: list = field(default_factory=list)  # one dict per finished epoch
    # running sums of the current epoch, so that an epoch resumed mid-way reports the whole epoch
    epoch_loss_sum: float = 0.0
    epoch_part_sums: dict = field(default_factory=dict)
    epoch_seen: int = 0  # captions (SCST: images) trained on
    epoch_seconds: float = 0.0
    epoch_wait_seconds: float = 0.0  # of epoch_seconds, the training thread's wait for batches


RESUMABLE_CHANGES = ("epochs", "micro_batches")  # the training settings a resume may change


def resume_conflicts(out_dir: str | os.PathLike, model_config: dict, train_config: dict) -> list[str]:
    """The settings given for a run that already has a checkpoint in out_dir and that differ from the run's own:
    a resume keeps the run's model and training settings (except RESUMABLE_CHANGES), so these would be ignored.
    model_config / train_config: only the settings given (e.g. the command line's flags). [] when out_dir has no
    checkpoint or nothing differs."""
    for name in ("checkpoint", "checkpoint.old"):
        file = Path(out_dir) / name / "checkpoint.json"
        if file.is_file():
            break
    else:
        return []
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
        saved_model, saved_train = dict(meta["model_config"]), dict(meta["train_config"])
    except (OSError, ValueError, KeyError, TypeError):
        return []  # an unreadable checkpoint: the Trainer says what is wrong with it
    conflicts = [k for k, v in model_config.items() if k in saved_model and saved_model[k] != v]
    conflicts += [k for k, v in train_config.items()
                  if k not in RESUMABLE_CHANGES and k in saved_train and saved_train[k] != v]
    return conflicts


def check_finetune(cfg: TrainConfig, dist: Distributed) -> None:
    """ValueError for what end-to-end training (finetune.py, cfg.finetune_blocks > 0) cannot go with."""
    if not cfg.init_from:
        raise ValueError("--finetune-blocks needs --init-from RUN_DIR: fine-tune a decoder trained on cached features")
    if cfg.objective != "xe":
        raise ValueError("--finetune-blocks works with the cross-entropy objective only (not --objective scst)")
    if dist.world > 1:
        raise ValueError("--finetune-blocks runs in one process (not under torchrun)")
    if cfg.encoder_lr <= 0:
        raise ValueError(f"--encoder-lr must be > 0, got {cfg.encoder_lr}")


def check_resumable(path: Path, meta: dict) -> None:
    """What resuming reads from checkpoint.json beyond what every checkpoint has; CheckpointError if absent.
    (load_checkpoint has already checked the types of these sections when present.)"""
    for key in ("data", "train_config", "progress"):
        if key not in meta:
            raise ckpt.CheckpointError(f"{path}/checkpoint.json: cannot resume, '{key}' is missing")
    if "features" not in meta["data"]:
        raise ckpt.CheckpointError(f"{path}/checkpoint.json: cannot resume, data.features is missing")
    unknown = set(meta["progress"]) - set(Progress.__dataclass_fields__)
    if unknown:
        raise ckpt.CheckpointError(f"{path}/checkpoint.json: unknown progress keys {', '.join(sorted(unknown))}")
    try:
        TrainConfig.from_dict(meta["train_config"]).validate("train_config.")
        check_progress(meta["progress"])
    except ValueError as e:
        raise ckpt.CheckpointError(f"{path}/checkpoint.json: {e}") from None


def check_progress(progress: dict) -> None:
    """What training reads from a saved Progress beyond the counters load_checkpoint checks; ValueError naming the key."""
    history, epoch = progress.get("history", []), progress.get("epoch", 0)
    if not isinstance(history, list) or len(history) != epoch or not all(
            isinstance(h, dict) and isinstance(h.get("val"), dict) for h in history):
        raise ValueError(f"'progress.history' must be a list of {epoch} epoch records (objects with 'val'), "
                         f"got {str(history)[:40]!r}")
    require_int("progress.best_epoch", progress.get("best_epoch", -1), -1, len(history))
    require_int("progress.epochs_since_best", progress.get("epochs_since_best", 0), 0, 10**9)
    require_int("progress.epoch_seen", progress.get("epoch_seen", 0), 0, 10**18)
    require_number("progress.best_cider", progress.get("best_cider", -1.0), -math.inf, math.inf)
    for key in ("epoch_loss_sum", "epoch_seconds", "epoch_wait_seconds"):  # NaN allowed: a diverged epoch's loss
        value = progress.get(key, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"'progress.{key}' must be a number, got {str(value)[:40]!r}")
    parts = progress.get("epoch_part_sums", {})
    if not isinstance(parts, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in parts.values()):
        raise ValueError(f"'progress.epoch_part_sums' must map names to numbers, got {str(parts)[:40]!r}")
