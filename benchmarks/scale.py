"""The scale rehearsal: prepare, store, train and evaluate at MS-COCO's and AI Challenger's size.

    .venv/bin/python benchmarks/scale.py                 # COCO Karpathy size and AI Challenger size
    .venv/bin/python benchmarks/scale.py --quick         # 1/50 of each (seconds): what CI runs
    .venv/bin/python benchmarks/scale.py --out benchmarks/scale-results.json

Nothing here can hold those photos, so the rehearsal keeps the real shapes with stand-ins:
- coco: a Karpathy-format JSON of 123,287 images (113,287 train / 5,000 val / 5,000 test), 5 captions each,
  resampled (seeded) from the real captions of ../shared/data/coco2017-mini; every image file is a hard link
  to one small JPEG, so the image checks run for real on 123,287 paths;
- aic: an AI Challenger-format JSON of 240,000 images (the train file), 5 untokenized Chinese captions each,
  resampled from ../shared/data/aic-mini's train file, with hard-linked images as above.
Then, on the COCO DATA_DIR:
- store: a feature store of its size, 7x7x1280 float16 (15 GB), written directly with random features (the
  CNN is not what is measured), and the same for a Flickr8k-sized DATA_DIR (7,091 of its images);
- train: the flickr8k preset's model (256/512/512), batch 128, a fixed number of steps from each store: the
  setup time, captions/s and peak resident memory, big store against small, and one validation as an epoch end runs it (greedy, the first 5,000 val images: the --val-images default);
- scst: the same model trained by SCST (10 images a step, 5 samples at temperature 0.5, mean baseline) from
  the big store: its setup (CIDEr-D document frequencies of all 113,287 training images), steps and peak;
- evaluate: `imcap evaluate --split test --beam 3` over the 5,000 test images with every metric.
Each stage runs in its own process; the table gives its wall time and peak resident memory (os.wait4; for
training also the peak of its anonymous part, without the store's file pages), and the JSON the figures with
the machine's load before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import cpu_model, loadavg  # noqa: E402

SHARED = Path(os.environ.get("IMCAP_SHARED_DATA", REPO.parent / "shared" / "data"))
COCO_SPLITS = (113_287, 5_000, 5_000)
AIC_IMAGES = 240_000
TARGETS = {"coco": (120, 2048), "aic": (240, 3072)}  # seconds, MiB (the issue's targets)
FLICKR8K_IMAGES = 7_091
TRAIN_STEPS = 60
SCST_STEPS = 10  # of 10 images, 5 samples each

_WRITE_STORE = """
import json, sys, numpy as np
from imcap.encoders import encoder_spec
from imcap.features import DONE, open_for_writing, read_image_list, store_dir, _Rows
data, n_chunk = sys.argv[1], 256
spec = encoder_spec("efficientnet-lite0", 224)
_, files = read_image_list(data)
path = store_dir(data, spec.name, 224)
status, index = open_for_writing(path, spec, files)
rows = _Rows(path / "features.f16", index)
base = (np.random.default_rng(0).standard_normal((n_chunk, 49, 1280), dtype=np.float32) * 0.5).astype(np.float16)
for k, start in enumerate(range(0, len(files), n_chunk)):  # rows differ from chunk to chunk by a roll (cheap)
    part = list(range(start, min(start + n_chunk, len(files))))
    rows.write(part, np.roll(base, k, axis=0)[: len(part)])
