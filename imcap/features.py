"""The feature store: every image of DATA_DIR through the CNN once, kept as one array file (N, P, D).

Layout (docs/formats.md), under DATA_DIR/features/<encoder>-<size>/:
    features.f16   float16 (N, P, D), row i = dataset.json images[i]; or, with dtype uint8,
    features.u8    uint8 (N, P, D): value = code * scale (index.json), the encoders' ReLU6 range in 255 steps
    status.u8      uint8 (N,): 0 = not done, 1 = done, 2 = failed (unreadable image)
    index.json     encoder spec, N, P, D, dtype (and scale), failures
Extraction is resumable: features are flushed before status marks them done, and status.u8 and
index.json are replaced atomically, so a job killed at any moment never claims a row it did not write.
The array file has its space reserved when the store is opened and rows are written with plain writes (never
through the memory map), so a full disk is one line naming the store, never a SIGBUS.

The CNN runs on the device (`device`, default auto: CUDA when torch sees it), in fp32 unless bf16/fp16 is
asked for (encoders.AUTO_PRECISION); images are decoded and resized on the CPU in background threads, and on
CUDA their pixels are pinned there and copied without blocking. The store is float16 on every device, or
uint8 on request (half the disk: a 14x14 COCO store takes 31 GB instead of 62; on Flickr8k dev 4 of 1,000
greedy captions of a model trained on float16 features changed, and the scores by at most 0.0002).

Over 400 lines: writing the store (reserving, resumable rows, distributed shards), reading it and copying
rows from another DATA_DIR's store share one on-disk layout, kept in one place.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .devices import autocast, ieee_convolutions, resolve_device, resolve_precision
from .distributed import Distributed
from .encoders import AUTO_PRECISION, OUTPUT_MAX, EncoderSpec, ImageEncoder, build_encoder
from .fileio import remove_stale_temporaries, write_bytes_atomic, write_error, write_json_atomic
from .images import ImageError, load_image

INDEX_VERSION = 1
NOT_DONE, DONE, FAILED = 0, 1, 2
# Images per CNN batch when none is given: on a 2-core CPU 4 are 1.4-1.8x faster than 32 (cache); a GPU
# wants large batches.
CPU_BATCH, GPU_BATCH = 4, 64
MAX_DECODE_THREADS = 8  # on a GPU: background threads decoding images (one on the CPU, beside the CNN's)
DTYPES = {"float16": ("features.f16", np.float16), "uint8": ("features.u8", np.uint8)}  # dtype -> file, numpy


class FeatureStoreError(ValueError):
    """A feature store that is missing, incomplete or does not match the dataset / encoder; one clear message."""


# ---------------------------------------------------------------- small file helpers




def read_image_list(data_dir: str | os.PathLike) -> tuple[Path, list[str]]:
    """(image_root, [images[i]["file"], ...]) from DATA_DIR/dataset.json; files are relative to image_root."""
    from .datasets import escapes_root as _escapes_root, load_dataset

    path = Path(data_dir) / "dataset.json"
    if not path.exists():
        raise FeatureStoreError(f"{path}: not found (run imcap prepare first)")
    meta, images = load_dataset(data_dir)  # DatasetError naming the file and key when malformed
    root = meta.get("image_root")
    if not isinstance(root, str):
        raise FeatureStoreError(f"{path}: missing 'image_root'")
    files = [im["file"] for im in images]
    for i, file in enumerate(files):
        if not isinstance(file, str) or _escapes_root(file):
            raise FeatureStoreError(f"{path}: images[{i}].file {file!r} is not a path inside the image folder")
    return Path(data_dir) / root, files


def _files_digest(files: Sequence[str]) -> str:
    """A fingerprint of the image list, so a store is never read against a different dataset.json."""
    return hashlib.sha1("\n".join(files).encode("utf-8")).hexdigest()


def store_dir(data_dir: str | os.PathLike, name: str, image_size: int) -> Path:
    """DATA_DIR/features/<encoder>-<size>."""
    return Path(data_dir) / "features" / f"{name}-{image_size}"


# ---------------------------------------------------------------- creating / reopening a store


def _new_index(spec: EncoderSpec, files: Sequence[str], dtype: str = "float16") -> dict:
    if dtype not in DTYPES:
        raise ValueError(f"feature store dtype must be one of {', '.join(DTYPES)}, got {str(dtype)[:40]!r}")
    return {
        "version": INDEX_VERSION,
        "encoder": spec.to_dict(),
        "N": len(files),
        "P": spec.num_positions,
        "D": spec.feature_dim,
        "dtype": dtype,
        **({"scale": OUTPUT_MAX / 255} if dtype == "uint8" else {}),  # value of one uint8 step
        "images_sha1": _files_digest(files),
        "failures": [],  # [{"index": i, "file": ..., "problem": ...}] for rows with status 2
    }


def _dtype(index: dict) -> str:
    """The store's dtype (an index written before uint8 stores has none: float16)."""
    dtype = index.get("dtype", "float16")
    if dtype not in DTYPES or (dtype == "uint8" and not isinstance(index.get("scale"), float)):
        raise FeatureStoreError(f"unknown feature store dtype {str(dtype)[:40]!r} (or no scale) in index.json; "
                                f"extract again with imcap features --overwrite")
    return dtype


