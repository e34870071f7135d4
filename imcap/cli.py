"""The `imcap` command: parses arguments and calls the Python API; user mistakes become one-line errors.

Exit status: 0 success; 1 the job ran but something failed (e.g. some images could not be captioned,
a data file is malformed); 2 usage error; 130 interrupted (Ctrl-C; `imcap train` first writes a checkpoint).

Over 400 lines: one argument parser for every verb, and each verb's function is a few lines over the Python
API; the choices come from the registries (presets, formats, languages, encoders).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from .backbones import ENCODERS
from .datasets import FORMATS
from .limits import MAX_BEAM_SIZE, MAX_LENGTH, MAX_LENGTH_PENALTY
from .presets import PRESETS
from .text import ALIASES, LANGUAGE_TOKENS, LANGUAGES

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
MAX_THREADS = 1024
MAX_BATCH = 65_536  # images or captions per batch
MAX_DIM = 16_384  # model sizes (embedding, state, attention)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # devices.PRECISIONS, not imported here: devices.py imports torch


class UsageError(ValueError):
    """Options that contradict each other or are out of range: one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line: `imcap caption: error: argument --beam: ... (see --help)`."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _bounded(kind: type, low: float, high: float | None = None, *, low_open: bool = False):
    """An argparse type: a number of `kind` from `low` (excluded when low_open) to `high` (included)."""

    def parse(text: str):
        try:
            value = kind(text)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text[:40]!r}") from None
        above = value > low if low_open else value >= low
        if not (above and (high is None or value <= high)):  # NaN fails both
            lower = f"> {low}" if low_open else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be {lower}" + (f" and <= {high:,}" if high is not None else "")
                                             + f", got {text[:40]}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _count(low: int = 1, high: int | None = None):
    return _bounded(int, low, high)


def default_threads() -> int:
    """Torch threads when --threads is not given: the cores that are idle now (cores minus the 1-minute load
    average, at least 1). With every core, training ran 1.9x slower than on one thread while another job held
    a core; on one thread it ran 1.4x slower than on both when they were idle (2-core machine, 2026-12-03)."""
    cores = os.cpu_count() or 1
    try:
        busy = round(os.getloadavg()[0])
    except OSError:  # no load average on this system
        busy = 0
    return max(1, min(cores, cores - busy))


def _thread_count(n: int | None) -> int | None:
    """--threads N, else default_threads(); None when OMP_NUM_THREADS (torchrun sets it) is left to rule."""
    return n or (None if "OMP_NUM_THREADS" in os.environ else default_threads())


def _threads(n: int | None) -> None:
    count = _thread_count(n)
    if count:
        import torch

        torch.set_num_threads(count)


def _device(a, auto_precision: str | None = None):
    """(torch.device, "fp32" | "bf16" | "fp16") from --device and --precision, resolved before anything loads; a
    device that is not there, or a precision it cannot run, is a UsageError (one line, exit 2).
    auto_precision: what --precision auto means for this command (default: bf16 on CUDA that supports it, else fp32)."""
    from .devices import resolve_device, resolve_precision

    try:
        device = resolve_device(a.device)
        return device, resolve_precision(auto_precision if a.precision == "auto" and auto_precision else a.precision,
                                          device)
    except ValueError as e:
        raise UsageError(str(e)) from None


def cmd_synth(a) -> int:
    from .synth import make_scenes

    path = make_scenes(a.out_dir, n_images=a.images, seed=a.seed, image_size=a.image_size, progress=not a.quiet)
    print(f"wrote {a.images} synthetic scenes: {path}")
    return EXIT_OK


def cmd_prepare(a) -> int:
    from .datasets import format_summary, image_failures, prepare

    report = prepare(a.source, a.format, a.out, images=a.images, language=a.language, min_count=a.min_count,
                     max_length=a.max_length, val_fraction=a.val_fraction, test_fraction=a.test_fraction,
                     seed=a.seed, split=a.split, vocab=a.vocab, progress=not a.quiet)
    print(format_summary(report))
    failures = image_failures(report)  # present but unusable images: one line each, and exit status 1
    for line in failures[:20]:
        print(f"imcap prepare: error: {line}", file=sys.stderr)
    if len(failures) > 20:
        print(f"imcap prepare: error: ... and {len(failures) - 20} more unreadable images (report.json)", file=sys.stderr)
    return EXIT_FAILED if failures else EXIT_OK


def cmd_features(a) -> int:
    from .encoders import AUTO_PRECISION
    from .features import extract_features

    device, precision = _device(a, AUTO_PRECISION)
    summary = extract_features(a.data_dir, encoder=a.encoder, image_size=a.image_size,
                               threads=_thread_count(a.threads),
                               progress=not a.quiet, overwrite=a.overwrite, batch_size=a.batch_size, device=device,
                               precision=precision, reuse=a.reuse, dtype=a.dtype)
    failed = summary["failed"]
    copied = f"{summary['copied']} copied from {a.reuse}, " if a.reuse else ""
    rate = f", {summary['images_per_s']:.1f} images/s" if summary["encoded"] else ""
    print(f"features: {summary['done']} of {summary['images']} images in {summary['store']} "
          f"({copied}{summary['encoded']} encoded now{rate} on {device}, "
          f"{summary['dtype']}, {summary['bytes_per_image']:,} bytes/image); {len(failed)} failed")
    return EXIT_FAILED if failed else EXIT_OK


