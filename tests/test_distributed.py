"""torchrun with 2 CPU processes (gloo) trains the same model as one process on the same data."""

import subprocess
import sys

import torch
from safetensors.torch import load_file

ARGS = ["--epochs", "2", "--batch-size", "16", "--lr", "3e-3", "--warmup-steps", "3", "--dropout", "0",
        "--embed-dim", "16", "--hidden-dim", "24", "--attention-dim", "16", "--seed", "3", "--quiet"]


def run(cmd, **kw):
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def test_two_processes_match_one(tiny_data, tmp_path):
    run([sys.executable, "-m", "imcap", "train", str(tiny_data), "--out", str(tmp_path / "one"), "--threads", "1", *ARGS])
    out = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "imcap", "train", str(tiny_data), "--out", str(tmp_path / "two"), *ARGS])
    assert out.stdout.count("training stopped") == 1  # rank 0 alone reports and writes
    one, two = load_file(tmp_path / "one/checkpoint/model.safetensors"), load_file(tmp_path / "two/checkpoint/model.safetensors")
    assert one.keys() == two.keys()
    for k in one:
        assert torch.allclose(one[k], two[k], atol=2e-4), k
    assert not any(p.name.startswith("rank") for p in (tmp_path / "two").iterdir())