def _scale(index: dict) -> float | None:
    """The value of one uint8 step, or None for a float16 store."""
    return index["scale"] if _dtype(index) == "uint8" else None


def data_file(path: Path, index: dict) -> Path:
    """The store's (N, P, D) array file: features.f16 or features.u8."""
    return path / DTYPES[_dtype(index)][0]


def _mismatch(index: dict, want: dict) -> str | None:
    """How an existing index differs from the one we would write, or None if compatible."""
    old, new = index.get("encoder", {}), want["encoder"]
    diffs = [f"{k} {old.get(k)!r} != {new[k]!r}" for k in new if old.get(k) != new[k]]
    if _dtype(index) != want["dtype"]:
        diffs.append(f"dtype {_dtype(index)} != {want['dtype']}")
    if index.get("N") != want["N"]:
        diffs.append(f"N {index.get('N')} != {want['N']} images")
    elif index.get("images_sha1") != want["images_sha1"]:
        diffs.append("the image list in dataset.json changed")
    return "; ".join(diffs) or None


def _create(path: Path, index: dict) -> None:
    """Write an empty store; index.json comes last, so a store without it was never started."""
    path.mkdir(parents=True, exist_ok=True)
    file = data_file(path, index)
    tmp = file.with_name(file.name + ".tmp")
    with open(tmp, "wb") as f:
        f.truncate(_store_bytes(index))  # a sparse file of zeros; open_for_writing reserves its space
    os.replace(tmp, file)
    write_bytes_atomic(path / "status.u8", bytes(index["N"]))
    write_json_atomic(path / "index.json", index)


def _remove(path: Path) -> None:
    data = [name for name, _ in DTYPES.values()]
    for name in ("index.json", "status.u8", "status.u8.tmp", "index.json.tmp", *data, *(d + ".tmp" for d in data)):
        (path / name).unlink(missing_ok=True)


def _row_bytes(index: dict) -> int:
    return index["P"] * index["D"] * np.dtype(DTYPES[_dtype(index)][1]).itemsize


def _store_bytes(index: dict) -> int:
    return index["N"] * _row_bytes(index)


def _unallocated(file: Path, size: int) -> int:
    """Bytes of `file` (`size` long) that have no disk blocks yet: the holes of a sparse file."""
    blocks = getattr(file.stat(), "st_blocks", None)
    return size if blocks is None else max(0, size - blocks * 512)


def _reserve(file: Path, size: int) -> None:
    """Allocate every block of `file` now, holes included (a sparse store made by an older imcap too), so that
    writing its rows cannot find the disk full; WriteError naming it, with the space needed and free, if it
    does not fit. Where the file system cannot reserve, rows are still written with plain writes (_Rows)."""
    if not hasattr(os, "posix_fallocate") or _unallocated(file, size) == 0:
        return
    fd = os.open(file, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)  # allocates only; data already written is kept
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):  # cannot reserve here: go on without
            raise write_error(file, e, _unallocated(file, size)) from e
    finally:
        os.close(fd)


