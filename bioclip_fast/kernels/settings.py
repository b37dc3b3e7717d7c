"""The environment switches of the Triton kernels, read at call time. Imports neither triton nor torch.

``TRITON_INTERPRET=1`` runs the kernels on CPU tensors under triton's interpreter (with the fixed tiny tiles of
``autotune.INTERPRET_*_CONFIG``, or the GPU's launch path with ``BIOCLIP_FAST_INTERPRET_AUTOTUNED=1``);
``BIOCLIP_FAST_AUTOTUNE=0`` runs the first (default) config of each autotune list. The backward's strategy and
memory budget (``BIOCLIP_FAST_BWD``, ``BIOCLIP_FAST_BWD_MEMORY_MB``) are read by ``planner``.
``BIOCLIP_FAST_INTERPRET_TL_DOT=1`` keeps ``tl.dot`` for the logits under the interpreter (the GPU's code; see
``precision.fixed_order_logits``).
"""
from __future__ import annotations

import os


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1`` (CPU tensors, numpy semantics, slow: use tiny tiles)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpret_autotuned() -> bool:
    """Under the interpreter, take the launch path a GPU takes (``BIOCLIP_FAST_INTERPRET_AUTOTUNED=1``): the
    autotuned wrapper with the GPU's config lists, pruning and (unless ``BIOCLIP_FAST_AUTOTUNE=0``) benchmarking,
    instead of the fixed ``INTERPRET_*_CONFIG`` tiles. Slow (GPU-sized tiles in numpy): tests and the gpu_check
    rehearsal use it on tiny problems."""
    return interpreting() and os.environ.get("BIOCLIP_FAST_INTERPRET_AUTOTUNED", "0").strip() == "1"


def autotune_enabled() -> bool:
    """``BIOCLIP_FAST_AUTOTUNE=0`` runs the first (default) config of each list without benchmarking the others:
    for huge B (each autotune trial is a full sweep) or reproducible timing of the defaults."""
    return os.environ.get("BIOCLIP_FAST_AUTOTUNE", "1").strip() != "0"


def interpret_tl_dot() -> bool:
    """Under the interpreter, form the logits tiles with ``tl.dot`` as on a GPU instead of ``fixed_order_dot``
    (``BIOCLIP_FAST_INTERPRET_TL_DOT=1``): the GPU's code, checked where numpy's BLAS rounds an entry the same
    whatever the product's shape (``OPENBLAS_CORETYPE=Prescott``)."""
    return interpreting() and os.environ.get("BIOCLIP_FAST_INTERPRET_TL_DOT", "0").strip() == "1"
