"""imcap's GPU check: one command, a table on stdout, the figures as JSON; no data download.

    python benchmarks/gpu.py                       # on a CUDA machine: the full check (about 70 s on one H200)
    python benchmarks/gpu.py --device cpu          # a smoke run of the same code with small sizes (CI runs it)

Sections (each one's failure is recorded and the others still run):
    tests     the device tests (tests/test_cuda*.py, tests/test_device.py) on this device, when pytest is there
    parity    the same random model on the CPU and on the device: teacher-forced logits in fp32 and bf16
              autocast (max abs difference), greedy and beam-3 captions on a fixed set (share identical)
    train     paper-scale training steps (196 x 2048 features, 512/512/512, vocabulary 10,000) at batch 32 and
              256: imcap's model vs the tutorial-style baseline of benchmarks/baseline.py on the same device,
              fp32 and bf16 autocast
    coco      a projected MS-COCO Karpathy epoch (113,287 images, 566,747 captions) at the flickr8k preset's
              shapes (7 x 7 x 1280 features, 256/512/512, batch 128, vocabulary 10,000) from measured steps,
              and the same at batch 256, 512 and 1024 in bf16 (a launch-bound step costs about the same at any batch)
    beam      beam search k = 3 over 5,000 images (images/s)
    extract   EfficientNet-Lite0 at 224 px, fp32 (as imcap extracts), TF32 and bf16 channels-last (images/s,
              grid difference from fp32), and the
              CPU time to decode and resize a COCO-sized JPEG (the share of extraction spent decoding)
    profile   one training step at the flickr8k preset's shapes under torch.profiler: wall time against the device's
              busy time (kernels and copies summed) and the ops launched per step
    feed      the Trainer itself on a synthetic feature store (random 7 x 7 x 1280 features on disk, the flickr8k
              preset's model at batch 128): the share of step time the training thread waits for batches, with
              and without the feeding thread
Peak GPU memory is given per section. Figures are from random weights and inputs: speed, not quality.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from baseline import TutorialDecoder  # noqa: E402
from run import TRAIN_SETUPS, TrainSetup, decoding_features, decoding_model, train_batches  # noqa: E402

from imcap.decoding import DecodingOptions, decode  # noqa: E402
from imcap.devices import autocast, ieee_convolutions  # noqa: E402
from imcap.model import ModelConfig, ShowAttendTell, caption_loss  # noqa: E402

COCO_IMAGES, COCO_CAPTIONS = 113_287, 566_747  # Karpathy train (+ restval) split
COCO_SETUP = TrainSetup(ModelConfig(vocab_size=10_000, feature_dim=1280, embed_dim=256, hidden_dim=512,
                                    attention_dim=512), 49, 128)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Seconds per call of fn, after one untimed warm-up call."""
    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats


def peak_memory_mib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None


# ------------------------------------------------------------------------------------------------ sections


def section_tests(args, device: torch.device) -> dict:
    try:
        import pytest  # noqa: F401
    except ImportError:
        return {"skipped": "pytest is not installed here"}
    env = {**os.environ, "IMCAP_TEST_DEVICE": str(device)}
    files = [str(REPO / "tests" / "test_device.py"), *map(str, sorted((REPO / "tests").glob("test_cuda*.py")))]
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", *files],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    last = (out.stdout.strip().splitlines() or [""])[-1]
    result = {"returncode": out.returncode, "summary": last, "ok": out.returncode == 0}
    if out.returncode != 0:  # what failed, for the report (the table gives only the summary line)
        result["output_tail"] = (out.stdout + out.stderr)[-6000:]
    return result


def section_parity(args, device: torch.device) -> dict:
    """CPU vs device on the same weights and inputs."""
    n = 200 if not args.quick else 16
    model = decoding_model()  # imcap's default model, made to write captions of varied lengths
    features = decoding_features(n)  # (n, 49, 1280)
    batch = train_batches(TrainSetup(model.config, 49, 40), per_image=5, n=1)[0]
    moved = [x.to(device) for x in batch]
    twin = decoding_model().to(device)
    with torch.no_grad():
        cpu_logits = model(*batch)[0]
        dev_logits = twin(*moved)[0].float().cpu()
        with autocast(device, "bf16"):
            bf16_logits = twin(*moved)[0].float().cpu()
    out = {"fp32_logits_max_abs_diff": (cpu_logits - dev_logits).abs().max().item(),
           "bf16_logits_max_abs_diff": (cpu_logits - bf16_logits).abs().max().item(),
           "logit_scale": cpu_logits.abs().max().item(), "images": n}
    for k in (1, 3):
        options = DecodingOptions(beam_size=k)
        cpu = [h[0].tokens for h in decode(model, features, options)]
        dev = [h[0].tokens for h in decode(twin, features.to(device), options)]
        out[f"beam{k}_identical_share"] = sum(a == b for a, b in zip(cpu, dev)) / n
    out["ok"] = out["fp32_logits_max_abs_diff"] <= 1e-4 or device.type == "cpu"
    return out


