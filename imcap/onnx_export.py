"""ONNX export of a trained captioner: three graphs and one JSON file, which onnx_runtime.py runs without PyTorch.

    imcap export RUN_DIR --format onnx --out DIR       # RUN_DIR: a run, a checkpoint directory or a packaged name
    export_onnx("flickr8k", "flickr8k-onnx")           # the same from Python

DIR holds (B images, N = B * W search rows with W consecutive rows per image; every batch dimension is dynamic):
    encoder.onnx       images (B, 3, S, S) float32, preprocessed -> features (B, P, D)
    decoder_init.onnx  features (B, P, D) -> projected (B, P, A) = W_a a + b, and the initial state h (B, n),
                       c (B, n)                                          (model.attend_memory and init_state)
    decoder_step.onnx  tokens (N,) int64, features (B, P, D), projected (B, P, A), h (N, n), c (N, n)
                       -> log_probs (N, V), h_next, c_next, alpha (N, P)  (model.step)
    imcap-onnx.json    the graphs' file and tensor names, the vocabulary, the special ids, the preprocessing, the
                       model config, the encoder spec, and the imcap version of the export
A GRU has no c. An ensemble (a RUN_DIR with ensemble.json) exports as one model, as ensemble.py decodes it: the
memory is the features and each member's projection (projected_1, projected_2, ...), the state the members'
(h_1, c_1, h_2, ...), and the step averages their word probabilities and attention.

The graphs are made with torch.onnx.export(dynamo=True) from the plain path of model.py (fastpath.FORCE = False:
the CPU fast path computes the same values another way, with ops the exporter need not know), checked with
onnx.checker, and run in onnxruntime against the torch model on random inputs before anything is written.
Weights are stored in float32 inside the graphs. Nothing is pickled.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import __version__, fastpath
from .api import Captioner
from .ensemble import Ensemble
from .fileio import WriteError, write_bytes_atomic, write_json_atomic, write_error
from .model import Memory, ShowAttendTell
from .onnx_runtime import FORMAT, MANIFEST, VERSION
from .text import END, PAD, START, UNK

OPSET = 18  # onnxruntime runs it from version 1.14 on (its compatibility table)
FILES = {"encoder": "encoder.onnx", "init": "decoder_init.onnx", "step": "decoder_step.onnx"}
TOLERANCE = 1e-3  # the largest |onnxruntime - torch| accepted, over every output of the check after export


@dataclass
class ExportSummary:
    out_dir: Path  # the export folder
    files: dict[str, int]  # file name -> bytes, in the order written (the manifest last)
    max_difference: dict[str, float]  # graph -> the largest |onnxruntime - torch| over its outputs in the check


def export_onnx(run_dir: str | os.PathLike, out_dir: str | os.PathLike, *, opset: int = OPSET) -> ExportSummary:
    """Export RUN_DIR's best checkpoint (or a checkpoint directory, a packaged model's name, an ensemble's
    RUN_DIR) to out_dir. CheckpointError for a bad RUN_DIR, WriteError naming the file that cannot be written,
    ImportError when onnx, onnxscript or onnxruntime are missing; each a one-line message."""
    _require_packages()
    _not_a_file(Path(out_dir))  # before the model loads
    captioner = Captioner.load(run_dir, device="cpu", precision="fp32")
    source = captioner.meta.get("packaged") or Path(run_dir).name
    return export_captioner(captioner, out_dir, opset=opset, source=source)


def export_captioner(captioner: Captioner, out_dir: str | os.PathLike, *, opset: int = OPSET,
                     source: str = "") -> ExportSummary:
    """Export a loaded captioner (its decoder or ensemble, its encoder with any fine-tuned blocks) to out_dir,
    made if missing. The export runs on the CPU: the captioner's model and encoder are moved there."""
    _require_packages()
    _not_a_file(Path(out_dir))
    model = captioner.model.cpu().eval()
    encoder = captioner.encoder.cpu().eval()
    spec = captioner.encoder_spec
    memory_names, state_names = tensor_names(model)
    graphs = {
        "encoder": _export(encoder, (torch.zeros(2, 3, spec.image_size, spec.image_size),), ["images"], ["features"],
                           opset),
        "init": _export(_Init(model), (torch.zeros(2, spec.num_positions, spec.feature_dim),), ["features"],
                        [*memory_names[1:], *state_names], opset),
        "step": _export(_Step(model), _step_example(model, spec.num_positions, spec.feature_dim),
                        ["tokens", *memory_names, *state_names], ["log_probs", *(f"{s}_next" for s in state_names),
                                                                  "alpha"], opset),
    }
    differences = _check(graphs, model, encoder, spec, memory_names, state_names)
    out = _output_dir(Path(out_dir))
    files = {}
    for name, proto in graphs.items():
        data = proto.SerializeToString()
        write_bytes_atomic(out / FILES[name], data)
        files[FILES[name]] = len(data)
    manifest = _manifest(captioner, memory_names, state_names, opset, source)
    files[MANIFEST] = write_json_atomic(out / MANIFEST, manifest).stat().st_size
    return ExportSummary(out, files, differences)