class _Rows:
    """The store's array file open for writing rows with plain writes: on a full disk (a file system that could
    not reserve the space) they fail with an OSError, where a write through a memory map dies of SIGBUS."""

    def __init__(self, file: Path, index: dict):
        self.file, self.size = file, _store_bytes(index)
        self.row_bytes = _row_bytes(index)
        self.scale = _scale(index)
        self._f = open(file, "r+b", buffering=0)

    def write(self, rows: Sequence[int], values: np.ndarray) -> None:
        """values (len(rows), P, D) float into `rows` (as the store's dtype), on disk (fsync) when it returns;
        WriteError otherwise."""
        values = values.astype(np.float16) if self.scale is None else quantize(values, self.scale)
        try:
            for row, value in zip(rows, values):
                self._f.seek(row * self.row_bytes)
                data = memoryview(value.tobytes())
                while data:
                    data = data[self._f.write(data):]
            os.fsync(self._f.fileno())
        except OSError as e:
            raise write_error(self.file, e, _unallocated(self.file, self.size)) from e

    def close(self) -> None:
        self._f.close()


def quantize(values: np.ndarray, scale: float) -> np.ndarray:
    """Annotations -> uint8 codes of a uint8 store: round(value / scale), clipped to 0..255."""
    return np.clip(np.rint(values.astype(np.float32) / np.float32(scale)), 0, 255).astype(np.uint8)


def open_for_writing(path: Path, spec: EncoderSpec, files: Sequence[str], overwrite: bool = False,
                     dtype: str | None = None):
    """Create or reopen the store at `path`, with the space of its array file reserved -> (status (N,) uint8,
    index). dtype: "float16" or "uint8" for a new store (None: float16, or the existing store's)."""
    if not overwrite and dtype is None and (path / "index.json").exists():
        dtype = _dtype(_read_index(path))
    want = _new_index(spec, files, dtype or "float16")
    if overwrite:
        _remove(path)
    if path.is_dir():
        remove_stale_temporaries(path)  # a run killed while writing status.u8 or index.json
    if not (path / "index.json").exists():
        _create(path, want)
    index = _read_index(path)
    problem = _mismatch(index, want)
    if problem:
        raise FeatureStoreError(
            f"{path} was made for other images or with other settings ({problem}); "
            f"extract again with overwrite=True (imcap features --overwrite) to start over"
        )
    status = np.fromfile(path / "status.u8", dtype=np.uint8)
    file = data_file(path, index)
    size = file.stat().st_size if file.is_file() else -1
    if len(status) != index["N"] or size != _store_bytes(index):
        raise FeatureStoreError(f"{path}: status.u8 or {file.name} does not match index.json (a damaged store); "
                                f"extract again with imcap features --overwrite")
    _reserve(file, size)
    return status, index


def _read_index(path: Path) -> dict:
    """path/index.json, checked to be a JSON object; FeatureStoreError naming the file otherwise."""
    file = path / "index.json"
    try:
        index = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FeatureStoreError(f"{file}: malformed ({e}); extract again with imcap features --overwrite") from None
    keys = ("N", "P", "D", "encoder", "images_sha1", "failures")
    if not isinstance(index, dict) or any(k not in index for k in keys):
        raise FeatureStoreError(f"{file}: not a feature store index; extract again with imcap features --overwrite")
    return index


# ---------------------------------------------------------------- decoding images in the background


@dataclass
class _Batch:
    rows: list[int]  # rows whose image decoded, in order
    images: torch.Tensor | None  # (len(rows), 3, S, S), None if every image failed
    failures: list[tuple[int, str]]  # (row, one-line problem)


def _load_batch(rows: Sequence[int], paths: Sequence[Path], preprocess: Callable, pin: bool = False) -> _Batch:
    """Decode and preprocess the images of `rows`; pin: their pixels in pinned memory (for a non-blocking copy
    to CUDA)."""
    ok, tensors, failures = [], [], []
    for row in rows:
        try:
            tensors.append(preprocess(load_image(paths[row])))
            ok.append(int(row))
        except ImageError as e:
            failures.append((int(row), str(e)))
    images = torch.stack(tensors) if tensors else None  # (len(ok), 3, S, S)
    if pin and images is not None:
        images = images.pin_memory()
    return _Batch(ok, images, failures)