def cmd_train(a) -> int:
    from .train import train
    from .train_config import TrainConfig, resume_conflicts

    _threads(a.threads)
    model_config = {k: v for k, v in {
        "embed_dim": a.embed_dim, "hidden_dim": a.hidden_dim, "attention_dim": a.attention_dim, "rnn": a.rnn,
        "dropout": a.dropout, "gate": a.gate, "deep_output": a.deep_output,
        "attention": a.attention}.items() if v is not None}
    given = {k: getattr(a, k) for k in TrainConfig.__dataclass_fields__ if getattr(a, k, None) is not None}
    _check_train_flags(a, given)
    stages = [("", Path(a.out), model_config, given, a.features)]  # (label, RUN_DIR, model, train config, store)
    if a.preset:
        stages = _preset_stages(a, model_config, given)
    device, precision = _device(a)
    for _, out, model, cfg, _ in stages:
        conflicts = resume_conflicts(out, model or {}, cfg)
        if conflicts:
            flags = ", ".join("--" + k.replace("_", "-") for k in conflicts)
            raise UsageError(f"{out} has a checkpoint, and resuming keeps its settings: {flags} differ from the run's; "
                             f"only --epochs and --micro-batches may change on resume (or use a new --out)")
    rank0 = int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 reports and writes
    for label, out, model, cfg, features in stages:
        try:
            summary = train(a.data_dir, out, model_config=model, train_config=TrainConfig(**cfg), features=features,
                            progress=not a.quiet, device=device, precision=precision)
        except KeyboardInterrupt:  # train.TrainingInterrupted says what was kept: rank 0 reports it (main)
            if rank0:
                raise
            return EXIT_INTERRUPTED
        if not rank0:
            continue
        best = ", ".join(f"{k} {v:.3f}" for k, v in summary["best_val"].items())
        print(f"{label + ': ' if label else ''}training stopped ({summary['stopped']}) after {summary['epochs']} epochs; "
              f"best epoch {summary['best_epoch']}: {best or 'no validation split'}; run: {summary['out_dir']}")
    if a.preset and rank0:
        from .presets import get_preset

        members = list(get_preset(a.preset).members)
        if members:
            from .ensemble import write_members

            write_members(a.out, members)
            print(f"ensemble of {len(members)} runs ({', '.join(members)}): {a.out}")
    return EXIT_OK


def _check_train_flags(a, given: dict) -> None:
    """UsageError for flags that contradict each other, found from the flags alone (what needs the data, the
    encoder or a checkpoint is checked where those are read)."""
    if "encoder_lr" in given and not given.get("finetune_blocks"):
        raise UsageError("--encoder-lr needs --finetune-blocks N")
    if given.get("finetune_blocks"):
        if a.preset:
            raise UsageError(f"--preset {a.preset} trains on the cached features; drop --finetune-blocks (then "
                             f"fine-tune its run: --init-from RUN_DIR --finetune-blocks N)")
        if not given.get("init_from"):
            raise UsageError("--finetune-blocks needs --init-from RUN_DIR: fine-tune a decoder trained on cached "
                             "features")
        if given.get("objective") == "scst":
            raise UsageError("--finetune-blocks works with the cross-entropy objective only (not --objective scst)")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UsageError("--finetune-blocks runs in one process (not under torchrun)")
    if a.scst_epochs is not None and not a.preset:
        raise UsageError("--scst-epochs needs --preset (with --objective scst, --epochs counts the SCST epochs)")
    _check_objective_flags(a, given)


def _check_objective_flags(a, given: dict) -> None:
    """UsageError for a flag of an objective no stage of this run trains (it would be ignored)."""
    from .objectives import OBJECTIVES, owned_fields
    from .presets import get_preset

    if a.preset:
        preset = get_preset(a.preset)
        trained = ["xe", "scst"] if preset.scst and a.scst_epochs != 0 else ["xe"]
    else:
        trained = [given.get("objective", "xe")]
    for name in given:
        owners = [o for o in OBJECTIVES if name in owned_fields(o)]
        if owners and not set(owners) & set(trained):
            flag = "--" + name.replace("_", "-")
            where = f"--preset {a.preset}" if a.preset else "this run"
            raise UsageError(f"{flag} is a setting of --objective {owners[0]}, and {where} trains only "
                             f"{' and '.join(trained)}: drop {flag}")


