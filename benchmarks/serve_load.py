"""Load test of `imcap serve`: concurrent clients against a server on 127.0.0.1, bounded in count and time.

    python benchmarks/serve_load.py                        # 8 clients x 500 requests, tiny random model
    python benchmarks/serve_load.py --clients 2 --requests 20 --out /tmp/quick.json
    python benchmarks/serve_load.py --run-dir runs/scenes --requests 50      # a trained run instead

It starts `python -m imcap serve` itself on a free loopback port (one torch thread, the default queue),
waits for /healthz, then each client sends its requests one after another over a keep-alive connection:
POST /v1/captions with one synthetic scene (PNG), beam 3, attention grids on. Any answer but 200 counts
as an error. Then it stops the server, prints a table and writes the figures as JSON.

The default model is tiny and random (embed 8, hidden 16, a random-weight EfficientNet-Lite0 at 64 px, so
a 2x2 grid) and never ends a caption, so every caption has --max-length words: the figures measure the
server (HTTP, multipart, PNG decoding, queue, encoder and beam search at toy size, JSON), not a real model.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np

HOST = "127.0.0.1"  # loopback only, by design


def tiny_run(path: Path, image_size: int) -> Path:
    """A checkpoint of a tiny random decoder that never emits <end> (captions are max_length words)."""
    import torch

    from imcap import checkpoint as ckpt
    from imcap.encoders import encoder_spec
    from imcap.model import ModelConfig, ShowAttendTell
    from imcap.text import END, PAD, START, Vocabulary

    torch.manual_seed(0)
    vocab = Vocabulary.build([["a", "red", "circle", "blue", "square", "on", "the", "left", "right"]], min_count=1)
    spec = encoder_spec("efficientnet-lite0", image_size)
    model = ShowAttendTell(ModelConfig(vocab_size=len(vocab), feature_dim=spec.feature_dim, embed_dim=8,
                                       hidden_dim=16, attention_dim=8)).eval()
    with torch.no_grad():
        model.out.bias[[PAD, START, END]] = -30.0
    meta = {"model_config": model.config.to_dict(), "vocab": vocab.to_dict(), "encoder": spec.to_dict(), "language": "en"}
    ckpt.save_checkpoint(path / "best", model, meta)
    return path


def scene_pngs(n: int, size: int = 224) -> list[bytes]:
    from imcap.synth import draw_scene

    out = []
    for i in range(n):
        buffer = io.BytesIO()
        draw_scene(7, i, image_size=size)[0].save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def multipart(image: bytes, fields: dict[str, str]) -> tuple[bytes, str]:
    """(body, content type) of a multipart form with one image and some text fields."""
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="scene.png"\r\n'
                 f"Content-Type: image/png\r\n\r\n".encode() + image + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_server(run_dir: Path, port: int, log_path: Path, threads: int) -> subprocess.Popen:
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "imcap", "serve", str(run_dir), "--host", HOST, "--port", str(port),
                             "--threads", str(threads), "--quiet"], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: see {log_path}")
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}/healthz", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"the server did not start within 120 s: see {log_path}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def client(port: int, bodies: list[tuple[bytes, str]], n: int, deadline: float, latencies: list[float],
           errors: list[str]) -> None:
    """Send n requests one after another on one keep-alive connection; stop early at the deadline."""
    conn = http.client.HTTPConnection(HOST, port, timeout=60)
    for i in range(n):
        if time.time() > deadline:
            errors.append("not sent: time limit reached")
            continue
        body, content_type = bodies[i % len(bodies)]
        start = time.perf_counter()
        try:
            conn.request("POST", "/v1/captions", body=body, headers={"Content-Type": content_type})
            response = conn.getresponse()
            payload = response.read()
            latencies.append(time.perf_counter() - start)
            if response.status != 200:
                errors.append(f"HTTP {response.status}: {payload[:200].decode(errors='replace')}")
        except (OSError, http.client.HTTPException) as e:
            errors.append(f"{type(e).__name__}: {e}")
            conn.close()
            conn = http.client.HTTPConnection(HOST, port, timeout=60)
    conn.close()


def run_load(port: int, clients: int, requests: int, fields: dict[str, str], max_seconds: float) -> dict:
    bodies = [multipart(png, fields) for png in scene_pngs(16)]
    client(port, bodies, 3, time.time() + 60, [], [])  # warm-up, not counted
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[list[str]] = [[] for _ in range(clients)]
    deadline = time.time() + max_seconds
    threads = [threading.Thread(target=client, args=(port, bodies, requests, deadline, latencies[k], errors[k]))
               for k in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    lat = np.array([x for per in latencies for x in per]) * 1000.0
    errs = [e for per in errors for e in per]
    return {
        "requests": clients * requests, "completed": int(lat.size), "errors": len(errs),
        "error_examples": sorted(set(errs))[:5], "wall_s": round(wall, 2),
        "throughput_rps": round(lat.size / wall, 2) if wall else None,
        "latency_ms": {k: round(float(v), 1) for k, v in {
            "mean": lat.mean(), "p50": np.percentile(lat, 50), "p95": np.percentile(lat, 95),
            "p99": np.percentile(lat, 99), "max": lat.max()}.items()} if lat.size else {},
    }


def table(result: dict) -> str:
    c, lat = result["config"], result["latency_ms"]
    rows = [("clients x requests", f"{c['clients']} x {c['requests']}"),
            ("model", c["model"]),
            ("request", f"1 PNG {c['image_px']} px, beam {c['beam_size']}, {c['max_length']} words, attention on"),
            ("server", f"1 worker thread (--concurrency 1), torch threads {c['threads']}"),
            ("completed / errors", f"{result['completed']} / {result['errors']}"),
            ("latency p50 / p95 / p99 / max", f"{lat.get('p50')} / {lat.get('p95')} / {lat.get('p99')} / {lat.get('max')} ms"),
            ("throughput", f"{result['throughput_rps']} requests/s"),
            ("wall time", f"{result['wall_s']} s")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=8, help="concurrent clients")
    p.add_argument("--requests", type=int, default=500, help="requests per client")
    p.add_argument("--run-dir", help="serve this trained run instead of the tiny random model")
    p.add_argument("--image-size", type=int, default=64, help="encoder input side of the tiny model (64 -> 2x2 grid)")
    p.add_argument("--beam", type=int, default=3, help="beam size of each request")
    p.add_argument("--max-length", type=int, default=12, help="max words of each request (the tiny model uses all)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    p.add_argument("--max-seconds", type=float, default=900, help="stop sending after this long")
    p.add_argument("--out", default=str(Path(__file__).with_name("serve_load.json")), help="where to write the figures")
    a = p.parse_args(argv)
    if a.clients < 1 or a.requests < 1:
        p.error("--clients and --requests must be >= 1")

    load_before = [round(x, 2) for x in os.getloadavg()]  # other work on the machine skews the figures
    with tempfile.TemporaryDirectory(prefix="imcap-load-") as tmp:
        run_dir = Path(a.run_dir) if a.run_dir else tiny_run(Path(tmp) / "run", a.image_size)
        port = free_port()
        server = start_server(run_dir, port, Path(tmp) / "server.log", a.threads)
        try:
            fields = {"beam_size": str(a.beam), "max_length": str(a.max_length), "attention": "true"}
            result = run_load(port, a.clients, a.requests, fields, a.max_seconds)
        finally:
            stop_server(server)
    result["config"] = {
        "clients": a.clients, "requests": a.requests, "beam_size": a.beam, "max_length": a.max_length,
        "threads": a.threads, "image_px": 224,
        "model": a.run_dir or f"tiny random (embed 8, hidden 16), EfficientNet-Lite0 random weights at {a.image_size} px",
    }
    result["machine"] = {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
                         "load_average_before": load_before}
    result["date"] = time.strftime("%Y-%m-%d")
    print(table(result))
    for e in result["error_examples"]:
        print(f"error: {e}", file=sys.stderr)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out}")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