def _prefetch(fn: Callable, items: Iterable, depth: int = 2, workers: int = 1) -> Iterator:
    """fn(item) for each item, computed in `workers` background threads up to `depth` items ahead, in order."""
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="imcap-decode")
    pending: deque = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) > depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@contextmanager
def _torch_threads(n: int | None):
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(old)


# ---------------------------------------------------------------- extraction


def _report(msg: str, progress: bool) -> None:
    if progress:
        tqdm.write(msg, file=sys.stderr)
    else:
        print(msg, file=sys.stderr)


def _record_failures(index: dict, batch: _Batch, files: Sequence[str]) -> bool:
    """Update index["failures"] for the rows of `batch` (a fixed image loses its entry); True if it changed."""
    rows = set(batch.rows) | {r for r, _ in batch.failures}
    kept = [f for f in index["failures"] if f["index"] not in rows]
    new = [{"index": r, "file": files[r], "problem": p} for r, p in batch.failures]
    changed = bool(new) or len(kept) != len(index["failures"])
    index["failures"] = sorted(kept + new, key=lambda f: f["index"])
    return changed


def _encode(encoder: ImageEncoder, images: torch.Tensor, precision: str) -> np.ndarray:
    """images (B, 3, S, S) on the CPU -> annotations (B, P, D) float16 on the CPU, computed on the encoder's device."""
    device = encoder.device
    with torch.inference_mode(), autocast(device, precision):
        a = encoder(images.to(device, non_blocking=True))  # (B, P, D)
    if device.type == "cpu":
        return a.float().numpy().astype(np.float16)
    return a.to(torch.float16).cpu().numpy()  # rounded on the device: half the bytes to copy back


def _run(
    encoder: ImageEncoder, batches: Iterator[_Batch], features: _Rows, status: np.ndarray, commit: Callable, bar,
    precision: str = "fp32",
) -> tuple[int, float]:
    """Encode each decoded batch, write its rows, commit; -> (images encoded, seconds spent waiting for decoding)."""
    encoded, waited = 0, 0.0
    while True:
        t = time.perf_counter()
        batch = next(batches, None)
        waited += time.perf_counter() - t
        if batch is None:
            return encoded, waited
        if batch.rows:
            features.write(batch.rows, _encode(encoder, batch.images, precision))  # on disk before status says so
            status[batch.rows] = DONE
            encoded += len(batch.rows)
        for row, _ in batch.failures:
            status[row] = FAILED
        commit(batch)
        bar.update(len(batch.rows) + len(batch.failures))