def train_step_fn(module, optimizer, batch, device: torch.device, precision: str) -> Callable[[], None]:
    features, captions, lengths, image_index = batch

    def step() -> None:
        with autocast(device, precision):
            logits, alphas = module(features, captions, lengths, image_index)[:2]  # (B, T, V), (B, T, P)
        loss, _ = caption_loss(logits.float(), captions[:, 1:], alphas.float(), lengths)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 5.0)
        optimizer.step()

    return step


def measure_training(setup: TrainSetup, batch_size: int, device: torch.device, repeats: int,
                     variants: tuple[str, ...]) -> dict:
    """Captions/s of imcap's model (fp32, bf16 autocast) and the baseline, on the same batch."""
    setup = TrainSetup(setup.config, setup.positions, batch_size)
    batch = [x.to(device) for x in train_batches(setup, per_image=1, n=1)[0]]
    torch.manual_seed(0)
    model = ShowAttendTell(setup.config).to(device).train()
    out: dict = {"batch": batch_size}
    for variant in variants:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if variant == "baseline":
            module = TutorialDecoder(model).to(device).train()
            f, c, l, i = batch
            inputs = (f[i], c, l, None)  # the tutorial's one copy of the features per caption
            optimizer = torch.optim.Adam(module.parameters(), lr=4e-4)
            precision = "fp32"
        else:
            module, inputs, precision = model, batch, variant
            optimizer = torch.optim.Adam(module.parameters(), lr=4e-4, fused=True)
        seconds = timed(train_step_fn(module, optimizer, inputs, device, precision), device, repeats)
        out[variant] = {"step_s": round(seconds, 5), "captions_per_s": round(batch_size / seconds, 1),
                        "peak_mib": peak_memory_mib(device)}
    for variant in variants:
        if variant != "baseline" and "baseline" in out:
            out[variant]["ratio"] = round(out["baseline"]["step_s"] / out[variant]["step_s"], 2)
    return out


def section_train(args, device: torch.device) -> dict:
    setup = TRAIN_SETUPS["paper"]
    if args.quick:
        setup = TrainSetup(ModelConfig(vocab_size=500, feature_dim=64, embed_dim=32, hidden_dim=32,
                                       attention_dim=32), 16, 8)
    batches = (32, 256) if not args.quick else (8,)
    return {str(b): measure_training(setup, b, device, 3 if args.quick else 10, ("fp32", "bf16", "baseline"))
            for b in batches}


def section_coco(args, device: torch.device) -> dict:
    setup = COCO_SETUP if not args.quick else TrainSetup(ModelConfig(vocab_size=500, feature_dim=64), 16, 16)
    out = measure_training(setup, setup.batch, device, 3 if args.quick else 20, ("fp32", "bf16"))
    for precision in ("fp32", "bf16"):
        steps = COCO_CAPTIONS / setup.batch
        out[precision]["epoch_minutes"] = round(steps * out[precision]["step_s"] / 60, 2)
    out["note"] = (f"{COCO_CAPTIONS:,} captions of {COCO_IMAGES:,} images at batch {setup.batch}, from the measured "
                   f"step time; validation and data loading not included")
    out["larger_batches"] = {}
    for batch in ((256, 512, 1024) if not args.quick else (32,)):
        m = measure_training(setup, batch, device, 3 if args.quick else 10, ("bf16",))["bf16"]
        m["epoch_minutes"] = round(COCO_CAPTIONS / batch * m["step_s"] / 60, 2)
        out["larger_batches"][str(batch)] = m
    return out


