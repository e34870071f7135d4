"""The ONNX runtime against the torch one on the packaged flickr8k model: one command, a table, JSON.

    .venv/bin/python benchmarks/onnx.py [--images 200] [--threads 1] [--rounds 2] [--out benchmarks/onnx-results.json]

Both runtimes caption the same Flickr8k dev images (../shared/data/flickr8k, or $IMCAP_SHARED_DATA) at beam 1
and 3, 16 images per batch as `imcap caption` does, on --threads threads each (torch.set_num_threads and
OMP_NUM_THREADS; onnxruntime's intra-op threads). Each runtime runs in its own child process, `--rounds` times,
in turn (torch, onnx, torch, onnx, ...); each figure is the best of the rounds. Per child:
    end to end    image files in, captions out: reading and resizing, the encoder, the search, the results
    decoder only  the search and the results from the annotation grids (each runtime's own, made beforehand)
    encoder only  decoded images in, grids out: the resize and normalisation, the CNN
    peak RSS      the child's max resident memory (os.wait4) over all of that
Also measured: a cold start (a fresh process that loads the model and captions one image, best of 3), the
captions that differ between the runtimes, the time of `imcap export`, the size of the exported files against
the packaged checkpoint with its encoder weights, and the installed size of each runtime's packages with
everything they require (importlib.metadata, the files each package's RECORD lists).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import cpu_model  # noqa: E402

BEAMS = (1, 3)
BATCH = 16  # images per batch: imcap caption's default
RUNTIMES = ("torch", "onnx")
# what each runtime imports to caption (the torch path: api.py, checkpoint.py, encoders.py), and the exporter
PACKAGES = {
    "torch runtime": ["torch", "numpy", "pillow", "safetensors", "efficientnet-lite-pytorch"],
    "onnx runtime": ["onnxruntime", "numpy", "pillow"],
    "torch alone": ["torch"],
    "exporter (onnx, onnxscript)": ["onnx", "onnxscript"],
}


# ---------------------------------------------------------------------------------------- one runtime, in a child


def run_section(runtime: str, export_dir: str, files: list[str], threads: int) -> dict:
    """Load `runtime`'s captioner and time it on `files`; what it measured, as JSON-able values."""
    if runtime == "torch":
        import torch

        import imcap
        from imcap.decoding import DecodingOptions

        torch.set_num_threads(threads)
        captioner = imcap.load("flickr8k", device="cpu")
    else:
        from imcap.onnx_runtime import DecodingOptions, OnnxCaptioner

        captioner = OnnxCaptioner.load(export_dir, threads=threads)
    from imcap.images import load_image

    captioner.caption(files[:BATCH], beam_size=3)  # warm-up: first calls allocate
    pils = [load_image(f) for f in files]
    batches = [pils[i : i + BATCH] for i in range(0, len(pils), BATCH)]
    start = time.perf_counter()
    grids = [captioner.encode(b) for b in batches]
    out = {"encoder_s": time.perf_counter() - start, "decoder_s": {}, "end_to_end_s": {}, "captions": {}}
    for k in BEAMS:
        options = DecodingOptions(beam_size=k)
        start = time.perf_counter()
        for g in grids:
            captioner.caption_features(g, options)
        out["decoder_s"][k] = time.perf_counter() - start
        start = time.perf_counter()
        results = captioner.caption(files, beam_size=k, batch_size=BATCH)
        out["end_to_end_s"][k] = time.perf_counter() - start
        out["captions"][k] = [r.caption for r in results]
    return out


COLD_START = {  # a fresh process: load the model, caption one image at beam 3
    "torch": "import sys, torch; torch.set_num_threads({threads}); import imcap; "
             "print(imcap.load('flickr8k', device='cpu').caption(sys.argv[1], beam_size=3).caption)",
    "onnx": "import sys; from imcap.onnx_runtime import OnnxCaptioner; "
            "print(OnnxCaptioner.load({export!r}, threads={threads}).caption(sys.argv[1], beam_size=3).caption)",
}


