"""benchmarks/scale.py, the scale rehearsal, in its quick mode (1/50 of COCO's and AI Challenger's size):
prepare both, a feature store of each size, a few training steps from each and a validation, a few SCST
steps, the test split evaluated."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.realdata
def test_the_quick_rehearsal_runs_every_stage_and_reports_time_and_memory(shared_data, tmp_path):
    out = tmp_path / "scale.json"
    env = {**os.environ, "IMCAP_SHARED_DATA": str(shared_data), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks/scale.py"), "--quick", "--out", str(out),
                           "--work", str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "coco" in done.stdout and "aic" in done.stdout  # the table
    stages = json.loads(out.read_text())["stages"]
    coco, aic = stages["coco"], stages["aic"]
    assert (coco["images"], coco["captions"], coco["splits"]) == (2466, 12330, {"train": 2266, "val": 100, "test": 100})
    assert (aic["images"], aic["captions"]) == (4800, 24000) and sum(aic["splits"].values()) == 4800
    assert all(s["exit_status"] == 0 for s in stages.values())
    assert all(stages[k]["prepare_seconds"] > 0 and stages[k]["prepare_peak_mib"] > 0 for k in ("coco", "aic"))
    assert stages["store"]["bytes_on_disk"] >= 2466 * 49 * 1280 * 2 > stages["store_small"]["bytes_on_disk"]
    assert stages["train"]["train_captions"] == 2266 * 5 and stages["train"]["captions_per_s"] > 0
    assert stages["train_small"]["captions_per_s"] > 0 and stages["train"]["peak_mib"] > 0
    assert stages["train"]["val_images"] == 100 and stages["train"]["val_seconds"] > 0  # the whole val split
    assert stages["scst"]["train_images"] == 2266 and stages["scst"]["document_frequencies"] > 0
    assert stages["scst"]["images_per_s"] > 0
    assert 0 < stages["train"]["anon_peak_mib"] <= stages["train"]["peak_mib"]
    assert stages["evaluate"]["images"] == 100 and set(stages["evaluate"]["scores"]) >= {"BLEU-4", "METEOR", "CIDEr"}
    assert list(tmp_path.iterdir()) == [out]  # the generated files are gone
