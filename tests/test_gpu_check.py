"""benchmarks/gpu.py, the GPU check, in its CPU smoke mode: every section runs and the JSON has its figures."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_gpu_check_runs_on_the_cpu_and_reports_every_section(tmp_path):
    out = tmp_path / "gpu.json"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks/gpu.py"), "--device", "cpu", "--out", str(out)],
                            capture_output=True, text=True, timeout=600, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    sections = report["sections"]
    assert set(sections) == {"tests", "parity", "train", "coco", "beam", "extract", "feed", "profile"}
    assert not [name for name, r in sections.items() if "error" in r]
    assert sections["tests"]["ok"] and "passed" in sections["tests"]["summary"]
    assert sections["parity"]["fp32_logits_max_abs_diff"] == 0.0  # the CPU against itself
    assert sections["parity"]["beam3_identical_share"] == 1.0
    train = sections["train"]["8"]
    assert train["fp32"]["captions_per_s"] > 0 and train["baseline"]["captions_per_s"] > 0 and "ratio" in train["bf16"]
    assert sections["coco"]["fp32"]["epoch_minutes"] > 0 and sections["beam"]["images_per_s"] > 0
    assert 0 < sections["extract"]["decode_share_one_thread"] < 1
    assert all(0 <= sections["feed"][v]["data_wait_share"] < 1 for v in ("inline", "prefetch"))
    assert sections["profile"]["wall_step_s"] > 0 and sections["profile"]["cpu_ops_per_step"] > 0
    assert sections["extract"]["tf32"]["images_per_s"] > 0 and sections["coco"]["larger_batches"]
    assert report["table"][0].startswith("imcap GPU check") and any("beam k=3" in line for line in report["table"])