def _preset_stages(a, model_config: dict, given: dict) -> list[tuple[str, Path, dict | None, dict, str]]:
    """The stages of `--preset`: its values, overridden by the flags given; SCST goes on from RUN_DIR/xe;
    an ensemble's members train in RUN_DIR/<member>."""
    from .presets import get_preset

    preset = get_preset(a.preset)
    if given.get("objective") == "scst" or "init_from" in given:
        raise UsageError(f"--preset {a.preset} runs its own stages; drop --objective/--init-from (or the preset)")
    features = a.features or preset.features
    if not (Path(a.data_dir) / "features" / features).is_dir():
        raise ValueError(f"{a.data_dir}: preset {a.preset} trains on the feature store {features}, which is "
                         f"missing: run {preset.features_command.replace('DATA_DIR', str(a.data_dir))}")
    model = {**preset.model, **model_config}
    xe = {**preset.train, **{k: v for k, v in given.items() if not k.startswith("scst_")}}
    if preset.members:
        return [(f"member {name}", Path(a.out) / name, model, {**xe, **own}, features)
                for name, own in preset.members.items()]
    if not preset.scst or a.scst_epochs == 0:
        return [("", Path(a.out), model, xe, features)]
    scst = {**preset.scst, **{k: v for k, v in given.items() if k.startswith("scst_") or k == "seed"},
            "objective": "scst", "init_from": str(Path(a.out) / "xe")}
    if a.scst_epochs:
        scst["epochs"] = a.scst_epochs
    return [("xe stage", Path(a.out) / "xe", model, xe, features), ("scst stage", Path(a.out), None, scst, features)]


def _decoding(a):
    from .decoding import DecodingOptions

    try:
        return DecodingOptions(beam_size=a.beam, max_length=a.max_length, length_penalty=a.length_penalty,
                               n_best=getattr(a, "n_best", 1), allow_unk=a.allow_unk,
                               no_repeat_ngram=a.no_repeat_ngram)
    except ValueError as e:  # e.g. --n-best over --beam
        raise UsageError(str(e)) from None


def cmd_evaluate(a) -> int:
    from .api import Captioner
    from .evaluate import evaluate

    _threads(a.threads)
    options = _decoding(a)  # a usage error before the model loads
    device, precision = _device(a)
    captioner = Captioner.load_ensemble([a.run_dir, *a.ensemble], device=device, precision=precision)
    report = evaluate(a.run_dir, a.data, split=a.split, options=options, limit=a.limit, captioner=captioner)
    if a.json:  # the seven metrics first, then the attention grounding score where there is one (synthetic scenes)
        print(json.dumps({**report["scores"], **({"grounding": report["grounding"]} if report.get("grounding") else {})}))
    else:
        print(f"{report['split']}: {report['images']} images, beam {a.beam}")
        for k, v in report["scores"].items():
            print(f"  {k:8s} {'n/a' if v is None else f'{v:.4f}'}")
        if report.get("grounding"):
            g = report["grounding"]
            print(f"  grounding {g['score']:.4f} (chance {g['chance']:.4f}; {g['words']} object words "
                  f"in {g['images']} scenes)")
    return EXIT_OK


def cmd_caption(a) -> int:
    if _runtime(a) == "onnx":
        options, captioner = _onnx_captioner(a)
    else:
        try:
            from .api import Captioner
        except ModuleNotFoundError as e:  # an install for the ONNX runtime only
            if e.name != "torch":
                raise
            raise ImportError(f"{a.run_dir}: a checkpoint needs torch to caption (pip install torch); without "
                              "torch, caption an ONNX export of it (imcap export, docs/onnx.md)") from None

        _threads(a.threads)
        options = _decoding(a)  # a usage error before the model loads
        device, precision = _device(a)
        captioner = Captioner.load_ensemble([a.run_dir, *a.ensemble], device=device, precision=precision)
    failed = 0
    figures: dict[str, str] = {}  # the attention figures written by this command (casefolded paths) -> their images
    if a.attention:
        Path(a.attention).mkdir(parents=True, exist_ok=True)
    for start in range(0, len(a.images), a.batch_size):
        chunk = a.images[start : start + a.batch_size]
        results = captioner.caption(chunk, options=options)
        for r in results:
            failed += r.error is not None
            _print_caption(r, a.json)
            if a.attention and r.error is None:
                failed += not _save_attention(captioner, r, Path(a.attention), figures)
    return EXIT_FAILED if failed else EXIT_OK


def _runtime(a) -> str:
    """--runtime with auto resolved: onnx for a folder written by `imcap export --format onnx`, else torch."""
    from .onnx_runtime import MANIFEST

    export = (Path(a.run_dir) / MANIFEST).is_file()
    if a.runtime == "auto":
        return "onnx" if export else "torch"
    if a.runtime == "torch" and export:
        raise UsageError(f"{a.run_dir} is an ONNX export: caption it with --runtime onnx")
    return a.runtime


