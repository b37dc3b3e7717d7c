"""bioclip_fast: fast training and serving of BioCLIP-2-style biology CLIP models."""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public names resolved lazily so `import bioclip_fast` (and the CLI's --help) does not import torch/triton.
_LAZY = {
    "FusedClipLoss": "bioclip_fast.loss",
    "FusedSigLipLoss": "bioclip_fast.loss",
    "fused_clip_loss": "bioclip_fast.loss",
    "fused_siglip_loss": "bioclip_fast.loss",
    "Taxon": "bioclip_fast.taxonomy",
    "create_model": "bioclip_fast.model",
    "load_model": "bioclip_fast.model",
    "save_model": "bioclip_fast.model",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bioclip_fast' has no attribute {name!r}")
