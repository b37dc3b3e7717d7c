"""Arguments shared by several subcommands (this module is not one): the model flags of eval/analyze
(``--checkpoint``, repeatable) and of predict/embed/list-tol-taxa (``--model`` + ``--pretrained``), the image-data
flags of eval/analyze, ``--device``, and the resolution of ``--checkpoint`` values to what
:func:`bioclip_fast.model.load_model` accepts."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """``--device``, resolved by :func:`bioclip_fast.devices.resolve_device` before any work."""
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda when available)")


def add_checkpoint_arguments(parser: argparse.ArgumentParser, *, multiple: bool) -> None:
    """eval / analyze: ``--checkpoint`` (``--model``), repeatable when ``multiple``, and ``--model-name``."""
    if multiple:
        parser.add_argument("--checkpoint", "--model", dest="checkpoints", action="append", required=True,
                            metavar="PATH", help="our checkpoint or an open_clip state dict (repeat to compare models)")
    else:
        parser.add_argument("--checkpoint", "--model", dest="checkpoint", required=True, metavar="PATH",
                            help="our checkpoint (model.pt or a run dir) or an open_clip state dict")
    parser.add_argument("--model-name", default=None,
                        help="open_clip architecture for plain state dicts (e.g. ViT-L-14); ours describe themselves")


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """eval / analyze: the labelled images to encode, and how."""
    parser.add_argument("--data", default="butterflies",
                        help="'butterflies' (bundled), a metadata CSV, an ImageFolder dir, or shards (*.tar / dir)")
    parser.add_argument("--split", default="val", choices=("train", "val", "all"),
                        help="split of the bundled butterflies (default val: held out from training)")
    parser.add_argument("--root", default=None, help="image root for a CSV (default: the CSV's folder)")
    parser.add_argument("--image-column", default=None,
                        help="image path column (default: image, or the reference's filepath)")
    parser.add_argument("--label-column", default=None, help="class column (default: scientific_name / species / label)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    add_device_argument(parser)
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")


def image_set_options(args: argparse.Namespace) -> dict:
    """The fields of :class:`bioclip_fast.eval.options.ImageSetOptions` from the flags of
    :func:`add_data_arguments` and :func:`add_checkpoint_arguments` (shared by eval's and analyze's options)."""
    return dict(data=args.data, split=args.split, root=args.root, image_column=args.image_column,
                label_column=args.label_column, batch_size=args.batch_size, workers=args.workers,
                model_name=args.model_name, progress=not args.no_progress)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """predict / embed / list-tol-taxa: pybioclip's ``--model`` (our ``--checkpoint`` too) and ``--pretrained``."""
    parser.add_argument("--model", "--checkpoint", dest="model", default=None, metavar="MODEL",
                        help="hf-hub:ORG/NAME (default hf-hub:imageomics/bioclip-2, from the Hugging Face cache), "
                             "local-dir:PATH or a hub-snapshot folder, an open_clip architecture (with --pretrained), "
                             "or our model.pt / run directory")
    parser.add_argument("--pretrained", default=None,
                        help="weights for an architecture --model: a file (.pt/.bin/.safetensors) or an open_clip tag")
    parser.add_argument("--model-name", default=None, help=argparse.SUPPRESS)  # older spelling of --model ARCH


HUB_PREFIXES = ("local-dir:", "hf-hub:")


def resolve_checkpoint(path: str) -> Path | str:
    """Our checkpoint file (a run dir resolves to its model.pt); hub specs (``local-dir:PATH``, ``hf-hub:NAME``) and
    hub-snapshot folders (``open_clip_config.json`` beside the weights) are passed on to
    :func:`bioclip_fast.model.load_model` as ``local-dir:PATH`` strings."""
    if str(path).startswith(HUB_PREFIXES):
        return str(path)
    p = Path(path)
    if p.is_dir() and (p / "open_clip_config.json").is_file() and not (p / "model.pt").is_file():
        return f"local-dir:{p}"
    if p.is_dir():
        for name in ("model.pt", "checkpoint.pt", "final.pt"):
            if (p / name).is_file():
                return p / name
        raise FileNotFoundError(f"{p} is a directory without model.pt")
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    return p


def model_label(path: Path | str) -> str:
    if isinstance(path, str):
        return Path(path.split(":", 1)[1].rstrip("/")).name or path
    return path.parent.name if path.name in ("model.pt", "checkpoint.pt", "final.pt") else path.stem


def resolve_checkpoints(paths: list[str]) -> tuple[list[Path | str], list[str]]:
    """Checkpoint files and one unique display label each (index-prefixed where two would collide)."""
    ckpts = [resolve_checkpoint(c) for c in paths]
    labels = [model_label(c) for c in ckpts]
    if len(set(labels)) != len(labels):
        labels = [f"{i}:{lab}" for i, lab in enumerate(labels)]
    return ckpts, labels
