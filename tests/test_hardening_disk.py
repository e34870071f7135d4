"""A full disk (issue 13): `imcap features`, `imcap train` and `imcap prepare` stop with one line naming the file
and the space needed / free, exit status 1, and lose nothing already done. The writes are faked to fail with
ENOSPC; the last tests use a real tiny tmpfs and run only as root (mount needs it)."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import SafetensorError

import imcap.features as features_module
from imcap import checkpoint as ckpt
from imcap.cli import main
from imcap.encoders import build_encoder, encoder_spec
from imcap.features import FeatureStore, extract_features
from imcap.fileio import WriteError, write_json_atomic
from imcap.model import ModelConfig, ShowAttendTell
from imcap.text import Vocabulary

REPO = Path(__file__).resolve().parents[1]
SIZE = 64  # encoder input: 2 x 2 grid
STORE = f"features/efficientnet-lite0-{SIZE}"
FULL = r"No space left on device \((needs [\d.]+ [KMG]?B, )?[\d.]+ [KMG]?B free\)"
TRAIN = ["--epochs", "2", "--embed-dim", "8", "--hidden-dim", "16", "--attention-dim", "8", "--batch-size", "64",
         "--val-images", "4", "--quiet"]


def run_main(args: list[str]) -> tuple[int, str, list[str]]:
    """`imcap ARGS` in this process: (exit status, stdout, stderr lines)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main([str(a) for a in args])
    return status, out.getvalue(), err.getvalue().splitlines()