def tensor_names(model: ShowAttendTell | Ensemble) -> tuple[list[str], list[str]]:
    """(memory, state): the names of the memory tensors (features first) and state tensors the step graph takes."""
    def state(m: ShowAttendTell, suffix: str = "") -> list[str]:
        return [f"h{suffix}", f"c{suffix}"] if m.config.rnn == "lstm" else [f"h{suffix}"]

    if isinstance(model, Ensemble):
        members = range(1, len(model.members) + 1)
        return (["features", *(f"projected_{i}" for i in members)],
                [name for i, m in zip(members, model.members) for name in state(m, f"_{i}")])
    return ["features", "projected"], state(model)


# ------------------------------------------------------------------------------------------- the exported modules


def _step_memory(model: ShowAttendTell | Ensemble, memory) -> tuple[torch.Tensor, ...]:
    """What the step reads of model.attend_memory(features): the features and the projection(s); the mean only
    init_state reads."""
    if isinstance(model, Ensemble):
        return (memory[0], *memory[2:])
    return memory.features, memory.projected


def _model_memory(model: ShowAttendTell | Ensemble, tensors: tuple[torch.Tensor, ...]):
    """_step_memory's tensors as the memory model.step takes (the mean, which step never reads, as None)."""
    if isinstance(model, Ensemble):
        return (tensors[0], None, *tensors[1:])
    return Memory(tensors[0], tensors[1], None)


class _Init(nn.Module):
    """features (B, P, D) -> the memory after the features (projected ...) and the initial state (h, c ...)."""

    def __init__(self, model: ShowAttendTell | Ensemble):
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        memory = self.model.attend_memory(features)
        return (*_step_memory(self.model, memory)[1:], *self.model.init_state(memory))


class _Step(nn.Module):
    """tokens (N,), memory tensors (M rows each), state tensors (N rows each) -> log_probs (N, V), the new state
    tensors, alpha (N, P)."""

    def __init__(self, model: ShowAttendTell | Ensemble):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, memory: tuple[torch.Tensor, ...],
                state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        log_probs, state, alpha = self.model.step(tokens, state, _model_memory(self.model, memory))
        return (log_probs, *state, alpha)


def _step_example(model: ShowAttendTell | Ensemble, P: int, D: int, images: int = 2, beams: int = 3) -> tuple:
    """Inputs of the step for tracing, (tokens, memory, state): `images` memory rows, `images * beams` state rows
    (so that neither count, nor their ratio, is taken for a constant)."""
    memory = model.attend_memory(torch.zeros(images, P, D))
    state = model.init_state(memory)
    return (torch.full((images * beams,), START), _step_memory(model, memory),
            tuple(s.repeat_interleave(beams, 0) for s in state))


# ------------------------------------------------------------------------------------------------ export and check


def _export(module: nn.Module, args: tuple, inputs: list[str], outputs: list[str], opset: int):
    """module traced on args (tensors, or tuples of them) -> a checked onnx.ModelProto with dim 0 of every input
    and output dynamic. The inputs whose first dim has the size of the first input's share its dynamic dim (the
    state rows of the step share the tokens'); the others get another (the images of the step's memory)."""
    import onnx
    from torch.export import Dim

    rows, images = Dim("rows"), Dim("images")
    first = args[0].size(0)

    def dims(a):
        return tuple(dims(x) for x in a) if isinstance(a, tuple) else {0: rows if a.size(0) == first else images}

    dynamic = dims(args)
    with _plain_path(), _quiet(), torch.no_grad():
        program = torch.onnx.export(module, args, dynamo=True, input_names=inputs, output_names=outputs,
                                    dynamic_shapes=dynamic, opset_version=opset, external_data=False,
                                    verbose=False, optimize=True)
    proto = program.model_proto
    onnx.checker.check_model(proto, full_check=True)
    return proto


@contextlib.contextmanager
def _plain_path():
    """model.py's plain equations while tracing (fastpath.FORCE = False), restored after."""
    before, fastpath.FORCE = fastpath.FORCE, False
    try:
        yield
    finally:
        fastpath.FORCE = before


