"""Make open_clip (and open_clip_train) build our fused losses.

``patch()`` swaps ``open_clip.create_loss`` — where ``open_clip_train.main`` gets it (``from open_clip import
create_loss``), so patch before importing/starting the trainer; an already-imported ``open_clip_train.main`` is
patched too — for a version that returns ``FusedClipLoss`` / ``FusedSigLipLoss`` configured from the same
``args``. Cases we do not cover (distillation, CoCa, Horovod) keep open_clip's own loss, with a warning.

    from bioclip_fast.integrations import open_clip as bf_open_clip
    bf_open_clip.patch()               # or: with bf_open_clip.patched(): ...
    loss = open_clip.create_loss(args) # -> FusedClipLoss(local_loss=args.local_loss, ...)
"""
from __future__ import annotations

import contextlib
import functools
import sys
import warnings

# (module name, attribute) pairs that hold a reference to create_loss; patched where the module is imported.
_TARGETS = (("open_clip", "create_loss"), ("open_clip.factory", "create_loss"), ("open_clip_train.main", "create_loss"))
_originals: dict[tuple[str, str], object] = {}
_options: dict = {}


def _original_create_loss():
    import open_clip.factory

    return _originals.get(("open_clip.factory", "create_loss"), open_clip.factory.create_loss)


def fused_create_loss(args, *, backend: str = "auto", check_finite: bool = True):
    """open_clip's ``create_loss(args)`` returning our fused losses (same argument names and defaults)."""
    from bioclip_fast.loss import FusedClipLoss, FusedSigLipLoss

    rank = int(getattr(args, "rank", 0))
    world_size = int(getattr(args, "world_size", 1))
    reason = None
    if getattr(args, "distill", False):
        reason = "distillation (DistillClipLoss)"
    elif "coca" in str(getattr(args, "model", "")).lower():
        reason = "CoCa (CoCaLoss)"
    elif getattr(args, "horovod", False):
        reason = "Horovod"
    if reason is not None:
        warnings.warn(f"bioclip_fast: {reason} is not covered by the fused losses; using open_clip's loss",
                      RuntimeWarning, stacklevel=2)
        return _original_create_loss()(args)
    if getattr(args, "siglip", False):
        return FusedSigLipLoss(
            rank=rank,
            world_size=world_size,
            dist_impl=getattr(args, "loss_dist_impl", None),
            backend=backend,
            check_finite=check_finite,
        )
    return FusedClipLoss(
        local_loss=bool(getattr(args, "local_loss", False)),
        gather_with_grad=bool(getattr(args, "gather_with_grad", False)),
        cache_labels=True,
        rank=rank,
        world_size=world_size,
        backend=backend,
        check_finite=check_finite,
    )


def is_patched() -> bool:
    return bool(_originals)


def patch(*, backend: str = "auto", check_finite: bool = True) -> None:
    """Route ``open_clip.create_loss`` (and the copies imported by open_clip_train) to ``fused_create_loss``.

    Idempotent; calling it again only updates ``backend`` / ``check_finite``."""
    import open_clip  # noqa: F401 - make sure the targets exist
    import open_clip.factory  # noqa: F401

    from bioclip_fast.ops.dispatch import check_backend

    check_backend(backend)
    _options.update(backend=backend, check_finite=bool(check_finite))
    replacement = functools.wraps(_original_create_loss())(
        lambda args: fused_create_loss(args, **_options)
    )
    replacement.__bioclip_fast__ = True
    for mod_name, attr in _TARGETS:
        mod = sys.modules.get(mod_name)
        if mod is None or not hasattr(mod, attr):
            continue
        current = getattr(mod, attr)
        if not getattr(current, "__bioclip_fast__", False):
            _originals[(mod_name, attr)] = current
        setattr(mod, attr, replacement)


def unpatch() -> None:
    """Restore every attribute ``patch()`` replaced, including copies taken by modules imported while patched
    (``from open_clip import create_loss`` after ``patch()``)."""
    base = _originals.get(("open_clip.factory", "create_loss"))
    for mod_name, attr in _TARGETS:
        mod = sys.modules.get(mod_name)
        if mod is None or not getattr(getattr(mod, attr, None), "__bioclip_fast__", False):
            continue
        setattr(mod, attr, _originals.get((mod_name, attr), base))
    _originals.clear()
    _options.clear()


@contextlib.contextmanager
def patched(*, backend: str = "auto", check_finite: bool = True):
    """``with patched(): ...`` — patch for the block only (restores the previous state, even if already patched)."""
    was = is_patched()
    saved = dict(_options)
    patch(backend=backend, check_finite=check_finite)
    try:
        yield
    finally:
        if was:
            patch(**saved)
        else:
            unpatch()
