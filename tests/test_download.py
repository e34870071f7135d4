"""imcap download against a local HTTP server: resume with Range, sha256 verification, safe unpacking, offline errors."""

import hashlib
import io
import os
import re
import shutil
import socket
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from imcap.cli import main
from imcap.download import (
    DATASETS,
    STATE_DIR,
    Dataset,
    DownloadError,
    RemoteFile,
    UnsafeArchiveError,
    download,
    extract,
    unpack_limit,
)


def make_zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def make_tar_gz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


IMAGES = {f"pics/{i}.jpg": os.urandom(20_000) for i in range(10)}  # 200 KB, incompressible
ZIP = make_zip(IMAGES)
TAR = make_tar_gz({"captions/captions.txt": b"0.jpg, a red square\n" * 500})
CUT = 50_000  # bytes sent before an interrupted transfer breaks off


class Server:
    """Serves `files` with Range support; records every request; can break off or ignore ranges on demand."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.requests: list[tuple[str, str | None, int]] = []  # (path, Range header, status)
        self.sent = 0  # body bytes sent, all requests together
        self.cut_next: dict[str, int] = {}  # path -> send only this many bytes on its next request, then close
        self.ignore_range = False
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                path = self.path.lstrip("/")
                rng = self.headers.get("Range")
                data = server.files.get(path)
                if data is None:
                    return self._reply(path, rng, 404, b"not found", {})
                m = re.fullmatch(r"bytes=(\d+)-", rng or "")
                if not m or server.ignore_range:
                    return self._reply(path, rng, 200, data, {})
                start = int(m.group(1))
                if start >= len(data):
                    return self._reply(path, rng, 416, b"", {"Content-Range": f"bytes */{len(data)}"})
                return self._reply(path, rng, 206, data[start:],
                                   {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"})

            def _reply(self, path, rng, status, body, headers):
                server.requests.append((path, rng, status))
                self.send_response(status)
                for k, v in {"Content-Length": str(len(body)), **headers}.items():
                    self.send_header(k, v)
                self.end_headers()
                if path in server.cut_next:  # announce the whole body, send a part, hang up
                    body = body[:server.cut_next.pop(path)]
                    self.close_connection = True
                self.wfile.write(body)
                server.sent += len(body)

            def log_message(self, *args):
                pass

        return Handler

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server({"tiny.zip": ZIP, "tiny.tar.gz": TAR})
    yield s
    s.close()


def tiny_dataset(server: Server, *, zip_sha: str | None = None, zip_size: int | None = None) -> Dataset:
    return Dataset("tiny", "a tiny test dataset", (
        RemoteFile(f"{server.url}/tiny.zip", "tiny.zip", zip_sha or hashlib.sha256(ZIP).hexdigest(), zip_size, "zip"),
        RemoteFile(f"{server.url}/tiny.tar.gz", "tiny.tar.gz", None, len(TAR), "tar.gz"),  # checked by size only
    ), homepage="https://example.org/tiny")


def assert_unpacked(dest):
    assert all((dest / name).read_bytes() == data for name, data in IMAGES.items())
    assert (dest / "captions/captions.txt").read_text().startswith("0.jpg, a red square")


def test_full_download_verifies_and_unpacks(server, tmp_path):
    results = download(tiny_dataset(server), tmp_path, progress=False)
    assert [r.status for r in results] == ["downloaded", "downloaded"]
    assert [r.check for r in results] == ["sha256 verified", "size verified"]
    assert (tmp_path / "tiny.zip").read_bytes() == ZIP and not (tmp_path / "tiny.zip.part").exists()
    assert_unpacked(tmp_path)
    assert (tmp_path / STATE_DIR / "tiny.zip.json").exists()
    assert [status for _, _, status in server.requests] == [200, 200]


def test_second_run_downloads_nothing(server, tmp_path):
    download(tiny_dataset(server), tmp_path, progress=False)
    n = len(server.requests)
    assert [r.status for r in download(tiny_dataset(server), tmp_path, progress=False)] == ["unpacked earlier"] * 2
    packed = tmp_path / "packed"
    download(tiny_dataset(server), packed, unpack=False, progress=False)
    assert not (packed / "pics").exists()
    assert [r.status for r in download(tiny_dataset(server), packed, unpack=False, progress=False)] == ["already here"] * 2
    assert len(server.requests) == n + 2  # only the two files of the `packed` folder, once


def test_interrupted_transfer_resumes_with_range(server, tmp_path):
    server.cut_next["tiny.zip"] = CUT
    with pytest.raises(DownloadError, match="interrupted.*re-run to resume"):
        download(tiny_dataset(server), tmp_path, progress=False, retries=0)
    assert (tmp_path / "tiny.zip.part").stat().st_size == CUT
    download(tiny_dataset(server), tmp_path, progress=False)
    assert ("tiny.zip", f"bytes={CUT}-", 206) in server.requests
    assert server.sent - len(TAR) < 2 * len(ZIP)
    assert (tmp_path / "tiny.zip").read_bytes() == ZIP
    assert_unpacked(tmp_path)


def test_interrupted_transfer_resumes_within_one_run(server, tmp_path):
    server.cut_next["tiny.zip"] = CUT
    download(tiny_dataset(server), tmp_path, progress=False)  # retries=2 by default
    assert [(p, r) for p, r, _ in server.requests if p == "tiny.zip"] == [("tiny.zip", None), ("tiny.zip", f"bytes={CUT}-")]
    assert (tmp_path / "tiny.zip").read_bytes() == ZIP


def test_corrupted_part_is_detected_and_fetched_again(server, tmp_path):
    (tmp_path / "tiny.zip.part").write_bytes(b"\0" * CUT)  # wrong bytes: resuming after them gives a bad file
    logged = []
    download(tiny_dataset(server), tmp_path, progress=False, log=logged.append)
    zip_requests = [r for p, r, _ in server.requests if p == "tiny.zip"]
    assert zip_requests == [f"bytes={CUT}-", None]  # resumed, failed sha256, deleted, fetched whole
    assert any("sha256" in line and "fetching it again" in line for line in logged)
    assert (tmp_path / "tiny.zip").read_bytes() == ZIP


def test_corrupted_final_file_is_detected_and_fetched_again(server, tmp_path):
    (tmp_path / "tiny.zip").write_bytes(ZIP[:-10] + b"0123456789")  # right size, wrong bytes
    results = download(tiny_dataset(server), tmp_path, progress=False, log=lambda msg: None)
    assert results[0].status == "downloaded"
    assert (tmp_path / "tiny.zip").read_bytes() == ZIP


def test_wrong_file_on_the_server_fails_after_a_second_try(server, tmp_path):
    with pytest.raises(DownloadError, match="not the expected one") as e:
        download(tiny_dataset(server, zip_sha="0" * 64), tmp_path, progress=False, log=lambda msg: None)
    assert "by hand" in e.value.instructions
    assert [p for p, _, _ in server.requests] == ["tiny.zip", "tiny.zip"]
    assert not (tmp_path / "tiny.zip").exists() and not (tmp_path / "tiny.zip.part").exists()


def test_server_ignoring_range_still_gives_the_right_file(server, tmp_path):
    server.ignore_range = True
    (tmp_path / "tiny.zip.part").write_bytes(ZIP[:CUT])
    download(tiny_dataset(server, zip_size=len(ZIP)), tmp_path, progress=False)
    assert server.requests[0] == ("tiny.zip", f"bytes={CUT}-", 200)
    assert (tmp_path / "tiny.zip").read_bytes() == ZIP


def test_complete_part_gets_416_and_is_verified(server, tmp_path):
    (tmp_path / "tiny.zip.part").write_bytes(ZIP)  # e.g. killed between the last byte and the rename
    download(tiny_dataset(server), tmp_path, progress=False)
    assert server.requests[0] == ("tiny.zip", f"bytes={len(ZIP)}-", 416)
    assert (tmp_path / "tiny.zip").read_bytes() == ZIP


def test_http_error_names_file_url_and_status(server, tmp_path):
    missing = Dataset("gone", "", (RemoteFile(f"{server.url}/gone.zip", "gone.zip", unpack="zip"),), "https://example.org")
    with pytest.raises(DownloadError, match=r"gone\.zip: cannot download http://127\.0\.0\.1:\d+/gone\.zip: HTTP 404"):
        download(missing, tmp_path, progress=False)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_host_one_line_and_manual_instructions_then_hand_placed_file(tmp_path, monkeypatch, capsys):
    base = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("IMCAP_DOWNLOAD_BASE", base)
    dest = tmp_path / "karpathy"
    assert main(["download", "karpathy-splits", "--to", str(dest), "--quiet"]) == 1
    err = capsys.readouterr().err
    first, *rest = err.splitlines()
    assert first.startswith(f"imcap download: error: caption_datasets.zip: cannot download {base}/caption_datasets.zip: ")
    assert "Traceback" not in err
    manual = "\n".join(rest)
    assert "by hand" in manual and f"{base}/caption_datasets.zip" in manual and str(dest) in manual
    assert f"imcap download karpathy-splits --to {dest}" in manual

    # The complete file put there by hand is used (still offline), and unpacked.
    (dest / "caption_datasets.zip").write_bytes(make_zip({"dataset_flickr8k.json": b'{"images": []}'}))
    assert main(["download", "karpathy-splits", "--to", str(dest), "--quiet"]) == 0
    assert (dest / "dataset_flickr8k.json").exists()
    assert "caption_datasets.zip: already here" in capsys.readouterr().out


def test_cli_list_and_sha256_option(server, tmp_path, monkeypatch, capsys):
    assert main(["download", "--list"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in ("coco2014", "coco2017", "flickr8k", "karpathy-splits"))
    assert "train2014.zip" in listing and "13.5 GB" in listing
    monkeypatch.setitem(DATASETS, "tiny", tiny_dataset(server))
    args = ["download", "tiny", "--to", str(tmp_path), "--quiet", "--no-unpack"]
    assert main(args + ["--sha256", "tiny.zip=" + "ab" * 32]) == 1
    assert "not the expected one" in capsys.readouterr().err
    assert main(args + ["--sha256", "tiny.zip=" + hashlib.sha256(ZIP).hexdigest()]) == 0
    assert "tiny.zip: downloaded, sha256 verified" in capsys.readouterr().out
    assert main(args + ["--sha256", "tiny.zip=xyz"]) == 1
    assert "not 64 hex digits" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["../evil.txt", "/tmp/evil.txt", "a/../../evil.txt"])
def test_archive_member_escaping_dir_is_refused(server, tmp_path, name):
    server.files["tiny.zip"] = make_zip({"ok.txt": b"fine", name: b"evil"})
    dataset = tiny_dataset(server, zip_sha=hashlib.sha256(server.files["tiny.zip"]).hexdigest())
    dest = tmp_path / "dest"
    with pytest.raises(UnsafeArchiveError, match="refusing to unpack"):
        download(dataset, dest, progress=False)
    assert not (tmp_path / "evil.txt").exists() and not (dest / "ok.txt").exists()


@pytest.mark.parametrize("name, linkname", [("../evil.txt", None), ("/tmp/evil.txt", None),
                                            ("inside/link", "../../outside"), ("link", "/etc/passwd")])
def test_tar_members_and_links_out_of_dir_are_refused(tmp_path, name, linkname):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        info = tarfile.TarInfo(name)
        if linkname:
            info.type, info.linkname = tarfile.SYMTYPE, linkname
        t.addfile(info)
    (tmp_path / "bad.tar.gz").write_bytes(buf.getvalue())
    with pytest.raises(UnsafeArchiveError, match="bad.tar.gz: refusing"):
        extract(tmp_path / "bad.tar.gz", tmp_path / "dest", "tar.gz")
    assert not (tmp_path / "dest").exists() and not (tmp_path / "evil.txt").exists()


def test_server_size_differing_from_the_registry_is_refused_before_downloading(server, tmp_path):
    with pytest.raises(DownloadError, match=f"serves {len(ZIP):,} bytes, {len(ZIP) + 1:,} expected"):
        download(tiny_dataset(server, zip_size=len(ZIP) + 1), tmp_path, progress=False)
    assert not (tmp_path / "tiny.zip.part").exists()  # refused on the headers, nothing written


def test_an_archive_unpacking_to_far_more_than_its_size_is_refused(tmp_path):
    # a zip bomb: 200 MB of zeros compress to about 200 kB, over the 64 MB floor and 20x the archive
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z, z.open("zeros.bin", "w", force_zip64=True) as member:
        block = bytes(1_000_000)
        for _ in range(200):
            member.write(block)
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(UnsafeArchiveError, match=r"bomb.zip: refusing to unpack: its members add up to 200\.0 MB"):
        extract(bomb, tmp_path / "dest", "zip")
    assert not (tmp_path / "dest").exists()
    assert unpack_limit(10 << 20) == 200 << 20 and unpack_limit(1000) == 64 << 20


def test_an_archive_larger_than_the_free_space_is_refused_before_unpacking(tmp_path, monkeypatch):
    archive = tmp_path / "a.zip"
    archive.write_bytes(make_zip({"a.txt": b"x" * 5000}))
    free = shutil.disk_usage(tmp_path)._replace(free=1000)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: free)
    with pytest.raises(DownloadError, match=r"a.zip: cannot unpack into .*needs 5\.0 KB, 1\.0 KB free"):
        extract(archive, tmp_path / "dest", "zip")
    assert not (tmp_path / "dest").exists()