def enospc(path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


@pytest.fixture
def data_dir(tiny_data, tmp_path) -> Path:
    """A DATA_DIR of tiny_data's 40 images, without features."""
    for name in ("dataset.json", "vocab.json"):
        shutil.copy(tiny_data / name, tmp_path / name)
    return tmp_path


@pytest.fixture
def encoder(monkeypatch):
    """The random-weight encoder of tiny_data, also what `imcap features` builds here."""
    torch.manual_seed(0)
    enc = build_encoder("efficientnet-lite0", SIZE, pretrained=False)
    monkeypatch.setattr(features_module, "build_encoder", lambda name, size: enc)
    return enc


def fail_writes_of(monkeypatch, name: str, after: int = 0) -> None:
    """Writes to files named `name` (their atomic temporaries included) fail with ENOSPC after `after` succeeded."""
    write_bytes, done = Path.write_bytes, []

    def fake(self, data):
        if self.name == name or self.name.startswith(f".{name}."):
            if len(done) >= after:
                raise enospc(self)
            done.append(self)
        return write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", fake)


# ---------------------------------------------------------------- imcap features


def test_features_that_cannot_reserve_its_store_is_one_line_and_a_rerun_finishes(data_dir, encoder, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    status, _, err = run_main(["features", data_dir, "--image-size", SIZE, "--quiet"])
    store = data_dir / STORE
    assert status == 1 and len(err) == 1, err
    assert re.fullmatch(rf"imcap features: error: {re.escape(str(store))}/features.f16: {FULL}", err[0]), err
    assert "needs 409.6 KB" in err[0]  # 40 rows of 4 x 1280 float16
    assert not np.fromfile(store / "status.u8", dtype=np.uint8).any()  # nothing claimed

    monkeypatch.undo()
    monkeypatch.setattr(features_module, "build_encoder", lambda name, size: encoder)
    status, out, err = run_main(["features", data_dir, "--image-size", SIZE, "--quiet"])
    assert status == 0 and err == [] and "40 of 40 images" in out


def test_features_whose_row_write_fails_keeps_the_rows_done_and_resumes(data_dir, tiny_data, encoder, monkeypatch):
    """Where the space cannot be reserved (a file system without fallocate), the rows are written with plain
    writes: the full disk is an OSError (a write through the memory map would die of SIGBUS)."""

    def unsupported(fd, offset, length):
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    rows_file, real_open, written = data_dir / STORE / "features.f16", open, []

    class Filling(io.RawIOBase):
        """features.f16 opened for writing on a disk that fills after 3 batches of 4 rows."""

        def __init__(self, f):
            self.f = f

        def seek(self, offset, whence=0):
            return self.f.seek(offset, whence)

        def write(self, data):
            if len(written) >= 12:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            written.append(len(data))
            return self.f.write(data)

        def fileno(self):
            return self.f.fileno()

        def close(self):
            self.f.close()

    def fake_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return Filling(f) if Path(file) == rows_file and "+" in mode else f

    monkeypatch.setattr(os, "posix_fallocate", unsupported, raising=False)
    monkeypatch.setattr(features_module, "open", fake_open, raising=False)
    status, _, err = run_main(["features", data_dir, "--image-size", SIZE, "--quiet"])
    assert status == 1 and len(err) == 1, err
    assert re.fullmatch(rf"imcap features: error: {re.escape(str(rows_file))}: {FULL}", err[0]), err
    done = np.fromfile(rows_file.with_name("status.u8"), dtype=np.uint8)
    assert done.tolist() == [1] * 12 + [0] * 28  # the rows on disk, and only those
    expected = FeatureStore.open(tiny_data).features  # an uninterrupted run with this encoder
    assert np.array_equal(np.fromfile(rows_file, dtype=np.float16).reshape(expected.shape)[:12], expected[:12])

    monkeypatch.setattr(features_module, "open", real_open, raising=False)
    summary = extract_features(data_dir, encoder=encoder, image_size=SIZE, progress=False)
    assert (summary["encoded"], summary["done"]) == (28, 40)
    assert rows_file.read_bytes() == (tiny_data / STORE / "features.f16").read_bytes()


def test_an_old_sparse_store_is_reserved_when_reopened(data_dir, encoder, monkeypatch):
    """A store made by an imcap that left features.f16 sparse gets its space reserved on the next run."""
    extract_features(data_dir, encoder=encoder, image_size=SIZE, progress=False)
    file = data_dir / STORE / "features.f16"
    calls = []
    monkeypatch.setattr(os, "posix_fallocate", lambda fd, off, n: calls.append((off, n)), raising=False)
    monkeypatch.setattr(features_module, "_unallocated", lambda f, size: size)  # as sparse as a fresh old store
    extract_features(data_dir, encoder=encoder, image_size=SIZE, progress=False)
    assert calls and calls[0] == (0, file.stat().st_size)


# ---------------------------------------------------------------- checkpoints


def small_model() -> tuple[ShowAttendTell, dict, torch.optim.Optimizer]:
    vocab = Vocabulary.build([["a", "red", "circle"]], min_count=1)
    spec = encoder_spec("efficientnet-lite0", SIZE)
    model = ShowAttendTell(ModelConfig(vocab_size=len(vocab), feature_dim=spec.feature_dim, embed_dim=8,
                                       hidden_dim=16, attention_dim=8))
    meta = {"model_config": model.config.to_dict(), "vocab": vocab.to_dict(), "encoder": spec.to_dict(), "language": "en"}
    return model, meta, torch.optim.Adam(model.parameters())


@pytest.mark.parametrize("failing", ["model.safetensors", "optimizer.safetensors", "checkpoint.json", "rename"])
def test_a_checkpoint_that_cannot_be_written_leaves_the_previous_one(tmp_path, monkeypatch, failing):
    torch.manual_seed(0)
    model, meta, opt = small_model()
    path = ckpt.save_checkpoint(tmp_path / "checkpoint", model, {**meta, "progress": {"epoch": 1}}, opt)
    before = {f.name: f.read_bytes() for f in path.iterdir()}
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # the next checkpoint would differ

    save_file, replace = ckpt.save_file, os.replace
    if failing.endswith(".safetensors"):
        def fake_save(tensors, file):
            if Path(file).name == failing:
                Path(file).write_bytes(b"partial")
                raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
            save_file(tensors, file)

        monkeypatch.setattr(ckpt, "save_file", fake_save)
    elif failing == "checkpoint.json":
        fail_writes_of(monkeypatch, "checkpoint.json")
    else:
        def fake_replace(src, dst):
            if Path(src).name == "checkpoint.tmp":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(src), None, str(dst))
            replace(src, dst)

        monkeypatch.setattr(os, "replace", fake_replace)

    with pytest.raises(OSError) as caught:
        ckpt.save_checkpoint(path, model, {**meta, "progress": {"epoch": 2}}, opt)
    named = path if failing == "rename" else path / failing
    assert isinstance(caught.value, WriteError)
    assert re.fullmatch(rf"{re.escape(str(named))}: {FULL}", str(caught.value)), str(caught.value)
    assert "needs " in str(caught.value)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]  # no .tmp, no .old
    assert {f.name: f.read_bytes() for f in path.iterdir()} == before
    assert ckpt.load_checkpoint(path)[0]["progress"] == {"epoch": 1}


def test_a_failed_atomic_write_names_the_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    file = tmp_path / "metrics.json"
    file.write_text("old\n")
    fail_writes_of(monkeypatch, "metrics.json")
    with pytest.raises(WriteError, match=rf"^{re.escape(str(file))}: {FULL}$") as caught:
        write_json_atomic(file, {"a": 1})
    assert "needs 12 B" in str(caught.value)
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"] and file.read_text() == "old\n"


# ---------------------------------------------------------------- imcap train


def fail_the_second_epochs_checkpoint(monkeypatch) -> None:
    save_file, calls = ckpt.save_file, []

    def fake(tensors, file):
        calls.append(file)  # epoch 1: best and checkpoint = 3 files; epoch 2 starts with checkpoint's model
        if len(calls) > 3 and Path(file).parent.name == "checkpoint.tmp":
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        save_file(tensors, file)

    monkeypatch.setattr(ckpt, "save_file", fake)


