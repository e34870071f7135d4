"""Trained models shipped inside the package: their name works wherever a RUN_DIR does.

    imcap caption flickr8k photo.jpg          imcap serve flickr8k          imcap.load("flickr8k")

Each one is a checkpoint directory in imcap/models/NAME (float16 safetensors weights, loaded into float32,
and checkpoint.json), with its model card MODEL_CARD.md beside them. A path that exists always wins over a
packaged name. `package(RUN_DIR, NAME)` makes one from a trained run:

    python -m imcap.packaged runs/f8k flickr8k
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

MODELS_DIR = Path(__file__).parent / "models"
CARD = "MODEL_CARD.md"


def available() -> dict[str, Path]:
    """The packaged models by name."""
    if not MODELS_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(MODELS_DIR.iterdir()) if (p / "checkpoint.json").is_file()}


def resolve(name: str | os.PathLike) -> Path | None:
    """The checkpoint directory of packaged model `name`, or None (also when `name` is an existing path)."""
    text = os.fspath(name)
    if Path(text).exists() or "/" in text or os.sep in text:
        return None
    return available().get(text)


def package(run_dir: str | os.PathLike, name: str, models_dir: Path = MODELS_DIR) -> Path:
    """Write RUN_DIR's best checkpoint as packaged model `name`: float16 weights, and checkpoint.json without
    the optimizer and the paths of the machine it was trained on."""
    import torch
    from safetensors.torch import save_file

    from . import checkpoint as ckpt
    from .fileio import write_json_atomic

    source = ckpt.find_checkpoint(run_dir)
    meta, weights = ckpt.load_checkpoint(source)
    if "encoder_weights" in meta:
        raise ValueError(f"{source}: a fine-tuned encoder cannot be packaged (its blocks are not float16-safe here)")
    out = models_dir / name
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.float16) if v.is_floating_point() else v for k, v in weights.items()},
              out / "model.safetensors")
    data = dict(meta.get("data") or {})
    data["data_dir"] = Path(data["data_dir"]).name if data.get("data_dir") else None  # no path of this machine
    keep = {k: meta[k] for k in ("format", "version", "model_config", "vocab", "encoder", "language", "metrics",
                                 "train_config") if k in meta}
    progress = meta.get("progress") or {}
    write_json_atomic(out / "checkpoint.json", {**keep, "data": data, "packaged": name,
                                                "progress": {"epoch": progress.get("epoch", 0),
                                                             "best_epoch": progress.get("best_epoch", -1)}})
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m imcap.packaged RUN_DIR NAME", file=sys.stderr)
        return 2
    out = package(args[0], args[1])
    print(f"packaged {args[0]} as {args[1]}: {out} ({sum(f.stat().st_size for f in out.iterdir()) / 1e6:.1f} MB); "
          f"write its {CARD}: " + json.dumps(str(out / CARD)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