def _onnx_captioner(a):
    """(options, OnnxCaptioner) for --runtime onnx, which imports no torch; flags it cannot honour are usage errors."""
    from .onnx_runtime import DecodingOptions, OnnxCaptioner

    if a.ensemble:
        raise UsageError("--ensemble needs --runtime torch; for ONNX, export the ensemble's RUN_DIR (imcap export)")
    if a.device not in ("auto", "cpu"):
        raise UsageError(f"--runtime onnx runs on the CPU: drop --device {a.device}")
    if a.precision not in ("auto", "fp32"):
        raise UsageError(f"--runtime onnx computes in fp32: drop --precision {a.precision}")
    try:
        options = DecodingOptions(a.beam, a.max_length, a.length_penalty, a.n_best, a.allow_unk, a.no_repeat_ngram)
    except ValueError as e:  # e.g. --n-best over --beam
        raise UsageError(str(e)) from None
    omp = os.environ.get("OMP_NUM_THREADS", "")  # onnxruntime does not read it: passed on as torch would take it
    threads = a.threads or (int(omp) if omp.isdigit() and int(omp) > 0 else default_threads())
    return options, OnnxCaptioner.load(a.run_dir, threads=threads)


def cmd_export(a) -> int:
    from .download import human_size
    from .onnx_export import export_onnx

    _threads(a.threads)
    summary = export_onnx(a.run_dir, a.out)
    sizes = ", ".join(f"{name} {human_size(size)}" for name, size in summary.files.items())
    print(f"exported {a.run_dir} to {summary.out_dir}: {sizes}; onnxruntime gives the torch model's outputs to "
          f"{max(summary.max_difference.values()):.1e}")
    print(f"caption with: imcap caption {summary.out_dir} IMAGE... --runtime onnx")
    return EXIT_OK


def _print_caption(r, as_json: bool) -> None:
    if as_json:
        print(json.dumps(r.to_dict(), ensure_ascii=False), flush=True)
    elif r.error:
        print(f"imcap caption: error: {r.error}", file=sys.stderr, flush=True)
    else:
        print(f"{r.image}\t{r.caption}\t{r.score:.3f}", flush=True)
        for alt in r.alternatives:
            print(f"{'':{len(r.image)}}\t{alt.caption}\t{alt.score:.3f}", flush=True)


def _figure_path(out_dir: Path, image: str, figures: dict[str, str]) -> Path:
    """OUT_DIR/<stem>.attention.png, or <stem>-2.attention.png, -3... when this command wrote that one already
    (two photo.jpg in different folders; names compared casefolded, as macOS and Windows do), with a note naming
    the image whose figure has the plain name. The name is taken in `figures`."""
    stem = Path(image).stem
    plain = out_dir / f"{stem}.attention.png"
    path, n = plain, 1
    while str(path).casefold() in figures:
        n += 1
        path = out_dir / f"{stem}-{n}.attention.png"
    if n > 1:
        print(f"imcap caption: note: {image}: attention figure {path} ({plain.name} is "
              f"{figures[str(plain).casefold()]}'s)", file=sys.stderr, flush=True)
    figures[str(path).casefold()] = image  # taken even if the figure fails: no later image gets a failed one's name
    return path


def _save_attention(captioner, r, out_dir: Path, figures: dict[str, str]) -> bool:
    """Write OUT_DIR/<stem>.attention.png for caption `r` (never over a figure in `figures`, those this command
    wrote: _figure_path); False, after one error line naming the image and the figure, when it cannot be made
    (the batch goes on)."""
    from .images import ImageError, load_image
    from .visualize import save_attention_figure

    tokens = r.tokens + (["<end>"] if r.finished else [])
    path = _figure_path(out_dir, r.image, figures)
    try:
        save_attention_figure(path, load_image(r.image), tokens, r.alphas, caption=r.caption)
        return True
    except (ImageError, OSError, ValueError, MemoryError) as e:
        if os.environ.get("IMCAP_DEBUG"):
            raise
        if isinstance(e, ImageError):  # the image changed since it was captioned
            problem = str(e).removeprefix(f"{Path(r.image)}: ")
        elif isinstance(e, OSError):
            problem = f"cannot write it ({e.strerror or e})"
        else:  # PIL cannot draw it
            problem = f"cannot draw it ({str(e) or type(e).__name__})"
        print(f"imcap caption: error: {r.image}: attention figure {path}: {problem}", file=sys.stderr, flush=True)
        return False


def cmd_demo(a) -> int:
    from .demo import run_demo

    _threads(a.threads)
    device, _ = _device(a)  # the precision checked; "auto" means fp32 for the features, bf16 or fp32 for the rest
    return run_demo(a.out, n_images=a.images, epochs=a.epochs, seed=a.seed, progress=not a.quiet, device=device,
                    precision=a.precision)


