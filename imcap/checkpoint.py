"""Checkpoints: safetensors tensors + one JSON file, never pickles; written as a whole or not at all.

A checkpoint is a directory:
    model.safetensors       the decoder's weights
    encoder.safetensors     fine-tuned encoder weights (end-to-end runs only, finetune.py): the trained top
                            blocks of the trunk, keyed as in its state_dict; the rest comes from the encoder spec
    optimizer.safetensors   optimizer state tensors and the torch RNG state, + the CUDA one when trained on a GPU
                            (training checkpoints only)
    checkpoint.json         configs, vocabulary, encoder spec, progress, metrics, optimizer hyper-parameters

A checkpoint with encoder weights says so in checkpoint.json ("encoder_weights": "encoder.safetensors")
and is format version 2, so that an imcap that would ignore the file refuses it instead.

It is written to `<dir>.tmp`, then swapped in with renames; `<dir>.old` is the previous one and is
used if a kill landed between the two renames. A write that fails (a full disk) removes `<dir>.tmp`, leaves
the previous checkpoint as it was and raises a WriteError naming the file.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .checks import shown
from .fileio import write_error, write_json_atomic

FORMAT = "imcap-checkpoint"
VERSION = 2  # the newest version read; 1: decoder only, 2: may carry encoder weights
ENCODER_FILE = "encoder.safetensors"
ENSEMBLE_FILE = "ensemble.json"  # in a RUN_DIR whose member runs decode together: {"members": ["m1", ...]}
REQUIRED_KEYS = ("format", "version", "model_config", "vocab", "encoder")
OPTIONAL_OBJECTS = ("train_config", "progress", "data", "metrics", "optimizer")  # objects when present


class CheckpointError(Exception):
    """A checkpoint that is missing, incomplete or not one of ours; the message is one line."""


def save_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    meta: dict,
    optimizer: torch.optim.Optimizer | None = None,
    encoder_weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write model weights, meta (JSON-able) and optionally optimizer + RNG state and fine-tuned encoder
    weights to directory `path`. WriteError (an OSError) naming the file when one cannot be written.

    Device-free: every tensor is saved from the CPU. A model on a CUDA device also saves that device's RNG
    state (rng.cuda: dropout and sampling draw from it there), for an exact resume on the same device."""
    path = Path(path)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    files = {"model.safetensors": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}}
    meta = {"format": FORMAT, "version": 1, **meta}
    if encoder_weights is not None:
        files[ENCODER_FILE] = {k: v.detach().cpu().contiguous() for k, v in encoder_weights.items()}
        meta.update(version=2, encoder_weights=ENCODER_FILE)
    if optimizer is not None:
        tensors, meta["optimizer"] = _flatten_optimizer(optimizer)
        tensors["rng.torch"] = torch.get_rng_state()
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        if device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
        files["optimizer.safetensors"] = tensors
    name = ""  # the file being written, for the message of a failure
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        for name, part in files.items():
            save_file(part, tmp / name)
        name = "checkpoint.json"
        write_json_atomic(tmp / name, meta)
        _fsync_dir(tmp)
        name = ""
        _swap(tmp, path, old)
    except (OSError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        needed = sum(t.numel() * t.element_size() for part in files.values() for t in part.values())
        raise write_error(path / name, e, needed) from e
    return path


def _swap(tmp: Path, path: Path, old: Path) -> None:
    """Rename the finished `tmp` to `path`; the previous `path` is `old` meanwhile (put back if the rename fails)."""
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except OSError:
        if old.is_dir() and not path.exists():
            os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read (meta, model weights) from a checkpoint directory, validating what it can."""
    path = _existing(Path(path))
    meta_file = path / "checkpoint.json"
    if not meta_file.is_file():
        raise CheckpointError(f"{path}: not a checkpoint (no checkpoint.json)")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits
        raise CheckpointError(f"{meta_file}: malformed JSON ({str(e).split(';')[0]})") from None
    except RecursionError:
        raise CheckpointError(f"{meta_file}: malformed JSON (nested too deeply)") from None
    except OSError as e:
        raise CheckpointError(f"{meta_file}: cannot read ({e.strerror or e})") from None
    _validate(meta, meta_file)
    return meta, _load_tensors(path / "model.safetensors")


def _validate(meta, meta_file: Path) -> None:
    """The shape of checkpoint.json: what the loaders index into must be there with the right types."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_file}: not an imcap checkpoint")
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise CheckpointError(f"{meta_file}: missing keys {', '.join(missing)}")
    version = meta["version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{meta_file}: 'version' must be a positive integer, got {str(version)[:40]!r}")
    if version > VERSION:
        raise CheckpointError(f"{meta_file}: written by a newer imcap (format version {version})")
    for key in ("model_config", "vocab", "encoder", *OPTIONAL_OBJECTS):
        if key in meta and not isinstance(meta[key], dict):
            raise CheckpointError(f"{meta_file}: '{key}' must be an object, got {type(meta[key]).__name__}")
    if meta.get("encoder_weights", ENCODER_FILE) != ENCODER_FILE:
        raise CheckpointError(f"{meta_file}: 'encoder_weights' must be {ENCODER_FILE!r}")
    if "data" in meta and not isinstance(meta["data"].get("features", ""), str):
        raise CheckpointError(f"{meta_file}: 'data.features' must be the name of a feature store")
    for key in ("epoch", "step_in_epoch", "global_step"):  # what resuming reads
        value = meta.get("progress", {}).get(key, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise CheckpointError(f"{meta_file}: 'progress.{key}' must be an integer >= 0, got {str(value)[:40]!r}")
    try:
        _check_model_sections(meta)
    except ValueError as e:
        raise CheckpointError(f"{meta_file}: {str(e).splitlines()[0]}") from None


def _check_model_sections(meta: dict) -> None:
    """Ranges and agreement of 'encoder', 'model_config' and 'vocab'; ValueError naming the key. Empty sections
    are left to the consumers (Captioner.load: "inconsistent checkpoint")."""
    from .encoders import check_image_size, encoder_spec
    from .model import ModelConfig
    from .text import Vocabulary

    encoder, config, vocab = meta["encoder"], meta["model_config"], meta["vocab"]
    spec = None
    if encoder:
        check_image_size(encoder.get("image_size"), "'encoder.image_size'")
        try:
            spec = encoder_spec(encoder.get("name"), encoder["image_size"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"bad 'encoder' ({e})") from None
        for key in ("grid", "feature_dim", "mean", "std"):  # what the name and size determine
            want = spec.to_dict()[key]
            if encoder.get(key) != want:
                raise ValueError(f"'encoder.{key}' must be {want} for {spec.name} at {spec.image_size} pixels, "
                                 f"got {shown(encoder.get(key))}")
    if config:
        try:
            config = ModelConfig.from_dict(config)
        except TypeError as e:
            raise ValueError(f"bad 'model_config' ({e})") from None
        config.validate("model_config.")
        if spec is not None and config.feature_dim != spec.feature_dim:
            raise ValueError(f"'model_config.feature_dim' must be the encoder's, {spec.feature_dim}, got {config.feature_dim}")
    if vocab:
        try:
            vocab = Vocabulary.from_dict(vocab)
        except (TypeError, ValueError) as e:
            raise ValueError(f"bad 'vocab' ({e})") from None
        if config and config.vocab_size != len(vocab):
            raise ValueError(f"'model_config.vocab_size' must be the vocabulary's size, {len(vocab)}, "
                             f"got {config.vocab_size}")


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """model.load_state_dict(weights) (from the checkpoint at `path`); CheckpointError when they do not fit."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: inconsistent checkpoint ({str(e).splitlines()[0]})") from None


def load_encoder_weights(path: str | os.PathLike, meta: dict) -> dict[str, torch.Tensor] | None:
    """The fine-tuned encoder weights of the checkpoint at `path` (meta from load_checkpoint); None if it has none."""
    if "encoder_weights" not in meta:
        return None
    return _load_tensors(_existing(Path(path)) / ENCODER_FILE)


def load_training_state(path: str | os.PathLike, optimizer: torch.optim.Optimizer, meta: dict) -> None:
    """Restore optimizer state and the torch RNG from a training checkpoint. The tensors are read on the CPU;
    the optimizer moves its state to its parameters' device. The CUDA RNG state (rng.cuda) is restored when
    the parameters are on a CUDA device and the checkpoint has one (it was made on a GPU)."""
    file = _existing(Path(path)) / "optimizer.safetensors"
    tensors = _load_tensors(file)
    if "rng.torch" not in tensors or not isinstance(meta.get("optimizer"), dict):
        raise CheckpointError(f"{file.parent}: not a training checkpoint (no optimizer or RNG state)")
    try:
        torch.set_rng_state(tensors.pop("rng.torch"))
        cuda_rng = tensors.pop("rng.cuda", None)
        device = next((p.device for g in optimizer.param_groups for p in g["params"]), torch.device("cpu"))
        if cuda_rng is not None and device.type == "cuda":
            torch.cuda.set_rng_state(cuda_rng, device)
        _restore_optimizer(optimizer, tensors, meta["optimizer"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{file}: optimizer state does not fit this model ({str(e).splitlines()[0]})") from None


def find_checkpoint(run_dir: str | os.PathLike, which: str = "best") -> Path:
    """RUN_DIR/best (or RUN_DIR/checkpoint), or RUN_DIR itself when it is a checkpoint directory; a name that is
    no path but a packaged model's (imcap/packaged.py, e.g. "flickr8k") gives that model."""
    from .packaged import resolve

    packaged = resolve(run_dir)
    if packaged is not None:
        return packaged
    run_dir = Path(run_dir)
    if (run_dir / "checkpoint.json").is_file():
        return run_dir
    for name in (which, "checkpoint" if which == "best" else "best"):
        for candidate in (run_dir / name, run_dir / f"{name}.old"):
            if (candidate / "checkpoint.json").is_file():
                return candidate
    if not run_dir.exists():
        from .packaged import available

        names = ", ".join(available()) or "none installed"
        raise CheckpointError(f"{run_dir}: no such run directory (packaged models: {names})")
    if (run_dir / ENSEMBLE_FILE).is_file():
        raise CheckpointError(f"{run_dir}: an ensemble ({ENSEMBLE_FILE}) has no checkpoint of its own; name one of its member runs")
    raise CheckpointError(_no_checkpoint_here(run_dir))


def _no_checkpoint_here(folder: Path) -> str:
    """Why `folder`, an existing folder, holds no checkpoint, and what to name instead: its runs one level down
    (e.g. demo-out -> demo-out/run), or, for a DATA_DIR, a run to train on it."""
    runs = []
    if folder.is_dir():
        try:
            subfolders = sorted(p for p in folder.iterdir() if p.is_dir())
        except OSError:
            subfolders = []
        runs = [p for p in subfolders if (p / ENSEMBLE_FILE).is_file() or (p / "checkpoint.json").is_file()
                or any((p / name / "checkpoint.json").is_file()
                       for name in ("best", "checkpoint", "best.old", "checkpoint.old"))]
    if runs:
        shown_runs = ", ".join(str(p) for p in runs[:5]) + (f" and {len(runs) - 5} more" if len(runs) > 5 else "")
        which = f"the run {shown_runs} is one level down: name it" if len(runs) == 1 else \
            f"the runs {shown_runs} are one level down: name one of them"
        return f"{folder}: no checkpoint in this directory; {which}"
    if (folder / "dataset.json").is_file() and (folder / "vocab.json").is_file():
        return (f"{folder}: no checkpoint in this directory: it is a DATA_DIR (dataset.json, vocab.json); train a "
                f"run on it first: imcap train {folder} --out runs/NAME")
    return f"{folder}: no checkpoint in this directory (train first: imcap train DATA_DIR --out {folder})"


def _existing(path: Path) -> Path:
    if path.is_dir():
        return path
    old = path.with_name(path.name + ".old")
    if old.is_dir():  # killed between the renames of save_checkpoint
        return old
    raise CheckpointError(f"{path}: no such checkpoint directory")


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise CheckpointError(f"{file}: missing")
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file}: not a valid safetensors file ({e})") from None


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{key}"] = value.detach().cpu().contiguous().clone()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], saved: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for name, value in saved.get("scalars", {}).items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