def extract_features(
    data_dir: str | os.PathLike,
    *,
    encoder: str | ImageEncoder = "efficientnet-lite0",
    image_size: int = 224,
    batch_size: int | None = None,  # None: CPU_BATCH on the CPU, GPU_BATCH on a GPU
    threads: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
    device: str | torch.device = "auto",
    precision: str = "auto",
    reuse: str | os.PathLike | None = None,
    dtype: str | None = None,
) -> dict:
    """Encode every image of DATA_DIR/dataset.json not yet done into DATA_DIR/features/<encoder>-<size>/.

    encoder: a name from ENCODERS (built pretrained), or a built ImageEncoder whose spec.image_size must equal
    image_size (it is moved to `device`). Rows with status 0 (never done) or 2 (failed before) are processed;
    unreadable images get status 2 and one line on stderr. threads: torch threads for the CNN (None: leave as
    is). device: "auto" (CUDA when torch sees it, else the CPU), "cpu", "cuda", "cuda:N", "mps". precision:
    "auto" (encoders.AUTO_PRECISION: fp32, see there), "fp32", "bf16" or "fp16" (GPUs). Returns a summary dict.

    reuse: another DATA_DIR with a store of the same encoder and size: the rows of the same image files (the
    same path on disk, e.g. Flickr8k's photos prepared with English and with Chinese captions) are copied
    from it instead of encoded again; the rest are encoded as usual.

    dtype: "float16" (the default for a new store) or "uint8" (half the bytes, see the module's docstring);
    None: the existing store's. A store of another dtype is refused unless overwrite.

    Under torchrun each process encodes every world-th image still to do, into the same array file (rows
    are disjoint), on its own GPU with CUDA (auto: cuda:$LOCAL_RANK); each keeps its own status file
    (status.rank<r>.u8) that rank 0 merges at the end, and at the start of any later run, so a killed
    distributed extraction resumes like a single one.
    """
    encoder, device, precision = _encoder_on(device, precision, encoder, image_size)
    dist = Distributed.from_env()
    batch_size = batch_size or (CPU_BATCH if device.type == "cpu" else GPU_BATCH)
    image_root, files = read_image_list(data_dir)
    if not files:
        raise FeatureStoreError(f"{Path(data_dir) / 'dataset.json'} lists no images")
    path = store_dir(data_dir, encoder.spec.name, image_size)
    copied = 0
    if dist.main:
        open_for_writing(path, encoder.spec, files, overwrite, dtype)  # create (or check) the store first
        _merge_rank_status(path)
        if reuse is not None:
            copied = _copy_rows(Path(reuse), path, encoder.spec, image_root, files)
    dist.barrier()
    status, index = open_for_writing(path, encoder.spec, files)
    status_file = path / ("status.u8" if dist.world == 1 else f"status.rank{dist.rank}.u8")
    todo = dist.shard(np.flatnonzero(status != DONE))
    chunks = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    paths = [image_root / f for f in files]

    def commit(batch: _Batch) -> None:
        for _, problem in batch.failures:
            _report(f"imcap features: error: {problem}", progress)
        if _record_failures(index, batch, files) and dist.world == 1:
            write_json_atomic(path / "index.json", index)
        write_bytes_atomic(status_file, status.tobytes())

    start = time.perf_counter()
    bar = tqdm(total=len(todo), unit="img", desc=path.name, disable=not progress or not dist.main, dynamic_ncols=True)
    pin, workers = device.type == "cuda", _decode_threads(device)
    batches = _prefetch(lambda rows: _load_batch(rows, paths, encoder.preprocess, pin), chunks, 2 * workers, workers)
    rows = _Rows(data_file(path, index), index)
    with (_torch_threads(threads) as n_threads, ieee_convolutions(device, precision), bar, closing(batches),
          closing(rows)):
        encoded, waited = _run(encoder, batches, rows, status, commit, bar, precision)
    seconds = time.perf_counter() - start
    if dist.world > 1:  # gather, not all_reduce: NCCL would want the count in a CUDA tensor
        status, encoded = _finish_distributed(dist, path, index), sum(dist.gather(encoded))
    failed = [f for f in index["failures"] if status[f["index"]] == FAILED]
    return {
        "store": str(path),
        "encoder": encoder.spec.name,
        "image_size": image_size,
        "images": len(files),
        "done": int((status == DONE).sum()),  # in the store, this run and earlier ones
        "encoded": encoded,  # by this run
        "copied": copied,  # from the `reuse` store, by this run (rank 0)
        "skipped": len(files) - len(todo),  # already done before this run
        "failed": failed,  # [{"index", "file", "problem"}]
        "seconds": round(seconds, 3),
        "images_per_s": round(encoded / seconds, 2) if seconds > 0 else 0.0,
        "decode_wait_s": round(waited, 3),  # time the CNN spent waiting for decoded images
        "threads": n_threads,
        "device": str(device),
        "precision": precision,
        "batch_size": batch_size,
        "dtype": _dtype(index),
        "bytes_per_image": _row_bytes(index),
    }


