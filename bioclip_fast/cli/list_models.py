"""`bioclip-fast list-models`: pybioclip's list-models (the TreeOfLife models and open_clip's architectures, ours
too), or one architecture's pretrained tags."""
from __future__ import annotations

import argparse

from bioclip_fast.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="list the pretrained tags of this open_clip architecture")


def run(args: argparse.Namespace) -> int:
    import open_clip

    from bioclip_fast.hub import TOL_MODELS
    from bioclip_fast.model import CUSTOM_MODEL_CONFIGS, list_models

    if args.model:
        if args.model not in list_models():
            raise UsageError(f"--model {args.model}: not a known architecture (run list-models without --model)")
        for tag in open_clip.list_pretrained_tags_by_model(args.model) if args.model not in CUSTOM_MODEL_CONFIGS \
                else []:
            print(tag)
        return 0
    for name in list(TOL_MODELS) + sorted(CUSTOM_MODEL_CONFIGS) + open_clip.list_models():
        print(f"\t{name}")
    return 0