rows.close()
status[:] = DONE
(path / "status.u8").write_bytes(status.tobytes())
"""

# Started first in the training children: the peak of anonymous resident memory (heap, tensors), which
# ru_maxrss does not separate from the pages of the memory-mapped store it has read (file pages, which the
# kernel reclaims when memory is short)
_ANON_PEAK = """
import threading, time
ANON_PEAK = [0]
def _sample():
    while True:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    ANON_PEAK[0] = max(ANON_PEAK[0], int(line.split()[1]) // 1024)
        time.sleep(0.2)
threading.Thread(target=_sample, daemon=True).start()
"""

_TRAIN = _ANON_PEAK + """
import json, sys, time, torch
from imcap.captions import DecodingOptions
from imcap.train import Trainer, TrainConfig, validate
torch.set_num_threads(1)
data, out, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
t = time.perf_counter()
trainer = Trainer(data, out, {"embed_dim": 256, "hidden_dim": 512, "attention_dim": 512, "dropout": 0.5},
                  TrainConfig(epochs=1, batch_size=128, lr=1e-3, warmup_steps=10, alpha_c=0.0), log=lambda *a: None,
                  device="cpu")
setup = time.perf_counter() - t
t = time.perf_counter()
trainer.train(progress_bar=False, stop_after_steps=steps)
seconds = time.perf_counter() - t
p = trainer.progress
t = time.perf_counter()  # one validation as an epoch end runs it: greedy, the first cfg.val_images images
scores, hyps = validate(trainer.model, trainer.images, trainer.store, trainer.vocab,
                        DecodingOptions(beam_size=trainer.cfg.val_beam, max_length=trainer.cfg.val_max_length),
                        trainer.cfg.val_images)
print(json.dumps({"setup_seconds": round(setup, 1), "steps": steps, "steps_seconds": round(seconds, 1),
                  "captions_per_s": round(steps * 128 / seconds, 1), "train_captions": len(trainer.objective),
                  "feeding_thread": trainer.prefetch,
                  "data_wait_share": round(p.epoch_wait_seconds / max(p.epoch_seconds, 1e-9), 4),
                  "val_images": len(hyps), "val_seconds": round(time.perf_counter() - t, 1),
                  "anon_peak_mib": ANON_PEAK[0]}))
"""

_SCST = _ANON_PEAK + """
import json, sys, time, torch
from imcap.train import Trainer, TrainConfig
torch.set_num_threads(1)
data, out, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
t = time.perf_counter()  # includes the CIDEr-D document frequencies of every training image's references
trainer = Trainer(data, out, {"embed_dim": 256, "hidden_dim": 512, "attention_dim": 512, "dropout": 0.5},
                  TrainConfig(epochs=1, batch_size=10, lr=5e-5, lr_schedule="constant", warmup_steps=0,
                              objective="scst", scst_samples=5, scst_baseline="mean", scst_temperature=0.5,
                              val_images=0), log=lambda *a: None, device="cpu")
setup = time.perf_counter() - t
t = time.perf_counter()
trainer.train(progress_bar=False, stop_after_steps=steps)
seconds = time.perf_counter() - t
print(json.dumps({"setup_seconds": round(setup, 1), "train_images": len(trainer.objective),
                  "document_frequencies": len(trainer.objective.cider.document_frequency), "steps": steps,
                  "steps_seconds": round(seconds, 1), "images_per_s": round(steps * 10 / seconds, 2),
                  "anon_peak_mib": ANON_PEAK[0]}))
"""


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


def _run(cmd: list[str]) -> tuple[float, float, int, str]:
    """(wall seconds, peak resident MiB, exit status, the last line it printed) of a child process."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        out.seek(0), err.seek(0)
        printed, problem = out.read().decode(errors="replace").strip(), err.read().decode(errors="replace").strip()
    code = os.waitstatus_to_exitcode(status)
    if code not in (0, 1):
        raise SystemExit(f"scale.py: {' '.join(cmd[-6:])} failed ({code}): {problem[-500:]}")
    return seconds, usage.ru_maxrss / 1024, code, (printed.splitlines() or [""])[-1]


def _small_data_dir(data: Path, small: Path, n: int) -> int:
    """A DATA_DIR of the first n images of `data` (its train images first, then val), same vocabulary; -> images."""
    meta = json.loads((data / "dataset.json").read_text(encoding="utf-8"))
    images = meta["images"]
    keep = [im for im in images if im["split"] == "train"][: n - n // 7] + [im for im in images if im["split"] == "val"][: n // 7]
    small.mkdir()
    (small / "dataset.json").write_text(json.dumps({**meta, "images": keep}), encoding="utf-8")
    (small / "vocab.json").write_bytes((data / "vocab.json").read_bytes())
    return len(keep)


def _du(path: Path) -> int:
    return sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file())


def _make(stage: str, root: Path, scale: float) -> dict:
    """Run in a child process (--make), so that this process stays small: Linux counts the RSS a process had
    when it forked into its child's peak (ru_maxrss), which would inflate every figure measured after it."""
    cmd = [sys.executable, __file__, "--make", stage, str(root), repr(scale)]
    return json.loads(_run(cmd)[3])


def _make_here(stage: str, root: Path, scale: float) -> dict:
    t = time.perf_counter()
    if stage == "small":  # root: the COCO stage's folder
        n = _small_data_dir(root / "data", root / "small", max(7, round(FLICKR8K_IMAGES * scale)))
        return {"images": n}
    source, n = (make_coco if stage == "coco" else make_aic)(root, scale)
    return {"source": str(source), "images": n, "seconds": round(time.perf_counter() - t, 1),
            "json_mb": round(source.stat().st_size / 2**20, 1)}


def main(argv: list[str] | None = None) -> int:
    if argv is None and sys.argv[1:2] == ["--make"]:  # the child of _make
        print(json.dumps(_make_here(sys.argv[2], Path(sys.argv[3]), float(sys.argv[4]))))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1/50 of each size (seconds; what CI runs)")
    p.add_argument("--stages", default="coco,store,train,scst,evaluate,aic",
                   help="comma-separated: coco, store, train, scst, evaluate (these four need coco), aic")
    p.add_argument("--out", help="write the figures as JSON here")
    p.add_argument("--work", help="folder for the generated files (default: a temporary one, removed after)")
    a = p.parse_args(argv)
    if not (SHARED / "coco2017-mini").is_dir() or not (SHARED / "aic-mini").is_dir():
        raise SystemExit(f"scale.py: needs {SHARED}/coco2017-mini and aic-mini (set IMCAP_SHARED_DATA)")
    scale = 1 / 50 if a.quick else 1.0
    stages = [s for s in a.stages.split(",") if s]
    results = {"quick": a.quick, "cpu": cpu_model(), "cpus": os.cpu_count(),
               "load_before": loadavg(), "stages": {}}
    with tempfile.TemporaryDirectory(dir=a.work) as tmp:
        for stage in [s for s in stages if s in ("coco", "aic")]:
            root = Path(tmp) / stage
            root.mkdir()
            made = _make(stage, root, scale)
            source, n = Path(made["source"]), made["images"]
            fmt = "karpathy" if stage == "coco" else "aic"
            extra = ["--images", str(root / "images")] if stage == "coco" else []
            cmd = [sys.executable, "-m", "imcap", "prepare", "--format", fmt, str(source), "--out", str(root / "data"),
                   "--quiet", *extra]
            seconds, rss, code, _ = _run(cmd)
            report = json.loads((root / "data" / "report.json").read_text(encoding="utf-8"))
            results["stages"][stage] = {
                "images": n, "captions": report["captions"], "json_mb": made["json_mb"],
                "generate_seconds": made["seconds"], "prepare_seconds": round(seconds, 1),
                "prepare_peak_mib": round(rss), "exit_status": code, "vocab_size": report["vocab_size"],
                "splits": report["splits"], "dataset_json_mb": round((root / "data/dataset.json").stat().st_size / 2**20, 1),
            }
            if stage == "aic":
                continue
            data, small = root / "data", root / "small"
            if "store" in stages:
                _make("small", root, scale)
                for name, d in (("store", data), ("store_small", small)):
                    seconds, rss, code, _ = _run([sys.executable, "-c", _WRITE_STORE, str(d)])
                    results["stages"][name] = {"seconds": round(seconds, 1), "peak_mib": round(rss),
                                               "bytes_on_disk": _du(d / "features"), "exit_status": code}
            if "train" in stages:
                steps = TRAIN_STEPS if not a.quick else 3
                for name, d in (("train", data), ("train_small", small)):
                    seconds, rss, code, line = _run([sys.executable, "-c", _TRAIN, str(d), str(root / f"run-{name}"),
                                                     str(steps)])
                    results["stages"][name] = {**json.loads(line), "seconds": round(seconds, 1), "peak_mib": round(rss),
                                               "exit_status": code}
            if "scst" in stages:
                seconds, rss, code, line = _run([sys.executable, "-c", _SCST, str(data), str(root / "run-scst"),
                                                 str(SCST_STEPS if not a.quick else 2)])
                results["stages"]["scst"] = {**json.loads(line), "seconds": round(seconds, 1), "peak_mib": round(rss),
                                             "exit_status": code}
            if "evaluate" in stages:
                seconds, rss, code, line = _run([sys.executable, "-m", "imcap", "evaluate", str(root / "run-train"),
                                                 "--data", str(data), "--split", "test", "--beam", "3", "--threads", "1",
                                                 "--json"])
                results["stages"]["evaluate"] = {"images": report["splits"]["test"], "seconds": round(seconds, 1),
                                                 "peak_mib": round(rss), "exit_status": code, "scores": json.loads(line)}
    results["load_after"] = loadavg()
    print(f"scale rehearsal{' (quick: 1/50)' if a.quick else ''}; load before {results['load_before']}, "
          f"after {results['load_after']}")
    print(f"{'stage':6s} {'images':>9s} {'captions':>10s} {'JSON MB':>8s} {'prepare s':>10s} {'peak MiB':>9s}  target")
    for stage in ("coco", "aic"):
        if stage in results["stages"]:
            r, (secs, mib) = results["stages"][stage], TARGETS[stage]
            print(f"{stage:6s} {r['images']:9,d} {r['captions']:10,d} {r['json_mb']:8.1f} {r['prepare_seconds']:10.1f} "
                  f"{r['prepare_peak_mib']:9,d}  <= {secs} s, <= {mib:,} MiB (full size)")
    st = results["stages"]
    for name in ("store", "store_small"):
        if name in st:
            print(f"{name:12s} {st[name]['bytes_on_disk'] / 1e9:7.2f} GB on disk, written in {st[name]['seconds']:.1f} s, "
                  f"peak {st[name]['peak_mib']:,} MiB")
    for name in ("train", "train_small"):
        if name in st:
            r = st[name]
            print(f"{name:12s} {r['train_captions']:,} captions: setup {r['setup_seconds']:.1f} s, {r['steps']} steps at "
                  f"{r['captions_per_s']:.1f} captions/s ({r['data_wait_share']:.0%} waiting for data, feeding thread "
                  f"{'on' if r['feeding_thread'] else 'off'}), peak {r['peak_mib']:,} MiB "
                  f"({r['anon_peak_mib']:,} MiB anonymous, the rest pages of the store)")
    if "train" in st and "train_small" in st:
        print(f"{'':12s} captions/s big store / small store: {st['train']['captions_per_s'] / st['train_small']['captions_per_s']:.3f}")
    for name in ("train", "train_small"):
        if name in st:
            r = st[name]
            epoch = r["train_captions"] / r["captions_per_s"]
            print(f"{name:12s} validation of {r['val_images']:,} images (greedy): {r['val_seconds']:.1f} s, "
                  f"{r['val_seconds'] / (epoch + r['val_seconds']):.1%} of an epoch ({epoch / 60:.0f} min)")
    if "scst" in st:
        r = st["scst"]
        print(f"{'scst':12s} {r['train_images']:,} images: setup {r['setup_seconds']:.1f} s "
              f"({r['document_frequencies']:,} n-grams' document frequencies), {r['steps']} steps at "
              f"{r['images_per_s']:.2f} images/s, peak {r['peak_mib']:,} MiB ({r['anon_peak_mib']:,} MiB anonymous)")
    if "evaluate" in st:
        r = st["evaluate"]
        print(f"{'evaluate':12s} {r['images']:,} test images, beam 3, every metric: {r['seconds']:.1f} s, "
              f"peak {r['peak_mib']:,} MiB")
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
