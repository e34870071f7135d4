"""The training loop on cached features: Adam, clipping, a step-based LR schedule, validation by real
decoding each epoch, early stopping and best-checkpoint selection on CIDEr, exact resume. What a step
optimises is the run's objective (objectives.py: cross-entropy, SCST); its settings and the resume checks are
in train_config.py, Ctrl-C in interrupts.py, TensorBoard in tblog.py. The file stays over 400 lines because
the Trainer is one piece: its state (progress, RNG, optimizer) is what a checkpoint saves and a resume restores.

Exact resume: the epoch's batch order comes from a generator seeded by (seed, epoch), the LR is a
function of the global step, and checkpoints hold the optimizer state and the torch RNG (dropout), so
stopping after any checkpoint and re-running gives the same weights as never stopping (on one device
and precision; a GPU checkpoint also holds the CUDA RNG. A resume may change the device or the precision:
training goes on, equal in distribution, not bit for bit).

Devices: Trainer(device=..., precision=...) puts the model, the optimizer state and every batch on the
device (devices.py), runs the forward under autocast for bf16/fp16 and computes the losses in fp32 (fp16
with a GradScaler). Batches are read from the feature store by a feeding thread one or two ahead (pinned
memory for a CUDA device), in the same order with the same content; the share of the epoch the training
thread spent waiting for them is the epoch record's data_wait_share.

Micro-batches (TrainConfig.micro_batches = N): each process's share of a batch is split into N parts
(rows k::N), each part's backward adds into the gradients, one optimizer step. One process with N = 2
computes exactly what two processes (torchrun, rows rank::2) compute.

End to end (TrainConfig.finetune_blocks > 0): annotations come from finetune.EncoderTuner, which encodes the
images with the top encoder blocks in training, instead of from the store; everything else is the same.

Ctrl-C (SIGINT) in one process: the step in progress finishes, the checkpoint is written at that step boundary
(what checkpoint_every writes mid-epoch, so re-running resumes exactly there) and TrainingInterrupted says so; in
validation it stops at once and keeps the epoch's steps. A second Ctrl-C before the write stops without it; one
during the write is ignored. Under torchrun Ctrl-C stops without a checkpoint (the ranks would have to agree on
the step): the re-run resumes from the last one.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import checkpoint as ckpt
from .datasets import load_dataset, load_vocab, split_rows
from .decoding import DecodingOptions, decode
from .devices import autocast, describe, resolve_device, resolve_precision
from .distributed import Distributed
from .encoders import ImageEncoder
from .features import FeatureStore, _prefetch
from .fileio import remove_stale_temporaries, write_jsonl_atomic
from .interrupts import CtrlC, TrainingInterrupted
from .metrics import validation_scores
from .model import DECODER, ModelConfig, ShowAttendTell
from .objectives import OBJECTIVES, Objective
from .train_config import Progress, TrainConfig, check_finetune, check_resumable
from .tblog import open_tensorboard as _tensorboard
from .text import Vocabulary


def learning_rate(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """LR at a global step: linear warm-up, then constant or cosine decay to lr * min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    frac = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def validate(
    model: ShowAttendTell, images: list[dict], store: FeatureStore, vocab: Vocabulary, options: DecodingOptions,
    limit: int = 0, batch_size: int = 100, dist: Distributed = Distributed(),
    features: Callable[[np.ndarray], torch.Tensor] | None = None, precision: str = "fp32",
) -> tuple[dict, dict[str, list[str]]]:
    """Decode the validation images for real (no teacher forcing); BLEU-1..4 and CIDEr on tokens.
    Distributed: each process decodes its share and every process scores all of them.
    features: rows -> annotations (default store.get; a fine-tuned encoder encodes the images instead).
    Decoding runs on the model's device, under autocast for precision bf16/fp16."""
    features = features or store.get
    rows = split_rows(images, "val", store.ok)
    rows = rows[:limit] if limit else rows
    if not rows:
        return {}, {}
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    mine: dict[str, list[str]] = {}
    shard = dist.shard(rows)
    for start in range(0, len(shard), batch_size):
        chunk = shard[start : start + batch_size]
        with torch.no_grad(), autocast(device, precision):
            a = features(np.array(chunk)).to(device).float()  # (len(chunk), P, D); search sums log p in fp32
            hyps = decode(model, a, options)
        for i, best in zip(chunk, hyps):
            mine[images[i]["id"]] = vocab.decode(best[0].tokens)
    model.train(was_training)
    hyps = {k: v for part in dist.gather(mine) for k, v in part.items()}
    refs = {images[i]["id"]: images[i]["tokens"] for i in rows}
    return validation_scores(refs, hyps), hyps


