"""Device and precision names as the CLI and the API take them."""

import pytest
import torch

from imcap.devices import autocast, ieee_convolutions, resolve_device, resolve_precision


def test_auto_is_the_cpu_without_cuda_and_cpu_is_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") == resolve_device(None) == resolve_device("CPU")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize("name, words", [
    ("cuda", "sees no CUDA device; use --device cpu, or install the CUDA build of torch"),
    ("cuda:1", "sees no CUDA device"),
    ("tpu", "unknown device 'tpu': use auto, cpu, cuda, cuda:N or mps"),
    ("cuda:x", "unknown device 'cuda:x'"),
])
def test_a_device_that_is_not_there_is_one_line(monkeypatch, name, words):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError) as e:
        resolve_device(name)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_a_gpu_index_past_the_last_gpu_is_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"device cuda:2: there are only 2 CUDA devices \(cuda:0..cuda:1\)"):
        resolve_device("cuda:2")


def test_under_torchrun_cuda_means_this_processs_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("auto") == torch.device("cuda", 3) == resolve_device("cuda")


def test_precision_auto_is_fp32_on_the_cpu_and_fp16_needs_a_gpu():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        resolve_precision("fp16", cpu)
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        resolve_precision("fp8", cpu)


def test_autocast_is_bf16_on_the_cpu_and_nothing_for_fp32():
    a, b = torch.rand(4, 4), torch.rand(4, 4)
    with autocast(torch.device("cpu"), "bf16"):
        assert (a @ b).dtype == torch.bfloat16
    with autocast(torch.device("cpu"), "fp32"):
        assert (a @ b).dtype == torch.float32


@pytest.mark.parametrize("device,precision,inside", [("cuda", "fp32", False), ("cuda", "bf16", True), ("cpu", "fp32", True)])
def test_fp32_convolutions_on_cuda_are_ieee_and_the_setting_comes_back(device, precision, inside):
    # cuDNN's default TF32 convolutions give another grid than the CPU's and the store's (benchmarks/gpu.py)
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    try:
        with ieee_convolutions(torch.device(device), precision):
            assert torch.backends.cudnn.allow_tf32 is inside
        assert torch.backends.cudnn.allow_tf32 is True
    finally:
        torch.backends.cudnn.allow_tf32 = old
