"""`bioclip-fast export RUN --format open_clip OUT`: a run (or model.pt) as an open_clip hub-snapshot folder.

The folder holds ``open_clip_config.json`` (the full ``model_cfg`` + preprocess, so nothing has to be registered) and
``open_clip_model.safetensors``; it loads with ``open_clip.create_model_from_pretrained("local-dir:OUT")``, with
pybioclip (``--model local-dir:OUT``) and with ``bioclip-fast predict --model OUT``. ``visual.continual_proj`` (the
training-only replay projection) is dropped, as plain open_clip has no such parameter. Our label set goes to
``bioclip_fast_meta.json`` beside them (open_clip ignores it).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bioclip_fast.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run directory (with model.pt) or a model.pt checkpoint")
    parser.add_argument("out", help="output folder (created; must not hold another model)")
    parser.add_argument("--format", default="open_clip", choices=("open_clip",),
                        help="open_clip: a hub snapshot (open_clip_config.json + open_clip_model.safetensors)")
    parser.add_argument("--overwrite", action="store_true", help="replace the files of an existing export in OUT")


def run(args: argparse.Namespace) -> int:
    from bioclip_fast.model import HUB_CONFIG, checkpoint_path, export_open_clip, load_model

    src = checkpoint_path(args.run)
    if not src.is_file():
        raise UsageError(f"{args.run}: no model.pt there (give a run directory or a model.pt file)")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        if (out / HUB_CONFIG).exists():
            raise UsageError(f"{out} already holds an export; pass --overwrite to replace it")
        raise UsageError(f"{out} is not empty; give a new or empty folder")
    model, _, _, meta = load_model(src)
    had_cp = getattr(model.visual, "continual_proj", None) is not None
    export_open_clip(model, out, meta)
    note = " (dropped visual.continual_proj, a training-only replay projection open_clip does not have)" if had_cp \
        else ""
    print(f"exported {src} -> {out} (open_clip_config.json + open_clip_model.safetensors){note}; load it with "
          f"open_clip.create_model_from_pretrained('local-dir:{out}')", file=sys.stderr)
    return 0
