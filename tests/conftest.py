import os
from pathlib import Path

import pytest
import torch

# Small matmuls are far slower with 2 threads when the other core is busy: tests use one, and so do the
# imcap commands they run (in-process or as subprocesses), which follow OMP_NUM_THREADS when it is set.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    return Path(os.environ.get("IMCAP_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture
def shared_data() -> Path:
    """../shared/data (or $IMCAP_SHARED_DATA). Missing: fail in CI, skip elsewhere, saying so."""
    d = shared_data_dir()
    if not (d / "README.md").exists():
        msg = f"real data not found at {d} (set IMCAP_SHARED_DATA)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return d


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A DATA_DIR of 40 synthetic scenes (64 px) with features from a random-weight encoder (2x2 grid)."""
    from imcap.datasets import prepare
    from imcap.encoders import build_encoder
    from imcap.features import extract_features
    from imcap.synth import make_scenes

    root = tmp_path_factory.mktemp("tiny")
    scenes = make_scenes(root / "scenes", n_images=40, seed=1, image_size=64, progress=False)
    prepare(scenes, "karpathy", root / "data", min_count=1, progress=False)
    torch.manual_seed(0)
    extract_features(root / "data", encoder=build_encoder("efficientnet-lite0", 64, pretrained=False),
                     image_size=64, progress=False)
    return root / "data"


@pytest.fixture
def accelerator() -> torch.device:
    """$IMCAP_TEST_DEVICE, else CUDA when torch sees it; skipped, saying so, on a machine with neither.
    benchmarks/gpu.py runs the tests that take it on the GPU (tests/test_cuda*.py); with IMCAP_TEST_DEVICE=cpu
    they run on the CPU against the CPU, which checks the tests themselves (CI, through gpu.py --device cpu)."""
    name = os.environ.get("IMCAP_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "")
    if not name:
        pytest.skip("no accelerator: set IMCAP_TEST_DEVICE or run on a CUDA machine (benchmarks/gpu.py does)")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.fail(f"IMCAP_TEST_DEVICE={name}, but torch {torch.__version__} sees no CUDA device")
    return device
