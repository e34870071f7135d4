"""Which device and precision a command computes in: `--device {auto,cpu,cuda,cuda:N,mps}` and
`--precision {auto,fp32,bf16,fp16}`, resolved once at the edge and passed down (nothing below assumes one).

    device = resolve_device("auto")                    # CUDA when torch sees it, else the CPU
    precision = resolve_precision("auto", device)      # bf16 on CUDA devices that support it, else fp32
    with autocast(device, precision): ...              # mixed precision for the forward pass; a no-op for fp32

Under torchrun with CUDA, "auto" and "cuda" mean this process's own GPU, cuda:$LOCAL_RANK.
Checkpoints stay device-free: weights are saved from and loaded to the CPU, then moved.
"""

from __future__ import annotations

import contextlib
import os

import torch

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """The torch.device for `name`; ValueError in one line when it is not there."""
    if isinstance(name, torch.device):
        return name
    name = (name or "auto").strip().lower()
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and local_rank is not None:
        name = f"cuda:{local_rank}"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown device {name!r}: use {DEVICE_CHOICES}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise ValueError(f"device {name}: torch {torch.__version__} ({build}) sees no CUDA device; "
                             f"use --device cpu, or install the CUDA build of torch")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {name}: there {'is' if count == 1 else 'are'} only {count} CUDA "
                             f"device{'s' if count != 1 else ''} (cuda:0{f'..cuda:{count - 1}' if count > 1 else ''})")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ValueError(f"device {name}: MPS (Apple GPU) is not available here")
    elif device.type != "cpu":
        raise ValueError(f"device {name}: imcap runs on {DEVICE_CHOICES}")
    return device


def resolve_precision(precision: str | None, device: torch.device) -> str:
    """"fp32", "bf16" or "fp16" for `device`: "auto" is bf16 on CUDA devices that support it, else fp32."""
    precision = (precision or "auto").lower()
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: use {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("precision fp16 needs a GPU (CPU autocast computes in bf16): use bf16 or fp32 on the CPU")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"precision bf16: {torch.cuda.get_device_name(device)} does not support it; use fp16 or fp32")
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """torch.autocast for bf16/fp16 on `device`; nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


@contextlib.contextmanager
def ieee_convolutions(device: torch.device, precision: str):
    """fp32 that is fp32 on CUDA: cuDNN convolutions without TF32 (a 10-bit mantissa, as coarse as the float16
    feature store), so that a grid computed on a GPU, for the store or for a photo being captioned, equals the
    CPU's up to rounding. benchmarks/gpu.py's extract section measures what it costs."""
    if device.type != "cuda" or precision != "fp32":
        yield
        return
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = old


def describe(device: torch.device) -> str:
    """"cuda:0 (NVIDIA H200)" or "cpu (2 threads)", for logs."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return str(device)