@contextlib.contextmanager
def _quiet():
    """The exporter's progress lines, warnings and log records kept off the user's terminal."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _check(graphs: dict, model, encoder, spec, memory_names: list[str], state_names: list[str]) -> dict[str, float]:
    """Run each graph in onnxruntime on random inputs against the torch modules (the step at two batch shapes);
    ValueError when an output differs by more than TOLERANCE. Returns the largest difference per graph."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.log_severity_level = 1, 3
    sessions = {k: ort.InferenceSession(g.SerializeToString(), options, providers=["CPUExecutionProvider"])
                for k, g in graphs.items()}
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, spec.image_size, spec.image_size, generator=gen)
    features = torch.randn(3, spec.num_positions, spec.feature_dim, generator=gen)  # (3, P, D)
    worst: dict[str, float] = {}
    with torch.no_grad():
        worst["encoder"] = _largest(sessions["encoder"].run(None, {"images": images.numpy()}), (encoder(images),))
        init = _Init(model)(features)
        worst["init"] = _largest(sessions["init"].run(None, {"features": features.numpy()}), init)
        memory = (features, *init[: len(memory_names) - 1])
        state = init[len(memory_names) - 1 :]
        step = _Step(model)
        tokens = torch.randint(4, model.config.vocab_size, (3,), generator=gen) if model.config.vocab_size > 4 \
            else torch.full((3,), START)
        beams = 2
        worst["step"] = 0.0
        for rows, rep in ((tokens, 1), (tokens.repeat_interleave(beams), beams)):
            s = tuple(x.repeat_interleave(rep, 0) for x in state)
            feeds = {"tokens": rows.numpy(), **{n: m.numpy() for n, m in zip(memory_names, memory)},
                     **{n: x.numpy() for n, x in zip(state_names, s)}}
            worst["step"] = max(worst["step"], _largest(sessions["step"].run(None, feeds), step(rows, memory, s)))
    for graph, diff in worst.items():
        if not diff <= TOLERANCE:
            raise ValueError(f"the exported {FILES[graph]} differs from the torch model by {diff:.3g} "
                             f"(more than {TOLERANCE}): not written")
    return worst


def _largest(got: list[np.ndarray], want: tuple[torch.Tensor, ...]) -> float:
    """max |got - want| over every output (inf when the shapes differ)."""
    worst = 0.0
    for g, w in zip(got, want, strict=True):
        if g.shape != tuple(w.shape):
            return float("inf")
        worst = max(worst, float(np.abs(g - w.numpy()).max()) if g.size else 0.0)
    return worst


def _manifest(captioner: Captioner, memory_names: list[str], state_names: list[str], opset: int, source: str) -> dict:
    spec, model = captioner.encoder_spec, captioner.model
    members = model.members if isinstance(model, Ensemble) else [model]
    return {
        "format": FORMAT,
        "version": VERSION,
        "imcap_version": __version__,
        "exporter": f"torch {torch.__version__.split('+')[0]}, onnx opset {opset}",
        "source": source,
        "graphs": FILES,
        "memory": memory_names,  # the step's memory inputs, one row per image; init outputs all but the features
        "state": state_names,  # the state inputs of the step, one row per search row; its outputs add "_next"
        "special_ids": {"pad": PAD, "start": START, "end": END, "unk": UNK},
        "vocab": captioner.vocab.to_dict(),
        "language": captioner.meta.get("language", captioner.vocab.language),
        "preprocessing": {
            "image_size": spec.image_size,
            "mean": list(spec.mean),
            "std": list(spec.std),
            "resize": spec.resize,
            "steps": "EXIF-rotate; convert to RGB (transparency over white); resize the whole image to "
                     "image_size x image_size with PIL's bicubic filter (no crop, aspect ratio not kept); "
                     "x = (pixel / 255 - mean) / std per channel; layout (B, 3, S, S) float32",
        },
        "encoder": spec.to_dict(),
        "model_config": [m.config.to_dict() for m in members] if len(members) > 1 else members[0].config.to_dict(),
        "metrics": captioner.meta.get("metrics", {}),
    }


def _not_a_file(out: Path) -> None:
    """WriteError naming `out` when it exists and is not a folder."""
    if out.exists() and not out.is_dir():
        raise WriteError(errno.ENOTDIR, "exists and is not a directory", str(out))


def _output_dir(out: Path) -> Path:
    """out, made if missing; WriteError naming it when it is a file or cannot be made."""
    _not_a_file(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(out, e) from None
    return out


def _require_packages() -> None:
    """ImportError in one line, saying what to install, when onnx, onnxscript or onnxruntime is missing."""
    missing = []
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ImportError(f"ONNX export needs the packages {', '.join(missing)}: pip install 'imcap[onnx]'")