class Trainer:
    """Owns the model, optimizer, data and run directory of one training run.

    device, precision: as devices.resolve_device / resolve_precision take them ("auto": CUDA when torch sees
    it, bf16 there). prefetch: read batches in a feeding thread (None: on a CUDA device, and on the CPU for a
    store larger than a quarter of the memory, whose reads can miss the page cache; otherwise on the CPU the
    thread competes with the training thread for the cores and the store reads cost ~1% of a step)."""

    def __init__(self, data_dir: str | os.PathLike, out_dir: str | os.PathLike, model_config: dict | None = None,
                 train_config: TrainConfig | None = None, features: str | None = None, log=print,
                 encoder: ImageEncoder | None = None, device: str | torch.device = "auto", precision: str = "auto",
                 prefetch: bool | None = None):
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.dist = Distributed.from_env(self.device)
        self.data_dir, self.out_dir = Path(data_dir).resolve(), Path(out_dir)
        self.log = log if self.dist.main else (lambda *a, **k: None)
        self.meta, self.images = load_dataset(self.data_dir)
        self.vocab = load_vocab(self.data_dir)
        resume = (self.out_dir / "checkpoint").exists() or (self.out_dir / "checkpoint.old").exists()
        saved = ckpt.load_checkpoint(self.out_dir / "checkpoint") if resume else None
        start = None  # (meta, weights) of the run a new run starts from (--init-from)
        if saved:
            check_resumable(self.out_dir / "checkpoint", saved[0])
            self._check_same_data(saved[0])
            features = saved[0]["data"]["features"]
        else:
            self.cfg = (train_config or TrainConfig()).validate()
            if self.cfg.init_from:  # read once here: its store is the default one
                start = ckpt.load_checkpoint(ckpt.find_checkpoint(self.cfg.init_from))
                features = features or _store_of(start[0], self.data_dir)
        store_encoder, size = _split_store_name(features)
        self.store = FeatureStore.open(self.data_dir, encoder=store_encoder, image_size=size)
        self.prefetch = _feeding_thread(self.device, self.store) if prefetch is None else prefetch
        if saved:
            meta = saved[0]
            self.cfg = TrainConfig.from_dict(meta["train_config"])
            if train_config is not None and train_config.epochs != self.cfg.epochs:
                self.cfg.epochs = train_config.epochs  # a resume may change the epochs and the micro-batches
            if train_config is not None and train_config.micro_batches != self.cfg.micro_batches:
                self.log(f"note: micro-batches {self.cfg.micro_batches} -> {train_config.micro_batches} from here "
                         f"(the same batches; gradients add up in another order, so rounding differs)")
                self.cfg.micro_batches = train_config.micro_batches
            self.cfg.validate()
            self.model_config = ModelConfig.from_dict(meta["model_config"])
        else:
            overrides = dict(model_config or {})
            self.model_config = ModelConfig(vocab_size=len(self.vocab), feature_dim=self.store.spec.feature_dim,
                                            **overrides).validate()
        self.init_encoder_weights: dict[str, torch.Tensor] | None = None  # set by _initial_weights
        self._ctrl_c = CtrlC(False)  # train() installs an active one
        self._session = [0, 0.0]  # steps trained by this process and their seconds (validation apart): the ETA
        init = self._initial_weights(*start) if start else None
        self.log(f"training on {describe(self.device)}, {self.precision}")
        torch.manual_seed(self.cfg.seed)
        self.model = ShowAttendTell(self.model_config).to(self.device)  # initialised on the CPU: the same on every device
        self.tuner = None  # finetune.EncoderTuner when the encoder's top blocks train too
        if self.cfg.finetune_blocks:
            from .finetune import EncoderTuner

            check_finetune(self.cfg, self.dist)
            weights = (ckpt.load_encoder_weights(self.out_dir / "checkpoint", saved[0]) if saved
                       else self.init_encoder_weights)
            self.tuner = EncoderTuner(self.data_dir, self.store.spec, self.cfg.finetune_blocks,
                                      self.cfg.encoder_lr / self.cfg.lr, encoder, weights, device=self.device)
        groups = [{"params": list(self.model.parameters())}, *(self.tuner.param_groups() if self.tuner else [])]
        self.optimizer = _adam(groups, self.cfg)
        # fp16: the loss is scaled before backward and the gradients unscaled before clipping; off otherwise
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.net = self.model  # what training calls: the model, or its DistributedDataParallel wrapper
        if self.dist.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None  # one GPU per process
            self.net = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.objective: Objective = OBJECTIVES[self.cfg.objective](self)  # what a step optimises (objectives.py)
        if len(self.objective) == 0:
            raise ValueError(f"{self.data_dir}: no training captions with features (is there a train split?)")
        self.progress = Progress()
        if init is not None:
            ckpt.load_weights(self.model, init, ckpt.find_checkpoint(self.cfg.init_from))
        if saved:
            ckpt.load_weights(self.model, saved[1], self.out_dir / "checkpoint")  # read on the CPU, copied over
            ckpt.load_training_state(self.out_dir / "checkpoint", self.optimizer, saved[0])
            self.progress = Progress(**saved[0]["progress"])
            self.log(f"resuming {self.out_dir} at epoch {self.progress.epoch + 1}, step {self.progress.global_step}")
            self._resume_on(saved[0].get("trained_on", {}))

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.objective) / self.cfg.batch_size)

    def _initial_weights(self, meta: dict, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The weights of cfg.init_from (its checkpoint's meta and state); its model configuration replaces the one
        given, its vocabulary must match."""
        path = ckpt.find_checkpoint(self.cfg.init_from)
        self.init_encoder_weights = ckpt.load_encoder_weights(path, meta)
        if self.init_encoder_weights is not None and not self.cfg.finetune_blocks:
            raise ValueError(f"{self.cfg.init_from}: its encoder was fine-tuned, its decoder does not fit the cached "
                             f"features; go on with --finetune-blocks")
        if meta["vocab"]["tokens"] != self.vocab.tokens:
            raise ValueError(f"{self.cfg.init_from}: its vocabulary differs from {self.data_dir}/vocab.json")
        if meta["encoder"] != self.store.spec.to_dict():
            raise ValueError(f"{self.cfg.init_from}: trained on other features ({meta.get('data', {}).get('features')}) "
                             f"than {self.store.path.name}; pass --features")
        self.model_config = ModelConfig.from_dict(meta["model_config"])
        self.log(f"starting from the weights of {self.cfg.init_from}")
        return state

    def _resume_on(self, trained_on: dict) -> None:
        """The fp16 loss scale of the checkpoint, and a note when this resume runs on another device or precision."""
        if self.scaler.is_enabled() and isinstance(trained_on.get("grad_scaler"), dict):
            self.scaler.load_state_dict(trained_on["grad_scaler"])
        before = (str(trained_on.get("device", "cpu")).split(":")[0], trained_on.get("precision", "fp32"))
        if before != (self.device.type, self.precision):
            self.log(f"note: the checkpoint was trained on {trained_on.get('device', 'cpu')} in "
                     f"{before[1]}; going on on {self.device} in {self.precision} (the same run, but not bit for "
                     f"bit what {before[0]} would compute: other kernels and random streams)")

    def _check_same_data(self, meta: dict) -> None:
        if Path(meta["data"].get("data_dir", self.data_dir)) != self.data_dir:
            self.log(f"note: {self.out_dir} was trained on {meta['data']['data_dir']}; continuing with {self.data_dir}")
        if meta["vocab"]["tokens"] != self.vocab.tokens:
            raise ValueError(f"{self.out_dir}: its vocabulary differs from {self.data_dir}/vocab.json; use a new --out")

    def checkpoint_meta(self, metrics: dict | None = None) -> dict:
        p = self.progress
        return {
            "decoder": DECODER,  # the class that reads model_config (api.DECODERS)
            "model_config": self.model_config.to_dict(),
            "vocab": self.vocab.to_dict(),
            "encoder": self.store.spec.to_dict(),
            "language": self.meta.get("language", "en"),
            "data": {"data_dir": str(self.data_dir), "features": self.store.path.name, "format": self.meta.get("format")},
            "train_config": self.cfg.to_dict(),
            "progress": asdict(p),
            "metrics": metrics if metrics is not None else (p.history[p.best_epoch - 1]["val"] if p.best_epoch > 0 else {}),
            # for information: a resume may run elsewhere (the fp16 loss scale goes on when it stays fp16)
            "trained_on": {"device": str(self.device), "name": describe(self.device), "precision": self.precision,
                           **({"grad_scaler": self.scaler.state_dict()} if self.scaler.is_enabled() else {})},
        }

    def save(self, name: str = "checkpoint", metrics: dict | None = None) -> None:
        """Rank 0 writes; the others have the same weights."""
        if not self.dist.main:
            return
        with self._ctrl_c.mode("shielded"):  # a Ctrl-C while writing waits for the write (which is atomic anyway)
            ckpt.save_checkpoint(self.out_dir / name, self.model, self.checkpoint_meta(metrics),
                                 self.optimizer if name == "checkpoint" else None,
                                 encoder_weights=self.tuner.state() if self.tuner else None)

    def features(self, rows: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Annotations (I, P, D) of feature rows on the device: encode(source(rows))."""
        return self.encode(self.source(torch.as_tensor(np.asarray(rows, dtype=np.int64))))

    def train(self, progress_bar: bool = True, stop_after_steps: int | None = None) -> dict:
        """Run until cfg.epochs, early stopping, or stop_after_steps global steps (then checkpoint and return).
        Ctrl-C: TrainingInterrupted (a KeyboardInterrupt) after a checkpoint at the step boundary (module docstring)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.dist.main:
            remove_stale_temporaries(self.out_dir)  # a run killed while writing metrics.jsonl
        p = self.progress
        writer = _tensorboard(self.out_dir / "tb", p.global_step) if self.dist.main else None
        self.model.train()
        if self.dist.main and p.history:  # a kill after the last checkpoint may have left it an epoch short
            write_jsonl_atomic(self.out_dir / "metrics.jsonl", p.history)
        self._ctrl_c = CtrlC(self.dist.world == 1)
        try:
            with self._ctrl_c:
                return self._train_epochs(progress_bar, stop_after_steps, writer)
        except KeyboardInterrupt as e:
            if isinstance(e, TrainingInterrupted):
                raise
            raise TrainingInterrupted(self._stopped_without_checkpoint()) from None
        finally:
            self._ctrl_c = CtrlC(False)
            if writer:
                writer.close()

    def _train_epochs(self, progress_bar: bool, stop_after_steps: int | None, writer) -> dict:
        cfg, p = self.cfg, self.progress
        total_steps = cfg.epochs * self.steps_per_epoch
        options = DecodingOptions(beam_size=cfg.val_beam, max_length=cfg.val_max_length)
        while p.epoch < cfg.epochs:
            if cfg.patience and p.epochs_since_best >= cfg.patience:
                return self._summary("early stopping")
            if self._ctrl_c.requested:  # Ctrl-C while the last epoch's end was written
                self.save()
                raise self._interrupted()
            generator = torch.Generator().manual_seed(cfg.seed * 100_003 + p.epoch)
            order = self.objective.epoch_order(generator)
            batches = self._batches(order)
            t0 = time.time() - p.epoch_seconds  # the seconds before a mid-epoch resume count too
            bar = tqdm(total=len(batches), initial=p.step_in_epoch, desc=f"epoch {p.epoch + 1}/{cfg.epochs}",
                       disable=not progress_bar or not self.dist.main, leave=False, file=sys.stderr, dynamic_ncols=True)
            with contextlib.closing(self._feed(batches[p.step_in_epoch :])) as feed, contextlib.closing(bar):
                clock = time.perf_counter()
                for idx, batch in feed:
                    lr = learning_rate(cfg, p.global_step, total_steps)
                    for group in self.optimizer.param_groups:
                        group["lr"] = lr * group.get("lr_scale", 1.0)  # the encoder's group is scaled (finetune.py)
                    loss, parts = self._step(idx, batch)
                    p.step_in_epoch += 1
                    p.global_step += 1
                    p.epoch_seen += len(idx)  # captions (SCST: images) of the whole batch, over all processes
                    p.epoch_loss_sum += loss
                    for k, v in parts.items():
                        p.epoch_part_sums[k] = p.epoch_part_sums.get(k, 0.0) + v
                    p.epoch_seconds = time.time() - t0
                    clock, seconds = time.perf_counter(), time.perf_counter() - clock
                    self._session[0] += 1
                    self._session[1] += seconds
                    bar.set_postfix({"loss": f"{loss:.3f}", **({"xent": f"{parts['xent']:.3f}"} if "xent" in parts else {}),
                                     "caps_per_s": f"{p.epoch_seen / max(p.epoch_seconds, 1e-9):.0f}",
                                     "data_wait": f"{p.epoch_wait_seconds / max(p.epoch_seconds, 1e-9):.0%}",
                                     "run_eta": _duration(self._run_eta(total_steps))}, refresh=False)  # in this order
                    bar.update(1)  # drawn with the step's figures
                    if writer and p.global_step % 20 == 0:
                        writer.add_scalar("train/loss", loss, p.global_step)
                        for k, v in parts.items():
                            writer.add_scalar(f"train/{k}", v, p.global_step)
                        writer.add_scalar("train/lr", lr, p.global_step)
                    if self._ctrl_c.requested:  # Ctrl-C during this step: keep it
                        bar.close()
                        self.save()
                        raise self._interrupted(len(batches))
                    if cfg.checkpoint_every and p.global_step % cfg.checkpoint_every == 0 and p.step_in_epoch < len(batches):
                        self.save()
                    if stop_after_steps is not None and p.global_step >= stop_after_steps:
                        bar.close()
                        self.save()
                        return self._summary("step limit")
            steps = max(p.step_in_epoch, 1)
            self._end_epoch(options, p.epoch_loss_sum / steps if p.step_in_epoch else float("nan"), time.time() - t0,
                            p.epoch_seen, writer, {k: v / steps for k, v in p.epoch_part_sums.items()}, total_steps)
        return self._summary("epochs")

    def _run_eta(self, total_steps: int) -> float:
        """Seconds left in the run at this session's speed: the steps left, and one validation (as long as the
        last) at the end of each epoch left; early stopping may end it sooner."""
        p = self.progress
        steps, seconds = self._session
        per_step = seconds / steps if steps else 0.0
        validations = self.cfg.epochs - p.epoch
        val_seconds = p.history[-1].get("val_seconds", 0.0) if p.history else 0.0
        return max(total_steps - p.global_step, 0) * per_step + validations * val_seconds

    def _interrupted(self, steps: int = 0, validating: bool = False) -> TrainingInterrupted:
        """The Ctrl-C report once the checkpoint at this point is written (steps: the epoch's batches)."""
        p = self.progress
        if validating:
            where = f"in the validation of epoch {p.epoch + 1} (its {p.step_in_epoch} steps are kept)"
        elif p.step_in_epoch == 0:
            where = f"after epoch {p.epoch} of {self.cfg.epochs}"
        else:
            where = f"at epoch {p.epoch + 1}, step {p.step_in_epoch} of {steps}"
        return TrainingInterrupted(f"interrupted {where}: checkpoint written to {self.out_dir / 'checkpoint'}; "
                                   f"run the same command to resume")

    def _stopped_without_checkpoint(self) -> str:
        """The report of a Ctrl-C that wrote nothing: a second one before the checkpoint, or any under torchrun."""
        why = ("under torchrun Ctrl-C writes no checkpoint" if self.dist.world > 1
               else "a second Ctrl-C stopped it before the checkpoint was written")
        p = self.progress
        saved = any((self.out_dir / name / "checkpoint.json").is_file() for name in ("checkpoint", "checkpoint.old"))
        then = ("run the same command to resume from the last checkpoint" if saved
                else "no checkpoint yet: the same command starts over")
        return f"interrupted at epoch {p.epoch + 1}, step {p.step_in_epoch} ({why}); {then}"

    def _batches(self, order: torch.Tensor) -> list[torch.Tensor]:
        """Split an epoch's order into batches; with N processes no batch is smaller than N captions."""
        batches = list(order.split(self.cfg.batch_size))
        if len(batches) > 1 and len(batches[-1]) < self.dist.world:
            batches[-2:] = [torch.cat(batches[-2:])]
        return batches

    def _feed(self, batches: list[torch.Tensor]) -> Iterator[tuple[torch.Tensor, list[tuple[torch.Tensor, ...]]]]:
        """(idx, self._prepare(idx)) for each batch, in order: prepared by a feeding thread up to two batches
        ahead when self.prefetch, else here. The time the training thread waits for them goes to
        progress.epoch_wait_seconds."""
        prepared = _prefetch(self._prepare, batches) if self.prefetch else map(self._prepare, batches)
        try:
            for idx in batches:
                start = time.perf_counter()
                batch = next(prepared)
                self.progress.epoch_wait_seconds += time.perf_counter() - start
                yield idx, batch
        finally:
            if self.prefetch:
                prepared.close()  # stops the thread

    def _prepare(self, idx: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        """The host side of batch `idx`: this process's share of it (rows rank::world) split into micro-batches
        (rows k::micro_batches of the share), each as the objective's CPU tensors (pinned for a CUDA device).
        No RNG is drawn: it may run in another thread."""
        share = self.dist.shard(idx)
        n = self.cfg.micro_batches
        out = []
        for part in (share[k::n] for k in range(min(n, len(share)))):
            tensors = self.objective.prepare(part)
            out.append(tuple(t.pin_memory() for t in tensors) if self.device.type == "cuda" else tensors)
        return out

    def source(self, rows: torch.Tensor) -> torch.Tensor:
        """What the model's annotations of `rows` are made from, on the CPU: cached features, or the tuner's pixels."""
        return self.tuner.load(rows.numpy()) if self.tuner else self.store.get(rows.numpy())

    def encode(self, source: torch.Tensor) -> torch.Tensor:
        """source(rows) -> annotations (I, P, D) on the device: the cached features as they are, or the fine-tuned
        encoder's of the pixels (differentiable through its top blocks when grad is enabled)."""
        return self.tuner.encode(source) if self.tuner else source.to(self.device, non_blocking=True)

    def _step(self, idx: torch.Tensor, batch: list[tuple[torch.Tensor, ...]]) -> tuple[float, dict]:
        """One optimizer step on the batch `idx` (this process computes its shard of it), prepared by _prepare:
        a backward per micro-batch (DDP synchronises the last one's), clipping, the step.
        idx: the objective's units (caption numbers for cross-entropy, feature rows of images for SCST)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss, parts = 0.0, {}
        for k, micro in enumerate(batch):
            later = k < len(batch) - 1 and self.net is not self.model  # DDP: add up locally, all-reduce once
            with self.net.no_sync() if later else contextlib.nullcontext():
                micro_loss, micro_parts = self.objective.backward(idx, micro)
            loss += micro_loss
            for name, v in micro_parts.items():
                parts[name] = parts.get(name, 0.0) + v
        self.objective.after_backward()
        self.scaler.unscale_(self.optimizer)  # fp16: clip the true gradients (a no-op otherwise)
        if self.cfg.grad_clip:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]  # decoder (+ encoder blocks)
            torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        self.scaler.step(self.optimizer)  # fp16: skipped when a gradient overflowed
        self.scaler.update()
        parts = {k: self.dist.sum(v) for k, v in parts.items()}
        self.objective.after_step(parts)
        return self.dist.sum(loss), parts

    def _end_epoch(self, options: DecodingOptions, loss: float, seconds: float, seen: int, writer,
                   parts: dict[str, float], total_steps: int) -> None:
        t0 = time.time()
        try:
            with self._ctrl_c.mode("at_once"):  # validation changes nothing: Ctrl-C stops it at once
                scores, hyps = validate(self.model, self.images, self.store, self.vocab, options, self.cfg.val_images,
                                        dist=self.dist, features=self.features, precision=self.precision)
        except KeyboardInterrupt:
            if not self._ctrl_c.active:
                raise
            self.model.train()
            self.save()  # all the epoch's steps: the re-run validates, then goes on
            raise self._interrupted(validating=True) from None
        with self._ctrl_c.mode("shielded"):  # the epoch's record, checkpoints and metrics.jsonl: Ctrl-C waits
            self._record_epoch(scores, hyps, loss, seconds, seen, writer, parts, t0, total_steps)

    def _record_epoch(self, scores: dict, hyps: dict, loss: float, seconds: float, seen: int, writer,
                      parts: dict[str, float], t0: float, total_steps: int) -> None:
        p = self.progress
        wait_share = p.epoch_wait_seconds / max(seconds, 1e-9)  # of the training thread's epoch, waiting for data
        p.epoch += 1
        p.step_in_epoch, p.epoch_loss_sum, p.epoch_part_sums, p.epoch_seen, p.epoch_seconds = 0, 0.0, {}, 0, 0.0
        p.epoch_wait_seconds = 0.0
        record = {"epoch": p.epoch, "step": p.global_step, "train_loss": loss, "train_parts": parts,
                  "train_seconds": round(seconds, 2),
                  "captions_per_s": round(seen / max(seconds, 1e-9), 1), "data_wait_share": round(wait_share, 4),
                  "val_seconds": round(time.time() - t0, 2), "val": scores}
        p.history.append(record)
        cider = scores.get("CIDEr", -loss)  # no validation split: fall back to the training loss
        improved = cider > p.best_cider
        if improved:
            p.best_cider, p.best_epoch, p.epochs_since_best = cider, p.epoch, 0
        else:
            p.epochs_since_best += 1
        if writer:
            for k, v in scores.items():
                writer.add_scalar(f"val/{k}", v, p.global_step)
            writer.add_scalar("train/epoch_loss", loss, p.global_step)
            writer.flush()
        example = next(iter(hyps.items()), None)
        left = self.cfg.epochs - p.epoch
        self.log(f"epoch {p.epoch}: loss {loss:.3f}{_loss_parts(parts, self.cfg.alpha_c)}, "
                 f"{record['captions_per_s']:.0f} captions/s ({wait_share:.0%} waiting for data), "
                 + ", ".join(f"{k} {v:.3f}" for k, v in scores.items() if k in ("BLEU-4", "CIDEr"))
                 + (" (best)" if improved else "")
                 + (f"; {left} of {self.cfg.epochs} epochs to go, run ETA {_duration(self._run_eta(total_steps))}"
                    if left else "")
                 + (f"  e.g. {example[0]}: {' '.join(example[1])}" if example else ""))
        if improved:
            self.save("best", metrics=scores)
        self.save()
        write_jsonl_atomic(self.out_dir / "metrics.jsonl", p.history)

    def _summary(self, stopped: str) -> dict:
        p = self.progress
        best = p.history[p.best_epoch - 1] if p.best_epoch > 0 else None
        return {"stopped": stopped, "epochs": p.epoch, "steps": p.global_step, "best_epoch": p.best_epoch,
                "best_val": best["val"] if best else {}, "out_dir": str(self.out_dir),
                "device": str(self.device), "precision": self.precision,
                "data_wait_share": p.history[-1].get("data_wait_share") if p.history else None}


def train(data_dir: str | os.PathLike, out_dir: str | os.PathLike, *, model_config: dict | None = None,
          train_config: TrainConfig | None = None, features: str | None = None, progress: bool = True,
          stop_after_steps: int | None = None, log=print, encoder: ImageEncoder | None = None,
          device: str | torch.device = "auto", precision: str = "auto", prefetch: bool | None = None) -> dict:
    """Train (or resume, when out_dir holds a checkpoint) a captioner on DATA_DIR's cached features, or with
    train_config.finetune_blocks > 0 end to end on its images (encoder: the base CNN of a random-weight store).
    device / precision: "auto" (CUDA when torch sees it, bf16 there), "cpu", "cuda:N"... / "fp32", "bf16", "fp16"."""
    trainer = Trainer(data_dir, out_dir, model_config, train_config, features, log, encoder, device=device,
                      precision=precision, prefetch=prefetch)
    return trainer.train(progress_bar=progress, stop_after_steps=stop_after_steps)


def _adam(groups: list[dict], cfg: TrainConfig) -> torch.optim.Adam:
    """Adam with fused kernels where torch has them for the parameters' device (CPU, CUDA): one kernel per
    parameter for the whole update, 4-5x faster than the default foreach Adam on the CPU; else the default."""
    try:
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except RuntimeError:  # "`fused=True` requires all the params to be ... of supported devices"
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _loss_parts(parts: dict[str, float], alpha_c: float) -> str:
    """' (xent 2.850 + 1.0 x penalty 0.360)': what the cross-entropy loss is made of ('' for SCST)."""
    if "xent" not in parts or "attention_penalty" not in parts:
        return ""
    hard = " + REINFORCE terms" if "reward" in parts else ""  # hard attention (model.caption_loss)
    return f" (xent {parts['xent']:.3f} + {alpha_c:g} x penalty {parts['attention_penalty']:.3f}{hard})"


def _duration(seconds: float) -> str:
    """45 -> '45 s', 720 -> '12 min', 7500 -> '2 h 05 min'."""
    if seconds < 59.5:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def _feeding_thread(device: torch.device, store: FeatureStore) -> bool:
    """Whether batches are read in a feeding thread when the caller does not say (Trainer's prefetch)."""
    if device.type == "cuda":
        return True
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return False
    return store.features.nbytes > memory / 4


def _store_of(meta: dict, data_dir: Path) -> str | None:
    """The feature store a checkpoint (its meta) trained on, when DATA_DIR has one of that name (None: choose as
    usual)."""
    data = meta.get("data")
    name = data.get("features") if isinstance(data, dict) else None
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.]+(-[A-Za-z0-9_.]+)*-[0-9]{1,5}", name):
        return None  # a store name as `imcap features` writes it, e.g. efficientnet-lite2-448
    return name if (data_dir / "features" / name / "index.json").is_file() else None


def _split_store_name(name: str | None) -> tuple[str | None, int | None]:
    """'efficientnet-lite0-224' -> ('efficientnet-lite0', 224); None -> (None, None)."""
    if not name:
        return None, None
    encoder, _, size = name.rpartition("-")
    return encoder, int(size)
