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


def test_two_processes_extract_the_same_features(tmp_path):
    from imcap.datasets import prepare
    from imcap.features import FeatureStore
    from imcap.synth import make_scenes

    scenes = make_scenes(tmp_path / "scenes", n_images=12, seed=4, image_size=64, progress=False)
    for name in ("one", "two"):
        prepare(scenes, "karpathy", tmp_path / name, min_count=1, progress=False)
    (tmp_path / "scenes/images/scene_00003.png").write_text("broken")  # one bad image: reported, not fatal
    one = subprocess.run([sys.executable, "-m", "imcap", "features", str(tmp_path / "one"), "--image-size", "64",
                          "--quiet", "--threads", "1"], capture_output=True, text=True, timeout=300)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "imcap", "features", str(tmp_path / "two"), "--image-size", "64", "--quiet"],
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 1 and two.returncode != 0  # the broken image makes both report a failure
    a, b = FeatureStore.open(tmp_path / "one"), FeatureStore.open(tmp_path / "two")
    assert (a.status == b.status).all() and int((b.status == 2).sum()) == 1 and int((b.status == 1).sum()) == 11
    assert torch.allclose(torch.from_numpy(a.features[:].astype("float32")), torch.from_numpy(b.features[:].astype("float32")), atol=1e-2)
    assert not list((tmp_path / "two/features").glob("*/status.rank*"))