def section_profile(args, device: torch.device) -> dict:
    """Where one training step's wall time goes at the flickr8k preset's shapes (batch 128, bf16 on CUDA): the
    device's busy time (kernels and copies, summed) against the wall time, and the kernels launched."""
    from torch.profiler import ProfilerActivity, profile

    setup = COCO_SETUP if not args.quick else TrainSetup(ModelConfig(vocab_size=500, feature_dim=64), 16, 16)
    batch = [x.to(device) for x in train_batches(setup, per_image=1, n=1)[0]]
    torch.manual_seed(0)
    model = ShowAttendTell(setup.config).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=4e-4, fused=True)
    precision = "bf16" if device.type == "cuda" else "fp32"
    step = train_step_fn(model, optimizer, batch, device, precision)
    steps = 5 if not args.quick else 2
    wall = timed(step, device, steps)  # without the profiler, which adds to every op's CPU time
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    events = [e for e in prof.events() if e.device_type.name == "CUDA"]
    busy = sum(e.time_range.elapsed_us() for e in events) / 1e6 / steps
    out = {"batch": setup.batch, "precision": precision, "wall_step_s": round(wall, 5),
           "device_busy_s": round(busy, 5), "device_busy_share": round(busy / wall, 3) if device.type == "cuda" else None,
           "device_ops_per_step": round(len(events) / steps), "steps": steps}
    out["cpu_ops_per_step"] = round(sum(1 for e in prof.events() if e.device_type.name == "CPU") / steps)
    return out


def section_beam(args, device: torch.device) -> dict:
    n = 5000 if not args.quick else 40
    model = decoding_model().to(device)
    features = decoding_features(n).to(device)
    options = DecodingOptions(beam_size=3)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    decode(model, features[:50], options)  # warm-up
    sync(device)
    start = time.perf_counter()
    hyps = [h for part in features.split(1000) for h in decode(model, part, options)]
    sync(device)
    seconds = time.perf_counter() - start
    words = sum(len(h[0].tokens) for h in hyps) / n
    return {"images": n, "decode_seconds": round(seconds, 3), "images_per_s": round(n / seconds, 1),
            "mean_words": round(words, 1), "chunk": 1000, "peak_mib": peak_memory_mib(device)}