def _copy_rows(source_dir: Path, path: Path, spec: EncoderSpec, image_root: Path, files: Sequence[str],
               chunk: int = 256) -> int:
    """Copy into the store at `path` (open, not done rows only) the rows of another DATA_DIR's store of the same
    encoder spec whose image is the same file; -> rows copied. FeatureStoreError when that store is not usable."""
    source = store_dir(source_dir, spec.name, spec.image_size)
    if not (source / "index.json").is_file():
        raise FeatureStoreError(f"{source}: no feature store to reuse (run imcap features {source_dir} "
                                f"--encoder {spec.name} --image-size {spec.image_size} first)")
    if source.resolve() == path.resolve():
        return 0
    src_index = _read_index(source)
    if src_index["encoder"] != spec.to_dict():
        raise FeatureStoreError(f"{source} was made with another encoder setting than {path.name}: cannot reuse it")
    src_status = np.fromfile(source / "status.u8", dtype=np.uint8)
    src_root, src_files = read_image_list(source_dir)
    if len(src_status) != src_index["N"] or len(src_files) != src_index["N"]:
        raise FeatureStoreError(f"{source} does not match {Path(source_dir) / 'dataset.json'}: cannot reuse it")
    rows_of = {os.path.realpath(src_root / f): i for i, f in enumerate(src_files) if src_status[i] == DONE}
    status, index = open_for_writing(path, spec, files)
    pairs = [(i, rows_of[p]) for i, p in ((i, os.path.realpath(image_root / f)) for i, f in enumerate(files))
             if status[i] != DONE and p in rows_of]
    src = FeatureStore(source, src_index, _memmap(source, src_index), src_status)
    with closing(_Rows(data_file(path, index), index)) as rows:
        for k in range(0, len(pairs), chunk):
            part = pairs[k : k + chunk]
            rows.write([i for i, _ in part], src.get([j for _, j in part]).numpy())  # on disk before status
            status[[i for i, _ in part]] = DONE
            write_bytes_atomic(path / "status.u8", status.tobytes())
    return len(pairs)


def _encoder_on(device: str | torch.device, precision: str, encoder: str | ImageEncoder,
                image_size: int) -> tuple[ImageEncoder, torch.device, str]:
    """(the encoder, built or checked, on the device; the device; the precision), both resolved (ValueError)."""
    device = resolve_device(device)
    precision = resolve_precision(AUTO_PRECISION if precision == "auto" else precision, device)
    if device.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        torch.cuda.set_device(device)  # NCCL's collectives (barrier, gather) run on the current device
    if isinstance(encoder, str):
        encoder = build_encoder(encoder, image_size)
    elif encoder.spec.image_size != image_size:
        raise ValueError(f"encoder was built for {encoder.spec.image_size} px, image_size={image_size}")
    return encoder.to(device), device, precision