def child(args: list[str], threads: int) -> tuple[str, float, float]:
    """Run a child Python process; (its stdout, wall seconds, max RSS in MiB). RuntimeError if it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            cwd=REPO, text=True)
    stdout, stderr = proc.stdout.read(), proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{args[:3]} failed ({proc.returncode}): {stderr.strip()[-2000:]}")
    return stdout, wall, usage.ru_maxrss / 1024


# ------------------------------------------------------------------------------------------------------- sizes


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_sizes(names: list[str]) -> dict[str, int]:
    """Bytes of the installed files (each distribution's RECORD) of `names` and of everything they require,
    by distribution; requirements behind extras or markers that do not hold here are left out."""
    from importlib import metadata

    from packaging.requirements import Requirement

    sizes: dict[str, int] = {}
    todo = list(names)
    while todo:
        name = _canonical(todo.pop())
        if name in sizes:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            try:
                dist = metadata.distribution(name.replace("-", "_"))
            except metadata.PackageNotFoundError:
                continue
        sizes[name] = sum(p.stat().st_size for p in (Path(f.locate()) for f in dist.files or []) if p.is_file())
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return sizes


def file_sizes(export_dir: Path) -> dict:
    """The export's files against the packaged checkpoint (float16 weights) and its encoder's weight file."""
    from imcap.encoders import weights_path
    from imcap.packaged import available

    packaged = available()["flickr8k"]
    spec = json.loads((packaged / "checkpoint.json").read_text())["encoder"]
    return {
        "export": {p.name: p.stat().st_size for p in sorted(export_dir.iterdir())},
        "packaged": {**{p.name: p.stat().st_size for p in sorted(packaged.iterdir()) if p.suffix != ".md"},
                     spec["weights"]: Path(weights_path(spec["name"])).stat().st_size},
    }


# ------------------------------------------------------------------------------------------------------- report


def dev_images(count: int) -> list[str]:
    data = Path(os.environ.get("IMCAP_SHARED_DATA", REPO.parent / "shared" / "data")) / "flickr8k"
    names = (data / "Flickr_8k.devImages.txt").read_text().split()
    files = [str(data / "images" / n) for n in names if (data / "images" / n).is_file()][:count]
    if len(files) < count:
        sys.exit(f"benchmarks/onnx.py: {len(files)} Flickr8k dev images found in {data}, asked for {count}")
    return files


def table(r: dict) -> str:
    n = r["images"]
    best = r["best"]
    rows = ["| measure | torch | onnxruntime | onnxruntime vs torch |", "|---|---|---|---|"]

    def speed(label: str, key: str, k: int | None = None):
        t, o = (best[rt][key] if k is None else best[rt][key][str(k)] for rt in RUNTIMES)
        rows.append(f"| {label} | {1000 * t / n:.1f} ms/image ({n / t:.1f} images/s) | "
                    f"{1000 * o / n:.1f} ms/image ({n / o:.1f} images/s) | {t / o:.2f}x as fast |")

    for k in BEAMS:
        speed(f"end to end, beam {k}", "end_to_end_s", k)
    for k in BEAMS:
        speed(f"decoder only, beam {k}", "decoder_s", k)
    speed("encoder only (resize, normalise, CNN)", "encoder_s")
    c = r["cold_start"]
    rows.append(f"| cold start: new process, load, caption 1 image (beam 3) | {c['torch']['s']:.2f} s, "
                f"{c['torch']['rss_mib']:.0f} MiB | {c['onnx']['s']:.2f} s, {c['onnx']['rss_mib']:.0f} MiB | "
                f"{c['torch']['s'] / c['onnx']['s']:.2f}x as fast |")
    rss = {rt: max(x["rss_mib"] for x in r["rounds"][rt]) for rt in RUNTIMES}
    rows.append(f"| peak resident memory, largest round | {rss['torch']:.0f} MiB | {rss['onnx']:.0f} MiB | |")
    diff = r["differing_captions"]
    rows.append("| captions that differ from torch's | | " + ", ".join(f"beam {k}: {diff[str(k)]} of {n}" for k in BEAMS)
                + " | |")
    sizes = r["sizes"]
    rows.append(f"| model files | {sum(sizes['packaged'].values()) / 1e6:.1f} MB (float16 checkpoint + encoder "
                f"weights) | {sum(sizes['export'].values()) / 1e6:.1f} MB (float32 graphs + JSON) | |")
    pk = r["packages"]
    rows.append(f"| installed packages, with what they require | {pk['torch runtime']['total'] / 1e6:.0f} MB "
                f"({len(pk['torch runtime']['by_package'])} packages) | {pk['onnx runtime']['total'] / 1e6:.0f} MB "
                f"({len(pk['onnx runtime']['by_package'])} packages) | |")
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=200, help="Flickr8k dev images to caption")
    p.add_argument("--threads", type=int, default=1, help="threads of each runtime")
    p.add_argument("--rounds", type=int, default=2, help="child processes per runtime, in turn; the best counts")
    p.add_argument("--export", help="use this export of flickr8k instead of exporting one (timed) to a temp folder")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "onnx-results.json"), help="JSON file to write")
    p.add_argument("--section", choices=RUNTIMES, help=argparse.SUPPRESS)  # the child: one runtime
    p.add_argument("--files", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.section:
        print(json.dumps(run_section(a.section, a.export, json.loads(Path(a.files).read_text()), a.threads)))
        return 0

    files = dev_images(a.images)
    load_before = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    with tempfile.TemporaryDirectory() as tmp:
        export, export_s = a.export, None
        if export is None:
            export = str(Path(tmp) / "flickr8k-onnx")
            _, export_s, _ = child(["-m", "imcap", "export", "flickr8k", "--out", export, "--threads", str(a.threads)],
                                   a.threads)
        file_list = Path(tmp) / "files.json"
        file_list.write_text(json.dumps(files))
        rounds: dict[str, list[dict]] = {rt: [] for rt in RUNTIMES}
        for i in range(a.rounds):
            for rt in RUNTIMES:
                out, _, rss = child([__file__, "--section", rt, "--export", export, "--files", str(file_list),
                                     "--threads", str(a.threads)], a.threads)
                rounds[rt].append({**json.loads(out), "rss_mib": rss})
                print(f"round {i + 1}/{a.rounds}, {rt}: done", file=sys.stderr, flush=True)
        cold = {}
        for rt in RUNTIMES:
            runs = [child(["-c", COLD_START[rt].format(threads=a.threads, export=export), files[0]], a.threads)
                    for _ in range(3)]
            best = min(runs, key=lambda x: x[1])
            cold[rt] = {"s": best[1], "rss_mib": best[2], "caption": best[0].strip()}
        sizes = file_sizes(Path(export))
    best = {rt: {"encoder_s": min(x["encoder_s"] for x in rs),
                 **{key: {str(k): min(x[key][str(k)] for x in rs) for k in BEAMS} for key in ("decoder_s", "end_to_end_s")}}
            for rt, rs in rounds.items()}
    captions = {rt: rounds[rt][0]["captions"] for rt in RUNTIMES}
    packages = {}
    for label, names in PACKAGES.items():
        by_package = installed_sizes(names)
        packages[label] = {"requested": names, "total": sum(by_package.values()), "by_package": by_package}
    import numpy
    import onnxruntime
    import torch

    report = {
        "date": datetime.datetime.now().isoformat(timespec="minutes"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "cpu": cpu_model(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__},
        "loadavg_before": load_before,
        "loadavg_after": Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else [],
        "command": " ".join([Path(sys.executable).name, "benchmarks/onnx.py", *sys.argv[1:]]),
        "images": len(files), "threads": a.threads, "batch": BATCH, "beams": list(BEAMS), "export_s": export_s,
        "best": best,
        "rounds": {rt: [{k: v for k, v in x.items() if k != "captions"} for x in rs] for rt, rs in rounds.items()},
        "cold_start": cold,
        "differing_captions": {str(k): sum(a_ != b_ for a_, b_ in zip(captions["torch"][str(k)], captions["onnx"][str(k)]))
                               for k in BEAMS},
        "sizes": sizes,
        "packages": packages,
    }
    Path(a.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"{report['cpu']}, {a.threads} thread(s), {len(files)} Flickr8k dev images, {report['date']}; "
          f"load average before {' '.join(load_before)}, after {' '.join(report['loadavg_after'])}"
          + (f"; export took {export_s:.1f} s" if export_s else ""))
    print(table(report))
    print(f"figures: {a.out}")
    return 0




if __name__ == "__main__":
    sys.exit(main())