def cmd_serve(a) -> int:
    from .server import serve

    _threads(a.threads)
    device, precision = _device(a)
    serve(a.run_dir, a.host, a.port, max_upload_bytes=int(a.max_upload_mb * 1_000_000), max_concurrency=a.concurrency,
          max_queue=a.queue, max_cost=a.max_cost, max_overlay_images=a.max_overlay_images, max_overlays=a.max_overlays,
          max_reply_bytes=int(a.max_reply_mb * 1_000_000), log_level="warning" if a.quiet else "info", device=device,
          precision=precision)
    return EXIT_OK


def cmd_download(a) -> int:
    from .download import DATASETS, download, format_listing, get_dataset

    if a.list or a.name in (None, "list"):
        print(format_listing([get_dataset(a.name)] if a.name not in (None, "list") else None))
        return EXIT_OK
    if not a.to:
        print(f"imcap download: error: --to DIR is required (datasets: {', '.join(DATASETS)})", file=sys.stderr)
        return EXIT_USAGE
    overrides = {}
    for item in a.sha256 or []:
        name, sep, digest = item.partition("=")
        if not sep:
            raise UsageError(f"--sha256 {item!r}: expected FILE=HEX")
        overrides[name] = digest
    try:
        results = download(a.name, a.to, unpack=not a.no_unpack, sha256_overrides=overrides, progress=not a.quiet)
    except OSError as e:  # DownloadError (network, checksum, unsafe archive), full disk: one line + what to do
        print(f"imcap download: error: {str(e).splitlines()[0]}", file=sys.stderr)
        if getattr(e, "instructions", ""):
            print(e.instructions, file=sys.stderr)
        return EXIT_FAILED
    for r in results:
        print(f"{r.name}: {r.status}, {r.check}" + (", unpacked" if r.unpacked else "")
              + (f", sha256 {r.sha256}" if r.sha256 else ""))
    then = get_dataset(a.name).then
    print(f"{a.name} is in {a.to}" + (f"; next: {then.format(dir=a.to)}" if then else ""))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="imcap", description="Show, Attend and Tell image captioning")
    p.add_argument("--version", action="version", version=f"imcap {__import__('imcap').__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("synth", help="write the synthetic scenes dataset (Karpathy JSON + images)")
    s.add_argument("out_dir", help="output folder")
    s.add_argument("--images", type=_count(1, 10_000_000), default=1000, help="number of scenes")
    s.add_argument("--seed", type=int, default=0, help="random seed (same seed, same scenes)")
    s.add_argument("--image-size", type=_count(16, 4096), default=224, help="scene side in pixels")
    s.set_defaults(func=cmd_synth)

    s = sub.add_parser("prepare", help="read a caption dataset, tokenize, split, build the vocabulary")
    s.add_argument("source", help="the caption file or folder (see --format)")
    s.add_argument("--format", required=True, choices=list(FORMATS), help="what SOURCE is: "
                   + "; ".join(f"{name}: {f.help}" for name, f in FORMATS.items()))
    s.add_argument("--images", help="image folder, when not beside SOURCE (flickr8k-cn: default ../flickr8k/images)")
    s.add_argument("--out", required=True, help="DATA_DIR to write")
    s.add_argument("--language", choices=[*LANGUAGES, *ALIASES], help="tokenizer: "
                   + ", ".join(f"{name} = {tokens}" for name, tokens in LANGUAGE_TOKENS.items()) + "; default: "
                   + ", ".join(f"{f.language} for {name}" for name, f in FORMATS.items() if f.language != "en") + ", else en")
    s.add_argument("--min-count", type=_count(1), default=5, help="words seen fewer times in train become <unk>")
    s.add_argument("--max-length", type=_count(1, 1000), default=30, help="words kept per caption for training")
    s.add_argument("--val-fraction", type=_bounded(float, 0, 1), default=0.1, help="share of images for val when the source has no split")
    s.add_argument("--test-fraction", type=_bounded(float, 0, 1), default=0.1, help="share of images for test when the source has no split")
    s.add_argument("--seed", type=int, default=0, help="seed of those splits")
    s.add_argument("--split", choices=["train", "val", "test"], help="put every image in this split")
    s.add_argument("--vocab", help="reuse this vocab.json instead of building one")
    s.set_defaults(func=cmd_prepare)

    s = sub.add_parser("features", help="run the CNN over every image once and cache the grids")
    s.add_argument("data_dir", help="DATA_DIR written by prepare")
    s.add_argument("--encoder", default="efficientnet-lite0", choices=list(ENCODERS), help="pretrained CNN")
    s.add_argument("--image-size", type=_count(32, 4096), default=224, help="input side in pixels: 224 -> 7x7 grid, 448 -> 14x14")
    s.add_argument("--batch-size", type=_count(1, 4096), help="images per CNN batch (default: 64 on a GPU, 4 on the CPU, the fastest on a 2-core CPU)")
    s.add_argument("--overwrite", action="store_true", help="discard an existing store made differently")
    s.add_argument("--reuse", metavar="OTHER_DATA_DIR", help="copy the features of the same image files from this "
                   "DATA_DIR's store of the same encoder and size (e.g. the same photos with captions in another "
                   "language) instead of encoding them again")
    s.add_argument("--dtype", choices=["float16", "uint8"], help="how the store keeps annotations (default "
                   "float16, or an existing store's): uint8 takes half the disk (a 14x14 COCO store 31 GB instead "
                   "of 62) in 255 steps of the encoder's [0, 6] range; docs/coco.md measures what it changes")
    s.set_defaults(func=cmd_features)

    s = sub.add_parser("train", help="train the attention decoder on cached features (resumes RUN_DIR)")
    s.add_argument("data_dir", help="DATA_DIR with features")
    s.add_argument("--out", required=True, help="RUN_DIR for checkpoints and logs")
    s.add_argument("--features", help="feature store to use, e.g. efficientnet-lite0-224 (default: the store the "
                                      "--init-from run trained on when DATA_DIR has it, else the only one)")
    s.add_argument("--epochs", type=_count(1, 100_000), help="maximum epochs (default 20; may be raised when resuming)")
    s.add_argument("--batch-size", type=_count(1, MAX_BATCH), help="captions per batch (default 64)")
    s.add_argument("--lr", type=_bounded(float, 0, 10, low_open=True), help="peak learning rate (default 4e-4)")
    s.add_argument("--lr-schedule", choices=["cosine", "constant"], help="learning-rate schedule (default cosine)")
    s.add_argument("--warmup-steps", type=_count(0), help="linear warm-up steps (default 100)")
    s.add_argument("--grad-clip", type=_bounded(float, 0, low_open=True), help="max gradient norm (default 5)")
    s.add_argument("--alpha-c", type=_bounded(float, 0, 1000), help="doubly stochastic attention weight lambda (default 1)")
    s.add_argument("--label-smoothing", type=_bounded(float, 0, 0.99), help="label smoothing (default 0)")
    s.add_argument("--patience", type=_count(0), help="epochs without better val CIDEr before stopping (default 5; 0 never)")
    s.add_argument("--val-beam", type=_count(1, MAX_BEAM_SIZE), help="beam size of validation decoding (default 1: greedy)")
    s.add_argument("--val-images", type=_count(0), help="validate on the first N validation images "
                   "(default 5,000, the size of COCO's Karpathy val split; 0: all)")
    s.add_argument("--checkpoint-every", type=_count(1), help="also checkpoint every N steps (default: epoch ends)")
    s.add_argument("--micro-batches", type=_count(1, 4096), metavar="N", help="split each batch (each process's "
                   "share under torchrun) into N backward passes before one optimizer step: a batch too big for "
                   "memory trains unchanged (default 1; may be changed when resuming)")
    s.add_argument("--seed", type=int, help="seed of initialisation, batch order, dropout (default 0)")
    s.add_argument("--init-from", metavar="RUN_DIR", help="start from this run's best weights (its model settings too)")
    s.add_argument("--objective", choices=["xe", "scst"], help="xe: cross-entropy (default); scst: self-critical "
                   "CIDEr-D fine-tuning (use with --init-from; --batch-size then counts images)")
    s.add_argument("--scst-samples", type=_count(1, 100), help="SCST: captions sampled per image (default 5)")
    s.add_argument("--scst-baseline", choices=["greedy", "mean"], help="SCST reward baseline (default greedy)")
    s.add_argument("--scst-max-length", type=_count(1, MAX_LENGTH), help="SCST: words per sampled caption (default 20)")
    s.add_argument("--scst-temperature", type=_bounded(float, 0.05, 10), help="SCST: sampling temperature; below 1 the samples "
                   "stay nearer the greedy caption (default 1)")
    s.add_argument("--preset", choices=list(PRESETS), metavar="PRESET",
                   help=f"a named recipe (imcap/presets.py): {', '.join(PRESETS)}; one with an SCST stage trains "
                   "cross-entropy in RUN_DIR/xe, then SCST in RUN_DIR; an ensemble trains its members in RUN_DIR/<member> "
                   "and decodes them as one; flags given override its values")
    s.add_argument("--scst-epochs", type=_count(0, 100_000), help="with --preset: epochs of the SCST stage (0: skip it)")
    s.add_argument("--finetune-blocks", type=_count(1, 100), metavar="N", help="end to end: also train the encoder's last N "
                   "blocks + head conv on the images (needs --init-from; docs/finetune.md)")
    s.add_argument("--encoder-lr", type=_bounded(float, 0, 10, low_open=True), help="with --finetune-blocks: peak LR of those blocks (default 1e-4)")
    s.add_argument("--embed-dim", type=_count(1, MAX_DIM), help="word embedding size m (default 256)")
    s.add_argument("--hidden-dim", type=_count(1, MAX_DIM), help="recurrent state size n (default 512)")
    s.add_argument("--attention-dim", type=_count(1, MAX_DIM), help="attention MLP size (default 512)")
    s.add_argument("--rnn", choices=["lstm", "gru"], help="recurrent cell (default lstm)")
    s.add_argument("--attention", choices=["soft", "hard"], help="soft (default) or hard: stochastic locations "
                   "trained with REINFORCE (paper section 4.1)")
    s.add_argument("--hard-entropy-weight", type=_bounded(float, 0, 1000), help="hard attention: entropy bonus lambda_e (default 0.01)")
    s.add_argument("--dropout", type=_bounded(float, 0, 0.99), help="dropout before the output layer (default 0.5)")
    s.add_argument("--no-gate", dest="gate", action="store_false", default=None, help="drop the gating scalar beta")
    s.add_argument("--no-deep-output", dest="deep_output", action="store_false", default=None, help="predict words from h alone")
    s.set_defaults(func=cmd_train)

    for name, helptext in (("evaluate", "score a run on a split (BLEU-1..4, METEOR, ROUGE_L, CIDEr)"),
                           ("caption", "caption image files")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("run_dir", help="RUN_DIR (its best checkpoint) or a checkpoint directory"
                       + (", or an ONNX export folder (--runtime onnx)" if name == "caption" else ""))
        s.add_argument("--beam", type=_count(1, MAX_BEAM_SIZE), default=3, help=f"beam size (1 = greedy; at most {MAX_BEAM_SIZE})")
        s.add_argument("--max-length", type=_count(1, MAX_LENGTH), default=30, help=f"maximum words per caption (at most {MAX_LENGTH})")
        s.add_argument("--length-penalty", type=_bounded(float, 0, MAX_LENGTH_PENALTY), default=0.0,
                       help="GNMT length penalty exponent (0: none)")
        s.add_argument("--allow-unk", action="store_true", help="let the search choose <unk> (research: the "
                       "model's own ranking); by default <unk> is never chosen")
        s.add_argument("--no-repeat-ngram", type=_count(0, MAX_LENGTH), default=0, metavar="N",
                       help="never repeat a run of N words within a caption (e.g. 3; 0, the default: off)")
        s.add_argument("--json", action="store_true", help="machine-readable output")
        s.add_argument("--ensemble", nargs="+", default=[], metavar="RUN_DIR",
                       help="decode with these runs too, averaging the models' word probabilities (same "
                            "vocabulary and features)")
        if name == "evaluate":
            s.add_argument("--data", help="DATA_DIR (default: the one the run was trained on)")
            s.add_argument("--split", default="test", choices=["train", "val", "test"], help="split to score")
            s.add_argument("--limit", type=_count(0), default=0, help="score only the first N images")
            s.set_defaults(func=cmd_evaluate)
        else:
            s.add_argument("images", nargs="+", help="image files")
            s.add_argument("--n-best", type=_count(1, MAX_BEAM_SIZE), default=1, help="captions per image (<= beam)")
            s.add_argument("--attention", metavar="OUT_DIR", help="write one attention figure per image here")
            s.add_argument("--batch-size", type=_count(1, 1024), default=16, help="images per batch")
            s.add_argument("--runtime", default="auto", choices=["auto", "torch", "onnx"],
                           help="onnx: RUN_DIR is a folder written by imcap export, captioned by onnxruntime and "
                                "numpy without torch (docs/onnx.md); auto (default): onnx for such a folder, else torch")
            s.set_defaults(func=cmd_caption)

    s = sub.add_parser("export", help="write a run as ONNX graphs, to caption without torch (docs/onnx.md)")
    s.add_argument("run_dir", help="RUN_DIR (its best checkpoint), a checkpoint directory, a packaged model's name, "
                   "or an ensemble's RUN_DIR")
    s.add_argument("--format", default="onnx", choices=["onnx"], help="what to write (default onnx: encoder, "
                   "decoder init and step graphs, and imcap-onnx.json)")
    s.add_argument("--out", required=True, help="folder to write the export to (made if missing)")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("serve", help="serve the HTTP API and the web page for a trained run")
    s.add_argument("run_dir", help="RUN_DIR (its best checkpoint) or a checkpoint directory")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    s.add_argument("--port", type=_count(0, 65535), default=8000, help="TCP port")
    s.add_argument("--max-upload-mb", type=_bounded(float, 0, 100_000, low_open=True), default=10.0, help="largest request body in MB (all images together)")
    s.add_argument("--concurrency", type=_count(1, 256), default=1, help="requests captioned at the same time")
    s.add_argument("--queue", type=_count(0, 100_000), default=16, help="requests that may wait; more get 503 + Retry-After")
    s.add_argument("--max-cost", type=_count(1, 10**9), default=2_400, help="most work one request may ask for, as "
                   "images x beam_size x max_length (default 2,400: 16 images at beam 3 and length 30); more get 422")
    s.add_argument("--max-overlay-images", type=_count(0, 1000), default=4, help="images per request that may have "
                   "heat-map overlays (default 4)")
    s.add_argument("--max-overlays", type=_count(0, 100_000), default=128, help="overlay PNGs per reply, counted as "
                   "images x n_best x (max_length + 1) (default 128)")
    s.add_argument("--max-reply-mb", type=_bounded(float, 0, 100_000, low_open=True), default=16.0,
                   help="largest reply in MB, estimated from the options before any work (default 16)")
    s.set_defaults(func=cmd_serve)

    from .download import DATASETS

    s = sub.add_parser("download", help="download, verify and unpack a standard dataset (resumes)")
    s.add_argument("name", nargs="?", choices=[*DATASETS, "list"],
                   help="dataset to fetch; list: what each one fetches")
    s.add_argument("--to", metavar="DIR", help="folder for the files (required unless listing)")
    s.add_argument("--list", action="store_true", help="show what each dataset fetches, with sizes")
    s.add_argument("--no-unpack", action="store_true", help="keep the archives packed")
    s.add_argument("--sha256", action="append", metavar="FILE=HEX", help="check FILE against this sha256 (repeatable)")
    s.set_defaults(func=cmd_download)

    s = sub.add_parser("demo", help="synth -> prepare -> features -> train -> evaluate -> caption, on synthetic scenes")
    s.add_argument("--out", default="demo-out", help="folder for everything the demo writes")
    s.add_argument("--images", type=_count(10, 1_000_000), default=1200, help="number of synthetic scenes")
    s.add_argument("--epochs", type=_count(1, 10_000), default=6, help="training epochs")
    s.add_argument("--seed", type=int, default=0, help="seed")
    s.set_defaults(func=cmd_demo)

    for name, s in sub.choices.items():
        if name not in ("synth", "prepare", "download"):  # those run no torch
            s.add_argument("--threads", type=_count(1, MAX_THREADS), help="CPU threads for torch (default: the "
                           "cores idle at start, i.e. cores minus the load average, at least 1; OMP_NUM_THREADS if set)")
        s.add_argument("--quiet", action="store_true", help="no progress bars")
    for name in ("features", "train", "evaluate", "caption", "serve", "demo"):
        s = sub.choices[name]
        s.add_argument("--device", default="auto", metavar="{auto,cpu,cuda,cuda:N,mps}",
                       help="where to compute; auto (default): CUDA when torch sees a GPU, else the CPU (under "
                            "torchrun each process takes its own GPU, cuda:$LOCAL_RANK)")
        s.add_argument("--precision", default="auto", choices=PRECISIONS, help=PRECISION_HELP[name])
    return p


PRECISION_HELP = {  # what --precision auto means for each command
    "features": "auto (default): fp32, since bf16 changes the CNN's grid by ~16%% (max abs ~3), far more than the "
                "float16 store rounds it; bf16, or fp16 on a GPU, on request",
    "train": "auto (default): bf16 mixed precision on CUDA devices that support it, else fp32; fp16 on GPUs only",
    "demo": "auto (default): training and decoding in bf16 on CUDA devices that support it, else fp32; the "
            "features in fp32 always; fp16 on GPUs only",
    **{name: "of the search: auto (default) bf16 on CUDA devices that support it, else fp32; fp16 on GPUs only. "
             "The CNN runs in fp32 (bf16 would change its features by ~16%%)"
       for name in ("evaluate", "caption", "serve")},
}


def _user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that are a user's mistake: one line, exit status 1. OSError: a file the user named cannot
    be read or written (missing, permission, disk full, ...). CheckpointError counts once imcap.checkpoint is
    imported (only it raises it): `caption --runtime onnx` does not import it, nor torch with it."""
    from .datasets import DatasetError
    from .images import ImageError

    errors: tuple[type[BaseException], ...] = (ImageError, DatasetError, ValueError, OSError, ImportError)
    if "imcap.checkpoint" in sys.modules:
        errors += (sys.modules["imcap.checkpoint"].CheckpointError,)
    return errors


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "threads", None):
        os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    shown = warnings.formatwarning  # imcap's own warnings as one line each, like its errors
    warnings.formatwarning = lambda message, *_args, **_kw: f"imcap {args.command}: warning: {message}\n"
    try:
        return args.func(args)
    except UsageError as e:
        print(f"imcap {args.command}: error: {e} (see imcap {args.command} --help)", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # output piped into head & co.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as e:  # noqa: BLE001 - the user's mistakes (_user_errors) in one line; the rest re-raised
        if not isinstance(e, _user_errors()) or os.environ.get("IMCAP_DEBUG"):
            raise
        print(f"imcap {args.command}: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt as e:  # train.TrainingInterrupted: where training stopped, what it wrote
        print(f"imcap {args.command}: {e or 'interrupted'}", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        warnings.formatwarning = shown


if __name__ == "__main__":
    sys.exit(main())
