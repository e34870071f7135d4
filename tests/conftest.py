import os
from pathlib import Path

import pytest
import torch

# Small matmuls are far slower with 2 threads when the other core is busy: tests use one.
torch.set_num_threads(1)

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