def jpeg_decode_seconds(n: int) -> float:
    """CPU seconds per image to decode a 640 x 480 JPEG and resize it to 224 x 224 (one thread)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    pixels = (rng.random((480, 640, 3)) * 64 + np.linspace(0, 180, 640)[None, :, None]).astype("uint8")
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    data = buffer.getvalue()
    start = time.perf_counter()
    for _ in range(n):
        Image.open(io.BytesIO(data)).convert("RGB").resize((224, 224), Image.BICUBIC)
    return (time.perf_counter() - start) / n


def section_extract(args, device: torch.device) -> dict:
    from imcap.encoders import build_encoder

    batch, repeats = (256, 10) if not args.quick else (4, 2)
    encoder = build_encoder("efficientnet-lite0", 224, pretrained=True).to(device).eval()
    pixels = torch.rand(batch, 3, 224, 224, device=device)
    out: dict = {"batch": batch}
    # fp32: what the feature store and the captioner compute (cuDNN without TF32, devices.ieee_convolutions);
    # tf32: cuDNN's default for fp32 convolutions; bf16-channels-last: the fastest, changes the grid most
    variants = (("fp32", "fp32", False, False), ("tf32", "fp32", False, True), ("bf16-channels-last", "bf16", True, True))
    with torch.inference_mode(), ieee_convolutions(device, "fp32"):
        reference = encoder(pixels).float()
    with torch.inference_mode():
        for name, precision, channels_last, tf32 in variants:
            x = pixels.contiguous(memory_format=torch.channels_last) if channels_last else pixels
            net = encoder.to(memory_format=torch.channels_last) if channels_last else encoder

            def run() -> torch.Tensor:
                with autocast(device, precision), (contextlib.nullcontext() if tf32 else ieee_convolutions(device, "fp32")):
                    return net(x)

            seconds = timed(run, device, repeats)
            grid = run().float()
            out[name] = {"images_per_s": round(batch / seconds, 1),
                         "grid_max_abs_diff": round((grid - reference).abs().max().item(), 5)}
    decode_s = jpeg_decode_seconds(20 if not args.quick else 3)
    best = max(v["images_per_s"] for v in out.values() if isinstance(v, dict))
    cores = os.cpu_count() or 1
    out["jpeg_decode_ms_per_image"] = round(decode_s * 1000, 2)
    out["decode_share_one_thread"] = round(decode_s / (decode_s + 1 / best), 3)
    out["decode_share_all_cores"] = round((decode_s / cores) / (decode_s / cores + 1 / best), 3)
    out["cores"] = cores
    out["grid_scale"] = round(reference.abs().max().item(), 3)
    return out


def synthetic_store(root: Path, images: int, image_size: int) -> Path:
    """A DATA_DIR of `images` synthetic scenes whose feature store holds random features of EfficientNet-Lite0
    at `image_size` (7 x 7 x 1280 at 224), written without running the CNN."""
    import numpy as np

    from imcap.datasets import prepare
    from imcap.encoders import encoder_spec
    from imcap.features import DONE, _Rows, open_for_writing, read_image_list, store_dir
    from imcap.fileio import write_bytes_atomic
    from imcap.synth import make_scenes

    scenes = make_scenes(root / "scenes", n_images=images, seed=0, image_size=32, progress=False)
    prepare(scenes, "karpathy", root / "data", min_count=1, progress=False)
    spec = encoder_spec("efficientnet-lite0", image_size)
    _, files = read_image_list(root / "data")
    path = store_dir(root / "data", spec.name, image_size)
    status, index = open_for_writing(path, spec, files)
    rows = _Rows(path / "features.f16", index)
    rng = np.random.default_rng(0)
    for start in range(0, len(files), 64):
        chunk = list(range(start, min(start + 64, len(files))))
        rows.write(chunk, rng.random((len(chunk), index["P"], index["D"]), dtype=np.float32).astype(np.float16))
    rows.close()
    status[:] = DONE
    write_bytes_atomic(path / "status.u8", status.tobytes())
    return root / "data"


def section_feed(args, device: torch.device) -> dict:
    """Trainer steps on a store on disk: how much of a step the training thread waits for its batch."""
    import tempfile

    from imcap.train import Trainer, TrainConfig

    images, size, batch, steps = (1024, 224, 128, 20) if not args.quick else (40, 64, 16, 6)
    model = {"embed_dim": 256, "hidden_dim": 512, "attention_dim": 512} if not args.quick else \
        {"embed_dim": 32, "hidden_dim": 32, "attention_dim": 32}
    out: dict = {"images": images, "batch": batch, "steps": steps}
    with tempfile.TemporaryDirectory() as tmp:
        data = synthetic_store(Path(tmp), images, size)
        for i, prefetch in enumerate((False, True, False)):  # the first run warms the device up (overwritten)
            trainer = Trainer(data, Path(tmp) / f"run{i}", model, TrainConfig(epochs=2, batch_size=batch,
                              val_images=1), log=lambda *a: None, device=device, prefetch=prefetch)
            if trainer.steps_per_epoch <= steps:  # an epoch's end resets the figures read below
                raise ValueError(f"{steps} steps need more than the {trainer.steps_per_epoch} steps of an epoch")
            trainer.train(progress_bar=False, stop_after_steps=steps)
            p = trainer.progress
            out["prefetch" if prefetch else "inline"] = {
                "data_wait_share": round(p.epoch_wait_seconds / max(p.epoch_seconds, 1e-9), 4),
                "step_s": round(p.epoch_seconds / steps, 5), "captions_per_s": round(p.epoch_seen / p.epoch_seconds, 1)}
        out["precision"], out["features"] = trainer.precision, list(trainer.store.features.shape[1:])
    if device.type == "cuda":
        out["peak_mib"] = peak_memory_mib(device)
    return out


SECTIONS = {"tests": section_tests, "parity": section_parity, "train": section_train, "coco": section_coco,
            "beam": section_beam, "extract": section_extract, "feed": section_feed, "profile": section_profile}


# ---------------------------------------------------------------------------------------------- the report


def table(sections: dict) -> list[str]:
    rows = [("check", "setting", "figure")]

    def add(check: str, setting: str, figure: str) -> None:
        rows.append((check, setting, figure))

    for name, r in sections.items():
        if "error" in r:
            add(name, "FAILED", r["error"])
            continue
        if "skipped" in r:
            add(name, "skipped", r["skipped"])
            continue
        if name == "tests":
            add("device tests", "pytest", f"{'passed' if r['ok'] else 'FAILED'}: {r['summary']}")
        elif name == "parity":
            add("parity fp32", "logits max |cpu - device|", f"{r['fp32_logits_max_abs_diff']:.2e} (scale {r['logit_scale']:.1f})")
            add("parity bf16", "logits max |cpu fp32 - device bf16|", f"{r['bf16_logits_max_abs_diff']:.2e}")
            for k in (1, 3):
                add(f"parity beam {k}", f"{r['images']} images", f"{r[f'beam{k}_identical_share']:.1%} identical captions")
        elif name in ("train", "coco"):
            for b, m in (r.items() if name == "train" else [(str(r["batch"]), r)]):
                if not isinstance(m, dict):
                    continue
                for variant in ("fp32", "bf16", "baseline"):
                    if variant in m:
                        v = m[variant]
                        extra = f", {v['ratio']}x baseline" if "ratio" in v else ""
                        extra += f", epoch {v['epoch_minutes']} min" if "epoch_minutes" in v else ""
                        extra += f", peak {v['peak_mib']} MiB" if v.get("peak_mib") else ""
                        add(f"{name} batch {b}", variant, f"{v['captions_per_s']:,} captions/s{extra}")
            for b, v in (r.get("larger_batches") or {}).items():
                add(f"coco batch {b}", "bf16", f"{v['captions_per_s']:,} captions/s, epoch {v['epoch_minutes']} min"
                    + (f", peak {v['peak_mib']} MiB" if v.get("peak_mib") else ""))
        elif name == "beam":
            add("beam k=3", f"{r['images']} images", f"{r['images_per_s']:,} images/s ({r['decode_seconds']} s)"
                + (f", peak {r['peak_mib']} MiB" if r.get("peak_mib") else ""))
        elif name == "extract":
            for variant in ("fp32", "tf32", "bf16-channels-last"):
                v = r[variant]
                add("extract lite0 224", variant, f"{v['images_per_s']:,} images/s, grid diff {v['grid_max_abs_diff']}")
            add("extract JPEG decode", f"{r['jpeg_decode_ms_per_image']} ms/image on one core",
                f"{r['decode_share_one_thread']:.0%} of time on one thread, {r['decode_share_all_cores']:.0%} on {r['cores']} cores")
        elif name == "profile":
            busy = f"{r['device_busy_share']:.0%} of it" if r["device_busy_share"] is not None else "n/a"
            add(f"profile batch {r['batch']}", f"one training step, {r['precision']}",
                f"{r['wall_step_s'] * 1000:.1f} ms wall, device busy {r['device_busy_s'] * 1000:.1f} ms ({busy}), "
                f"{r['device_ops_per_step']:,} device ops, {r['cpu_ops_per_step']:,} CPU ops")
        elif name == "feed":
            for variant, label in (("inline", "batches read in the step"), ("prefetch", "feeding thread")):
                v = r[variant]
                add(f"feed batch {r['batch']}", f"{label}, {r['precision']}",
                    f"{v['data_wait_share']:.1%} of step time waiting for data, {v['captions_per_s']:,} captions/s")
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor})"
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda, cuda:N or cpu")
    p.add_argument("--quick", action="store_true", help="small sizes (the default with --device cpu)")
    p.add_argument("--sections", help=f"comma-separated subset of: {', '.join(SECTIONS)}")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the parity check's CPU side)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "gpu-results.json"), help="where to write the JSON")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: torch sees no CUDA device here (torch {torch.__version__})")
    args.quick = args.quick or device.type == "cpu"
    torch.set_num_threads(args.threads)
    names = args.sections.split(",") if args.sections else list(SECTIONS)
    meta = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "device": device_name(device),
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "quick": args.quick}
    sections: dict[str, dict] = {}
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def write(lines: list[str]) -> None:  # after every section: a run cut short keeps what it measured
        out_path.write_text(json.dumps({"meta": meta, "sections": sections, "table": lines}, indent=1) + "\n")

    t0 = time.perf_counter()
    for name in names:
        print(f"[{time.perf_counter() - t0:6.1f} s] {name} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        try:
            sections[name] = SECTIONS[name](args, device)
        except Exception as e:  # noqa: BLE001 - one section's failure must not lose the others' figures
            sections[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300],
                              "traceback": traceback.format_exc()[-2000:]}
        sections[name]["seconds"] = round(time.perf_counter() - started, 1)
        write(table(sections))
    meta["seconds"] = round(time.perf_counter() - t0, 1)
    header = f"imcap GPU check {meta['date']}: {meta['device']}, torch {meta['torch']} (CUDA {meta['cuda']}), {meta['seconds']} s"
    lines = [header, *table(sections)]
    print("\n".join(lines))
    write(lines)
    print(f"wrote {out_path}")
    failed = [n for n, r in sections.items() if "error" in r or r.get("ok") is False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
