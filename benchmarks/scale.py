"""The scale rehearsal: `imcap prepare` on caption files of MS-COCO's and AI Challenger's size.

    .venv/bin/python benchmarks/scale.py                 # COCO Karpathy size and AI Challenger size
    .venv/bin/python benchmarks/scale.py --quick         # 1/50 of each (seconds): what CI runs
    .venv/bin/python benchmarks/scale.py --out benchmarks/scale-results.json

Nothing here can hold those photos, so the rehearsal keeps the real shapes with stand-ins:
- coco: a Karpathy-format JSON of 123,287 images (113,287 train / 5,000 val / 5,000 test), 5 captions each,
  resampled (seeded) from the real captions of ../shared/data/coco2017-mini; every image file is a hard link
  to one small JPEG, so the image checks run for real on 123,287 paths;
- aic: an AI Challenger-format JSON of 240,000 images (the train file), 5 untokenized Chinese captions each,
  resampled from ../shared/data/aic-mini's train file, with hard-linked images as above.
Each stage runs `imcap prepare` in its own process; the table gives its wall time and peak resident memory
(os.wait4), and the JSON the figures with the machine's load before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("IMCAP_SHARED_DATA", REPO.parent / "shared" / "data"))
COCO_SPLITS = (113_287, 5_000, 5_000)
AIC_IMAGES = 240_000
TARGETS = {"coco": (120, 2048), "aic": (240, 3072)}  # seconds, MiB (the targets)


def _one_jpeg(path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (32, 24), (120, 140, 90)).save(path, quality=80)


def _link_images(folder: Path, names: list[str]) -> None:
    """Every name a hard link to one small JPEG (a copy where the file system has no hard links)."""
    folder.mkdir(parents=True, exist_ok=True)
    source = folder.parent / "one.jpg"
    _one_jpeg(source)
    for name in names:
        try:
            os.link(source, folder / name)
        except OSError:
            (folder / name).write_bytes(source.read_bytes())


def make_coco(root: Path, scale: float, seed: int = 0) -> tuple[Path, int]:
    """root/karpathy.json + root/images/train2014/...; -> (the JSON, images)."""
    raws = [a["caption"] for a in json.loads((SHARED / "coco2017-mini/annotations/captions_val2017.json")
                                             .read_text(encoding="utf-8"))["annotations"]]
    rng = random.Random(seed)
    counts = [max(1, round(n * scale)) for n in COCO_SPLITS]
    splits = ["train"] * counts[0] + ["val"] * counts[1] + ["test"] * counts[2]
    names = [f"COCO_train2014_{i:012d}.jpg" for i in range(len(splits))]
    images = [{"filepath": "train2014", "filename": name, "imgid": i, "cocoid": i, "split": split,
               "sentids": list(range(5 * i, 5 * i + 5)),
               "sentences": [{"raw": (raw := rng.choice(raws).strip()), "tokens": raw.lower().rstrip(".").split(),
                              "imgid": i, "sentid": 5 * i + k} for k in range(5)]}
              for i, (name, split) in enumerate(zip(names, splits))]
    path = root / "karpathy.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}), encoding="utf-8")
    _link_images(root / "images" / "train2014", names)
    return path, len(names)


def make_aic(root: Path, scale: float, seed: int = 0) -> tuple[Path, int]:
    """root/caption_train_annotations_20170902.json + root/caption_train_images_20170902/...; -> (the JSON, images)."""
    folder = SHARED / "aic-mini/ai_challenger_caption_train_20170902"
    entries = json.loads(next(folder.glob("caption_train_annotations_*.json")).read_text(encoding="utf-8"))
    captions = [c for e in entries for c in e["caption"]]
    rng = random.Random(seed)
    n = max(1, round(AIC_IMAGES * scale))
    names = [f"{i:040x}.jpg" for i in range(n)]
    data = [{"url": f"http://example.invalid/{name}", "image_id": name, "caption": rng.sample(captions, 5)}
            for name in names]
    path = root / "caption_train_annotations_20170902.json"
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    _link_images(root / "caption_train_images_20170902", names)
    return path, n


def _run(cmd: list[str]) -> tuple[float, float, int]:
    """(wall seconds, peak resident MiB, exit status) of a child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    err = proc.stderr.read().decode(errors="replace").strip()
    code = os.waitstatus_to_exitcode(status)
    if code not in (0, 1):
        raise SystemExit(f"scale.py: {' '.join(cmd[-6:])} failed ({code}): {err[-500:]}")
    return seconds, usage.ru_maxrss / 1024, code


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1/50 of each size (seconds; what CI runs)")
    p.add_argument("--stages", default="coco,aic", help="comma-separated: coco, aic")
    p.add_argument("--out", help="write the figures as JSON here")
    p.add_argument("--work", help="folder for the generated files (default: a temporary one, removed after)")
    a = p.parse_args(argv)
    if not (SHARED / "coco2017-mini").is_dir() or not (SHARED / "aic-mini").is_dir():
        raise SystemExit(f"scale.py: needs {SHARED}/coco2017-mini and aic-mini (set IMCAP_SHARED_DATA)")
    scale = 1 / 50 if a.quick else 1.0
    stages = [s for s in a.stages.split(",") if s]
    results = {"quick": a.quick, "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
               "load_before": _loadavg(), "stages": {}}
    with tempfile.TemporaryDirectory(dir=a.work) as tmp:
        for stage in stages:
            root = Path(tmp) / stage
            root.mkdir()
            t = time.perf_counter()
            source, n = (make_coco if stage == "coco" else make_aic)(root, scale)
            made = time.perf_counter() - t
            fmt = "karpathy" if stage == "coco" else "aic"
            extra = ["--images", str(root / "images")] if stage == "coco" else []
            cmd = [sys.executable, "-m", "imcap", "prepare", "--format", fmt, str(source), "--out", str(root / "data"),
                   "--quiet", *extra]
            seconds, rss, code = _run(cmd)
            report = json.loads((root / "data" / "report.json").read_text(encoding="utf-8"))
            results["stages"][stage] = {
                "images": n, "captions": report["captions"], "json_mb": round(source.stat().st_size / 2**20, 1),
                "generate_seconds": round(made, 1), "prepare_seconds": round(seconds, 1),
                "prepare_peak_mib": round(rss), "exit_status": code, "vocab_size": report["vocab_size"],
                "splits": report["splits"], "dataset_json_mb": round((root / "data/dataset.json").stat().st_size / 2**20, 1),
            }
    results["load_after"] = _loadavg()
    print(f"scale rehearsal{' (quick: 1/50)' if a.quick else ''}; load before {results['load_before']}, "
          f"after {results['load_after']}")
    print(f"{'stage':6s} {'images':>9s} {'captions':>10s} {'JSON MB':>8s} {'prepare s':>10s} {'peak MiB':>9s}  target")
    for stage, r in results["stages"].items():
        secs, mib = TARGETS[stage]
        print(f"{stage:6s} {r['images']:9,d} {r['captions']:10,d} {r['json_mb']:8.1f} {r['prepare_seconds']:10.1f} "
              f"{r['prepare_peak_mib']:9,d}  <= {secs} s, <= {mib:,} MiB (full size)")
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