def _decode_threads(device: torch.device) -> int:
    """Threads decoding images: one beside a CPU CNN (which takes the cores); on a GPU, the cores this process
    shares with the others on its machine (torchrun's LOCAL_WORLD_SIZE), up to MAX_DECODE_THREADS."""
    if device.type == "cpu":
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(MAX_DECODE_THREADS, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def _merge_rank_status(path: Path) -> np.ndarray:
    """Fold status.rank*.u8 (left by a distributed run) into status.u8: done anywhere wins, then failed."""
    status = np.fromfile(path / "status.u8", dtype=np.uint8)
    parts = sorted(path.glob("status.rank*.u8"))
    if parts:
        for part in parts:
            other = np.fromfile(part, dtype=np.uint8)
            status = np.where((other == DONE) | ((other == FAILED) & (status != DONE)), other, status)
        write_bytes_atomic(path / "status.u8", status.tobytes())
        for part in parts:
            part.unlink()
    return status


def _finish_distributed(dist: Distributed, path: Path, index: dict) -> np.ndarray:
    """After every process is done: rank 0 merges statuses and failures; all return the merged status."""
    failures = [f for part in dist.gather(index["failures"]) for f in part]
    dist.barrier()  # every rank's status file is written
    if dist.main:
        status = _merge_rank_status(path)
        still = {f["index"]: f for f in failures if status[f["index"]] == FAILED}
        index["failures"] = [still[i] for i in sorted(still)]
        write_json_atomic(path / "index.json", index)
    dist.barrier()
    return np.fromfile(path / "status.u8", dtype=np.uint8)


# ---------------------------------------------------------------- reading


def _choose(data_dir: Path, encoder: str | None, image_size: int | None) -> Path:
    """The one store under DATA_DIR/features matching encoder / image_size (None: any)."""
    root = data_dir / "features"
    stores = sorted(p.parent for p in root.glob("*/index.json")) if root.is_dir() else []
    specs = {p: _read_index(p)["encoder"] for p in stores}
    match = [
        p for p, s in specs.items()
        if (encoder is None or s["name"] == encoder) and (image_size is None or s["image_size"] == image_size)
    ]
    if len(match) == 1:
        return match[0]
    have = ", ".join(p.name for p in stores) or "none"
    if not match:
        want = " ".join(x for x in (encoder, str(image_size) if image_size else None) if x) or "any"
        flags = (f" --encoder {encoder}" if encoder else "") + (f" --image-size {image_size}" if image_size else "")
        raise FeatureStoreError(
            f"no feature store for {want} in {root} (have: {have}): run imcap features {data_dir}{flags} first"
        )
    raise FeatureStoreError(f"several feature stores in {root} ({have}): say which encoder and image size to use")


def _memmap(path: Path, index: dict) -> np.memmap:
    """The store's (N, P, D) array, a read-only memory map of its dtype."""
    return np.memmap(data_file(path, index), dtype=DTYPES[_dtype(index)][1], mode="r",
                     shape=(index["N"], index["P"], index["D"]))


class FeatureStore:
    """A finished feature store, read-only: features (N, P, D) memory map (float16, or uint8 codes of
    `scale`), ok (N,) bool, spec. get() gives float32 annotations from either."""

    def __init__(self, path: Path, index: dict, features: np.memmap, status: np.ndarray):
        self.path = path
        self.index = index
        self.features = features  # (N, P, D) float16 or uint8, read-only memory map
        self.scale = _scale(index)
        self.status = status  # (N,) uint8: 1 done, 2 failed
        self.ok = status == DONE  # (N,) bool
        self.spec = EncoderSpec.from_dict(index["encoder"])
        self.grid = self.spec.grid

    @classmethod
    def open(
        cls, data_dir: str | os.PathLike, encoder: str | None = None, image_size: int | None = None
    ) -> FeatureStore:
        """Open DATA_DIR's store for encoder/image_size (None: the only one there); refuses an unfinished one."""
        data_dir = Path(data_dir)
        path = _choose(data_dir, encoder, image_size)
        index = _read_index(path)
        status = np.fromfile(path / "status.u8", dtype=np.uint8)
        todo = int((status == NOT_DONE).sum())
        if todo or len(status) != index["N"]:
            name, size = index["encoder"]["name"], index["encoder"]["image_size"]
            raise FeatureStoreError(
                f"{path} is incomplete ({todo} of {index['N']} images not done): "
                f"run imcap features {data_dir} --encoder {name} --image-size {size} to finish it"
            )
        if (data_dir / "dataset.json").exists():
            _, files = read_image_list(data_dir)
            if len(files) != index["N"] or _files_digest(files) != index["images_sha1"]:
                raise FeatureStoreError(f"{path} was made for another dataset.json: extract features again")
        return cls(path, index, _memmap(path, index), status)

    def __len__(self) -> int:
        return len(self.status)

    def get(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """Rows `indices` as float32 (len, P, D); every row must be ok (status 1)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        bad = idx[~self.ok[idx]]
        if len(bad):
            raise FeatureStoreError(f"rows {bad[:5].tolist()} of {self.path} have no features (image failed)")
        order = np.argsort(idx, kind="stable")  # read in file order, each run of consecutive rows at once
        rows = idx[order]
        raw = np.empty((len(idx), *self.features.shape[1:]), dtype=self.features.dtype)  # (len, P, D), sorted
        row_bytes = raw[0].nbytes if len(raw) else 0
        starts = [0, *(np.flatnonzero(np.diff(rows) != 1) + 1).tolist(), len(rows)] if len(rows) else []
        file = data_file(self.path, self.index)
        with open(file, "rb", buffering=0) as f:  # reads, not the memory map: the pages stay out of our RSS
            for a, b in zip(starts[:-1], starts[1:]):
                f.seek(int(rows[a]) * row_bytes)
                if f.readinto(memoryview(raw[a:b]).cast("B")) != (b - a) * row_bytes:
                    raise FeatureStoreError(f"{file}: shorter than index.json says (a damaged store); "
                                            f"extract again with imcap features --overwrite")
        if len(raw) > 1 and np.any(order[1:] < order[:-1]):
            raw = raw[np.argsort(order)]  # back to the order asked, still in the store's dtype
        out = torch.from_numpy(raw).float()  # (len, P, D); torch's float16 conversion is ~4x numpy's
        return out.mul_(self.scale) if self.scale is not None else out
