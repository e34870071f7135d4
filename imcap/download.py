"""Downloading the standard caption datasets: resumable, verified, unpacked safely (`imcap download`).

Each dataset is a list of `RemoteFile`s. A file streams into `DIR/NAME.part`; an interrupted transfer
resumes with an HTTP `Range` request, the finished file is verified (sha256 when one is known, else its
size) and renamed to `DIR/NAME`, then archives are unpacked into DIR. A small state file per file in
`DIR/.imcap-download/` records the verification and the unpacking, so a re-run skips finished work.

Checksums: the publishers of COCO, Flickr8k and the Karpathy splits publish no sha256, and none is
written here that was not published: COCO files are checked by their size, the others by the size the
server announces. The sha256 of every file is computed and recorded in its state file, and a known
digest can be given with `sha256_overrides` (`imcap download --sha256 FILE=HEX`).

Only the standard library talks to the network. `IMCAP_DOWNLOAD_BASE` (or `base_url=`) replaces the
folder part of every URL, e.g. to use a mirror or, in tests, a local server.

Over 400 lines: the transfer (resume, verification) and the safe unpacking (paths, sizes, links) belong to one
operation a user runs and re-runs; each dataset is a few lines of data at the top.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import json
import math
import os
import posixpath
import re
import shutil
import sys
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath, PureWindowsPath

from tqdm import tqdm

from . import __version__
from .fileio import write_json_atomic

BASE_ENV = "IMCAP_DOWNLOAD_BASE"
STATE_DIR = ".imcap-download"
CHUNK = 1 << 20
MAX_UNPACK_RATIO = 20  # an archive may unpack to at most this many times its size ...
MIN_UNPACK_LIMIT = 64 << 20  # ... or to this many bytes, whichever is more
TIMEOUT = 30.0  # seconds without any answer or any byte before a transfer is given up


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    url: str  # where the publisher serves it
    name: str  # file name in DIR
    sha256: str | None = None  # published digest; None: the publisher gives none
    size: int | None = None  # bytes, when known for certain (checked when there is no sha256)
    unpack: str | None = None  # "zip", "tar.gz" or None (keep the file as it is)


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    description: str
    files: tuple[RemoteFile, ...]
    homepage: str  # where a person downloads it by hand (licence terms, mirrors)
    then: str = ""  # the command that reads the files afterwards; {dir}: the download folder


@dataclasses.dataclass
class FileResult:
    name: str
    path: Path  # the downloaded file
    status: str  # "downloaded", "already here" or "unpacked earlier"
    check: str  # "sha256 verified", "size verified" or "not verified (no published checksum or size)"
    sha256: str | None  # digest of the file (None when it was skipped as unpacked earlier)
    unpacked: bool


class DownloadError(OSError):
    """A file could not be fetched, verified or unpacked. `str(e)` is one line; `instructions` says what to do by hand."""

    def __init__(self, message: str, instructions: str = "") -> None:
        super().__init__(message)
        self.instructions = instructions


class UnsafeArchiveError(DownloadError):
    """An archive member would land outside the destination folder (absolute path, `..`, link)."""


_COCO = "http://images.cocodataset.org"
_COCO_HOME = "https://cocodataset.org/#download"

def _coco(year: int, description: str, train: int, val: int, annotations: int) -> Dataset:
    """MS-COCO of `year`: its train and val image zips and its annotations zip, with their exact sizes."""
    return Dataset(f"coco{year}", description, (
        RemoteFile(f"{_COCO}/zips/train{year}.zip", f"train{year}.zip", size=train, unpack="zip"),
        RemoteFile(f"{_COCO}/zips/val{year}.zip", f"val{year}.zip", size=val, unpack="zip"),
        RemoteFile(f"{_COCO}/annotations/annotations_trainval{year}.zip", f"annotations_trainval{year}.zip",
                   size=annotations, unpack="zip"),
    ), _COCO_HOME, f"imcap prepare --format coco {{dir}}/annotations/captions_train{year}.json --out data/coco{year}")


DATASETS: dict[str, Dataset] = {d.name: d for d in (
    _coco(2014, "MS-COCO 2014 train/val images and captions (the Karpathy splits use these images)",
          13_510_573_713, 6_645_013_297, 252_872_794),
    _coco(2017, "MS-COCO 2017 train/val images and captions", 19_336_861_798, 815_585_330, 252_907_541),
    Dataset("flickr8k", "Flickr8k: 8,091 photos, 5 captions each, official splits (~1 GB; cite Hodosh et al. 2013)", (
        RemoteFile("https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/Flickr8k_Dataset.zip",
                   "Flickr8k_Dataset.zip", unpack="zip"),
        RemoteFile("https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/Flickr8k_text.zip",
                   "Flickr8k_text.zip", unpack="zip"),
    ), "https://github.com/jbrownlee/Datasets/releases/tag/Flickr8k",
        "imcap prepare --format flickr8k {dir} --out data/flickr8k"),
    Dataset("karpathy-splits", "Karpathy's caption splits: dataset_coco/flickr8k/flickr30k.json (captions only, no images)", (
        RemoteFile("https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip",
                   "caption_datasets.zip", unpack="zip"),
    ), "https://cs.stanford.edu/people/karpathy/deepimagesent/",
        "imcap prepare --format karpathy {dir}/dataset_coco.json --images COCO2014_DIR --out data/coco-karpathy"),
)}


def get_dataset(name: str) -> Dataset:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


def resolve_url(f: RemoteFile, base_url: str | None = None) -> str:
    """The URL to fetch `f` from: its own, or `base_url` (else $IMCAP_DOWNLOAD_BASE) + its file name."""
    base = base_url if base_url is not None else os.environ.get(BASE_ENV)
    if not base:
        return f.url
    return base.rstrip("/") + "/" + posixpath.basename(urllib.parse.urlsplit(f.url).path)


def manual_instructions(dataset: Dataset, dest: str | os.PathLike, base_url: str | None = None) -> str:
    """What to do when the download cannot run here: where to fetch each file by hand and where to put it."""
    lines = [f"To get {dataset.name} by hand, fetch these files (in a browser, or with wget/curl on another machine):"]
    lines += [f"  {resolve_url(f, base_url)}" for f in dataset.files]
    lines += [f"(publisher's page: {dataset.homepage}). Put them unchanged, under the same names, into {dest}/",
              f"and run `imcap download {dataset.name} --to {dest}` again: files already there are verified",
              "(sha256 or size, where known) and unpacked, not downloaded again."]
    return "\n".join(lines)


def format_listing(datasets: list[Dataset] | None = None) -> str:
    """Each dataset with its files, sizes, how they are checked and where they come from."""
    out = []
    for d in datasets or list(DATASETS.values()):
        known = [f.size for f in d.files if f.size]
        total = f", {human_size(sum(known))} in all" if len(known) == len(d.files) else ""
        out.append(f"{d.name}: {d.description}{total}")
        for f in d.files:
            check = "sha256" if f.sha256 else "size" if f.size else "not verified"
            size = human_size(f.size) if f.size else "size ?"
            out.append(f"  {f.name:30} {size:>9}  {check:12} {f.url}")
        if d.then:
            out.append(f"  then: {d.then.format(dir='DIR')}")
    return "\n".join(out)


def human_size(n: int) -> str:
    """13_510_573_713 -> '13.5 GB' (decimal units, as publishers and wget give them)."""
    if n < 1000:
        return f"{n} B"
    exp = min(3, int(math.log10(n)) // 3)
    return f"{n / 1000 ** exp:.1f} {('KB', 'MB', 'GB')[exp - 1]}"


def download(dataset: str | Dataset, dest: str | os.PathLike, *, unpack: bool = True, base_url: str | None = None,
             sha256_overrides: dict[str, str] | None = None, progress: bool = True, timeout: float = TIMEOUT,
             retries: int = 2, log: Callable[[str], None] | None = None) -> list[FileResult]:
    """Fetch, verify and (unless `unpack=False`) unpack every file of `dataset` into `dest`.

    Resumes `.part` files, skips files already verified or unpacked, re-fetches once a file that fails
    verification. Raises DownloadError (with manual instructions) when a file cannot be fetched.
    `sha256_overrides` maps file names to known digests; `retries` is how many times an interrupted
    transfer that made progress is resumed within this call.
    """
    d = get_dataset(dataset) if isinstance(dataset, str) else dataset
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    overrides = {name: digest.lower() for name, digest in (sha256_overrides or {}).items()}
    for name, digest in overrides.items():
        if name not in {f.name for f in d.files}:
            raise ValueError(f"sha256 given for {name}: not a file of {d.name} ({', '.join(f.name for f in d.files)})")
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ValueError(f"sha256 given for {name}: {digest!r} is not 64 hex digits")
    say = log or ((lambda msg: tqdm.write(msg, file=sys.stderr)) if progress else (lambda msg: None))
    results = []
    for f in d.files:
        if f.name in overrides:
            f = dataclasses.replace(f, sha256=overrides[f.name])
        results.append(_fetch_one(f, d, dest, unpack=unpack, base_url=base_url, progress=progress,
                                  timeout=timeout, retries=retries, say=say))
    return results


def _fetch_one(f: RemoteFile, d: Dataset, dest: Path, *, unpack: bool, base_url: str | None, progress: bool,
               timeout: float, retries: int, say: Callable[[str], None]) -> FileResult:
    final, part = dest / f.name, dest / (f.name + ".part")
    state_path = dest / STATE_DIR / (f.name + ".json")
    state = _read_state(state_path)
    want_unpack = unpack and f.unpack is not None
    if want_unpack and state.get("unpacked") and state.get("url") == f.url and (not f.sha256 or state.get("sha256") == f.sha256):
        return FileResult(f.name, final, "unpacked earlier", state.get("check", "?"), state.get("sha256"), True)

    status, digest = "already here", None
    if final.exists():
        digest, problem = _verify(final, f, None, state, progress)
        if problem:
            say(f"{f.name}: {problem}; fetching it again")
            final.unlink()
    if not final.exists():
        try:
            digest = _download_verified(f, part, resolve_url(f, base_url), progress=progress, timeout=timeout,
                                        retries=retries, say=say)
        except DownloadError as e:
            e.instructions = manual_instructions(d, dest, base_url)
            raise
        os.replace(part, final)
        status = "downloaded"
    check = _check_kind(f)
    state = {"url": f.url, "file": f.name, "size": final.stat().st_size, "mtime_ns": final.stat().st_mtime_ns,
             "sha256": digest, "check": check, "unpacked": False}
    write_json_atomic(state_path, state, fsync=False)
    if want_unpack:
        extract(final, dest, f.unpack)
        write_json_atomic(state_path, {**state, "unpacked": True}, fsync=False)
    return FileResult(f.name, final, status, check, digest, want_unpack)


def _download_verified(f: RemoteFile, part: Path, url: str, *, progress: bool, timeout: float, retries: int,
                       say: Callable[[str], None]) -> str:
    """Fetch `url` into `part` until it verifies (a file that fails is deleted and fetched once more); its sha256."""
    for attempt in (1, 2):
        announced = _transfer(url, part, f, progress=progress, timeout=timeout, retries=retries, say=say)
        digest, problem = _verify(part, f, announced, {}, progress)
        if not problem:
            return digest
        part.unlink()
        if attempt == 1:
            say(f"{f.name}: {problem}; deleted, fetching it again")
    raise DownloadError(f"{f.name}: {problem} (twice, from {url}): the file there is not the expected one")


def _check_kind(f: RemoteFile) -> str:
    return "sha256 verified" if f.sha256 else "size verified" if f.size else "not verified (no published checksum or size)"


def _read_state(path: Path) -> dict:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def sha256_file(path: str | os.PathLike, progress: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh, tqdm(total=os.path.getsize(path), unit="B", unit_scale=True, desc="sha256",
                                      file=sys.stderr, disable=not progress, leave=False) as bar:
        while block := fh.read(CHUNK):
            h.update(block)
            bar.update(len(block))
    return h.hexdigest()


def _verify(path: Path, f: RemoteFile, announced: int | None, state: dict,
            progress: bool) -> tuple[str | None, str | None]:
    """(sha256 of the file, None) when it is the expected file, else (digest or None, what is wrong)."""
    size = path.stat().st_size
    for expected, source in ((f.size, "expected"), (announced, "announced by the server")):
        if expected is not None and size != expected:
            return None, f"{path.name} has {size:,} bytes, {expected:,} {source}"
    # A file verified earlier and untouched since (same size and mtime) is not hashed again.
    if state.get("sha256") and state.get("size") == size and state.get("mtime_ns") == path.stat().st_mtime_ns:
        digest = state["sha256"]
    else:
        digest = sha256_file(path, progress=progress and size > 100 * CHUNK)
    if f.sha256 and digest != f.sha256:
        return digest, f"{path.name} has sha256 {digest[:12]}..., expected {f.sha256[:12]}..."
    return digest, None


def _transfer(url: str, part: Path, f: RemoteFile, *, progress: bool, timeout: float, retries: int,
              say: Callable[[str], None]) -> int | None:
    """Bring `part` to the whole file, resuming what is there; return the total size the server announced."""
    while True:
        have = part.stat().st_size if part.exists() else 0
        try:
            return _request(url, part, have, f, progress=progress, timeout=timeout)
        except _Interrupted as e:
            if retries <= 0 or e.received == 0:
                raise DownloadError(f"{f.name}: transfer from {url} interrupted ({e.reason}); "
                                    f"{part.name} kept: re-run to resume") from None
            retries -= 1
            say(f"{f.name}: transfer interrupted ({e.reason}); resuming")


class _Interrupted(Exception):
    """The body broke off after `received` bytes (kept in the .part file)."""

    def __init__(self, reason: str, received: int) -> None:
        super().__init__(reason)
        self.reason, self.received = reason, received


_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def _request(url: str, part: Path, have: int, f: RemoteFile, *, progress: bool, timeout: float) -> int | None:
    """One HTTP request appending to `part` from byte `have`. Raises DownloadError, or _Interrupted mid-body."""
    req = urllib.request.Request(url, headers={"User-Agent": f"imcap/{__version__}"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and have:  # nothing after byte `have`: the .part is complete (or too long: verify says)
            m = re.fullmatch(r"bytes \*/(\d+)", e.headers.get("Content-Range", "") or "")
            return int(m.group(1)) if m else None
        raise DownloadError(f"{f.name}: cannot download {url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", None) or e
        raise DownloadError(f"{f.name}: cannot download {url}: {reason} (offline, or the host is unreachable?)") from None
    with resp:
        length = resp.headers.get("Content-Length")
        if resp.status == 206:
            m = _CONTENT_RANGE.fullmatch(resp.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) > have:
                raise DownloadError(f"{f.name}: {url} answered a range request with a bad Content-Range "
                                    f"{resp.headers.get('Content-Range')!r}")
            start, total = int(m.group(1)), None if m.group(3) == "*" else int(m.group(3))
        else:  # 200: the server ignored the range (or there was none): the body is the whole file
            start, total = 0, int(length) if length and length.isdigit() else None
        if f.size is not None and total is not None and total != f.size:
            raise DownloadError(f"{f.name}: {url} serves {total:,} bytes, {f.size:,} expected: "
                                "the file there is not the expected one")
        with open(part, "r+b" if part.exists() else "wb") as out, \
                tqdm(total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024, desc=f.name,
                     file=sys.stderr, disable=not progress, leave=False) as bar:
            out.truncate(start)
            out.seek(start)
            try:
                while block := resp.read(CHUNK):
                    out.write(block)
                    bar.update(len(block))
            except (OSError, http.client.HTTPException) as e:  # timeout, reset, IncompleteRead
                raise _Interrupted(str(e) or type(e).__name__, out.tell() - start) from None
            received, expected = out.tell() - start, int(length) if length and length.isdigit() else None
        if expected is not None and received < expected:  # read() just stops when the server hangs up early
            raise _Interrupted(f"connection closed after {received:,} of {expected:,} bytes", received)
        return total


def _check_member(name: str, root: Path) -> None:
    """Refuse absolute names, drive letters and `..` in either slash style. (Checked on the name alone, so
    a folder of DIR that the user made a symlink, e.g. to another disk, is still unpacked into.)"""
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or name.startswith(("/", "\\")) \
            or ".." in posix.parts or ".." in windows.parts:
        raise UnsafeArchiveError(f"refusing to unpack member {name!r}: it would land outside {root}")


def unpack_limit(archive_bytes: int) -> int:
    """The most bytes an archive of `archive_bytes` may unpack to: MAX_UNPACK_RATIO times its size, at least
    MIN_UNPACK_LIMIT. The listed archives hold JPEGs (about 1x) and caption JSON or text (4-5x with zip -9)."""
    return max(MAX_UNPACK_RATIO * archive_bytes, MIN_UNPACK_LIMIT)


def _check_unpacked_size(archive: Path, root: Path, unpacked: int) -> None:
    """Refuse an archive that would unpack to more than unpack_limit() (a zip bomb) or than the free space."""
    limit = unpack_limit(archive.stat().st_size)
    if unpacked > limit:
        raise UnsafeArchiveError(f"refusing to unpack: its members add up to {human_size(unpacked)}, over the "
                                 f"limit of {human_size(limit)} for an archive of this size (possible zip bomb)")
    existing = next(p for p in (root, *root.parents) if p.exists())  # root itself may not exist yet
    free = shutil.disk_usage(existing).free
    if unpacked > free:
        raise DownloadError(f"{archive.name}: cannot unpack into {root}: needs {human_size(unpacked)}, "
                            f"{human_size(free)} free")


def extract(archive: str | os.PathLike, dest: str | os.PathLike, kind: str) -> None:
    """Unpack a "zip" or "tar.gz" archive into `dest`, refusing any member that would land outside it and
    archives that would unpack to far more than their size (unpack_limit) or than the free space."""
    archive, root = Path(archive), Path(dest).resolve()
    try:
        if kind == "zip":
            with zipfile.ZipFile(archive) as z:
                for info in z.infolist():
                    _check_member(info.filename, root)
                # zipfile reads no member past its declared size, so the declared sizes bound what is written
                _check_unpacked_size(archive, root, sum(info.file_size for info in z.infolist()))
                z.extractall(root)
        elif kind == "tar.gz":
            with tarfile.open(archive, "r:gz") as t:
                for member in t.getmembers():
                    _check_member(member.name, root)
                    if member.issym() or member.islnk():  # symlinks point from their folder, hard links from the root
                        target = posixpath.join(posixpath.dirname(member.name), member.linkname) if member.issym() \
                            else member.linkname
                        _check_member(posixpath.normpath(target), root)
                _check_unpacked_size(archive, root, sum(member.size for member in t.getmembers()))
                if hasattr(tarfile, "data_filter"):  # also drops device files and unsafe permissions
                    t.extractall(root, filter="data")
                else:
                    t.extractall(root)
        else:
            raise ValueError(f"unknown archive kind {kind!r} (zip or tar.gz)")
    except UnsafeArchiveError as e:
        raise UnsafeArchiveError(f"{archive.name}: {e}") from None
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as e:
        raise DownloadError(f"{archive.name}: cannot unpack ({e}); delete it and re-run to fetch it again") from None