@pytest.mark.parametrize("failing", ["checkpoint", "metrics.jsonl"])
def test_train_on_a_full_disk_is_one_line_and_resumes_from_the_last_checkpoint(tiny_data, tmp_path, monkeypatch,
                                                                               failing):
    run = tmp_path / "run"
    monkeypatch.setattr("imcap.train._tensorboard", lambda path, step: None)
    if failing == "checkpoint":
        fail_the_second_epochs_checkpoint(monkeypatch)
        named = run / "checkpoint" / "model.safetensors"
    else:
        fail_writes_of(monkeypatch, "metrics.jsonl", after=1)  # epoch 1's is written
        named = run / "metrics.jsonl"
    status, out, err = run_main(["train", tiny_data, "--out", run, *TRAIN])
    assert status == 1 and len(err) == 1, err
    assert re.fullmatch(rf"imcap train: error: {re.escape(str(named))}: {FULL}", err[0]), err
    assert "epoch 2:" in out
    assert not [p.name for p in run.iterdir() if p.name.endswith((".tmp", ".old"))]
    epoch = 1 if failing == "checkpoint" else 2  # the checkpoint is written before metrics.jsonl
    assert ckpt.load_checkpoint(run / "checkpoint")[0]["progress"]["epoch"] == epoch
    assert ckpt.load_checkpoint(run / "best")[0]["format"] == ckpt.FORMAT

    monkeypatch.undo()
    monkeypatch.setattr("imcap.train._tensorboard", lambda path, step: None)
    status, out, err = run_main(["train", tiny_data, "--out", run, *TRAIN])
    assert status == 0 and err == [] and "after 2 epochs" in out
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2


def test_tensorboard_on_a_full_disk_is_one_warning_and_training_goes_on(tiny_data, tmp_path, monkeypatch):
    record_writer = pytest.importorskip("tensorboard.summary.writer.record_writer")

    def full(self, data):  # runs in TensorBoard's writer thread
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(record_writer.RecordWriter, "write", full)
    run = tmp_path / "run"
    status, out, err = run_main(["train", tiny_data, "--out", run, *TRAIN])
    assert status == 0 and "after 2 epochs" in out
    assert len(err) == 1 and err[0].startswith(f"imcap train: warning: {run / 'tb'}: No space left on device"), err
    assert err[0].endswith("; TensorBoard logging stopped")


# ---------------------------------------------------------------- imcap prepare


def test_prepare_on_a_full_disk_names_the_file_in_data_dir(tiny_data, tmp_path, monkeypatch):
    source = json.loads((tiny_data / "dataset.json").read_text())["source"]
    out = tmp_path / "data"
    fail_writes_of(monkeypatch, "dataset.json")
    status, _, err = run_main(["prepare", source, "--format", "karpathy", "--out", out, "--min-count", "1", "--quiet"])
    assert status == 1 and len(err) == 1, err
    assert re.fullmatch(rf"imcap prepare: error: {re.escape(str(out))}/dataset.json: {FULL}", err[0]), err
    assert list(out.iterdir()) == []  # no staging folder left


# ---------------------------------------------------------------- a real full disk (root only)


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """mount(size) -> a fresh tmpfs of `size` (e.g. "1m"), unmounted afterwards; skips unless root can mount."""
    mounted = []

    def mount(size: str) -> Path:
        if os.geteuid() != 0:
            pytest.skip("a real full disk needs root (mount -t tmpfs); the faked tests above cover it otherwise")
        d = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        mounted.append(d)
        return d

    yield mount
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], check=False)


def remount(d: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(d)], check=True)


def test_features_on_a_real_full_disk_exits_1_without_sigbus_and_resumes(tiny_data, tiny_tmpfs):
    """40 rows of 1280 x 2 x 2 float16 = 410 KB into a 256 KB tmpfs: before the fix, SIGBUS (exit -7)."""
    d = tiny_tmpfs("256k")
    for name in ("dataset.json", "vocab.json"):
        shutil.copy(tiny_data / name, d / name)
    code = ("import sys, torch; import imcap.features as f; from imcap.cli import main; from imcap.encoders import "
            f"build_encoder; torch.manual_seed(0); e = build_encoder('efficientnet-lite0', {SIZE}, pretrained=False); "
            f"f.build_encoder = lambda n, s: e; sys.exit(main(['features', {str(d)!r}, '--image-size', '{SIZE}', "
            "'--quiet', '--threads', '1']))")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    store = d / STORE
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert re.fullmatch(rf"imcap features: error: {re.escape(str(store))}/features.f16: {FULL}\n", r.stderr), r.stderr
    remount(d, "2m")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert (store / "features.f16").read_bytes() == (tiny_data / STORE / "features.f16").read_bytes()


def test_a_checkpoint_on_a_real_full_disk_leaves_the_previous_one(tiny_tmpfs):
    d = tiny_tmpfs("1m")
    torch.manual_seed(0)
    model, meta, opt = small_model()
    path = ckpt.save_checkpoint(d / "checkpoint", model, meta)  # 584 KB: one fits, two do not
    before = {f.name: f.read_bytes() for f in path.iterdir()}
    with pytest.raises(WriteError, match=rf"^{re.escape(str(path))}/model.safetensors: {FULL}$"):
        ckpt.save_checkpoint(path, model, meta, opt)
    assert sorted(p.name for p in d.iterdir()) == ["checkpoint"]
    assert {f.name: f.read_bytes() for f in path.iterdir()} == before
