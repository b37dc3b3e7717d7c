"""Fused contrastive losses, drop-in replacements for ``open_clip.ClipLoss`` and ``open_clip.SigLipLoss``.

Same constructor arguments, same ``forward`` signature, same value and gradients (features, ``logit_scale``,
``logit_bias``) — but the B×B logits matrix is never built: tiles of image×text features are reduced on the fly
(Triton on CUDA, C++/OpenMP on CPU, a chunked torch reference elsewhere). Extra keyword arguments:
``backend`` ("auto" | "triton" | "cpp" | "torch"), ``check_finite`` (one fused isfinite reduction per input;
set False to skip it in production once a run is known to be healthy) and ``compute_dtype`` ("auto": the autocast
dtype under autocast, else the features' dtype; or bf16 / fp16 / fp32): the dtype of the tensor-core products on
CUDA, fp32 accumulation always (``bioclip_fast.ops.precision``). A trainer that keeps its features in fp32 outside
autocast passes ``compute_dtype="bf16"`` to get open_clip-under-autocast speed; ``"fp32"`` keeps exact fp32.

Multi-GPU layout (world_size > 1), per rank with local batch B:
  * ClipLoss, local_loss=True: ½(CE(img_local vs text_all) + CE(text_local vs img_all)), positives at rank·B —
    O(B·B_global) work and O(B_global·D) memory per rank.
  * ClipLoss, local_loss=False: every rank computes the global symmetric loss over the gathered features (as
    open_clip does).
  * SigLipLoss: local image rows vs all-gathered text columns (with grad), positives at rank·B. This is the same
    loss and gradient as open_clip's neighbour-exchange modes ('bidir', 'shift', 'reduce', 'gather'), which
    sum the local-vs-each-chunk losses.
"""
from __future__ import annotations

import numbers

import torch
from torch import nn

from bioclip_fast import distributed as bdist
from bioclip_fast.ops import dispatch
from bioclip_fast.ops import precision
from bioclip_fast.ops.clip_loss import clip_dir_loss, clip_sym_loss
from bioclip_fast.ops.siglip_loss import siglip_loss
from bioclip_fast.ops.validate import check_features

__all__ = ["FusedClipLoss", "FusedSigLipLoss", "fused_clip_loss", "fused_siglip_loss"]

SIGLIP_DIST_IMPLS = ("bidir", "shift", "reduce", "gather")


def _check_rank_world(rank, world_size) -> tuple[int, int]:
    for v, name in ((rank, "rank"), (world_size, "world_size")):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    return int(rank), int(world_size)


def fused_clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale,
    logit_bias=None,
    *,
    rank: int = 0,
    world_size: int = 1,
    local_loss: bool = False,
    gather_with_grad: bool = True,
    backend: str = "auto",
    check_finite: bool = True,
    compute_dtype="auto",
) -> torch.Tensor:
    """Symmetric InfoNCE, ½(CE(image→text) + CE(text→image)), equal to ``open_clip.ClipLoss`` with the same
    ``local_loss`` / ``gather_with_grad`` / ``rank`` / ``world_size``. ``logit_scale`` is the already-exp'd scale
    (0-dim or [1] tensor, or a float); ``logit_bias`` optional. Returns a fp32 scalar."""
    rank, world_size = _check_rank_world(rank, world_size)
    dispatch.check_backend(backend)
    cd = precision.check_compute_dtype(compute_dtype)
    check_features(image_features, text_features, q_name="image_features", k_name="text_features")
    if world_size == 1:
        return clip_sym_loss(
            image_features, text_features, logit_scale, logit_bias, backend=backend, check_finite_inputs=check_finite,
            compute_dtype=cd,
        )
    all_img, all_txt = bdist.gather_features(
        image_features,
        text_features,
        local_loss=local_loss,
        gather_with_grad=gather_with_grad,
        rank=rank,
        world_size=world_size,
    )
    if not local_loss:
        return clip_sym_loss(
            all_img, all_txt, logit_scale, logit_bias, backend=backend, check_finite_inputs=check_finite,
            q_name="image_features (all ranks)", k_name="text_features (all ranks)", compute_dtype=cd,
        )
    # Every rank checks the gathered tensors, so a bad value anywhere raises on all ranks alike (no hang).
    offset = rank * image_features.shape[0]
    kw = dict(backend=backend, check_finite_inputs=check_finite, compute_dtype=cd)
    l_img = clip_dir_loss(image_features, all_txt, logit_scale, logit_bias, offset,
                          q_name="image_features", k_name="text_features (all ranks)", **kw)
    l_txt = clip_dir_loss(text_features, all_img, logit_scale, logit_bias, offset,
                          q_name="text_features", k_name="image_features (all ranks)", **kw)
    return 0.5 * (l_img + l_txt)


def fused_siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale,
    logit_bias=None,
    *,
    rank: int = 0,
    world_size: int = 1,
    backend: str = "auto",
    check_finite: bool = True,
    compute_dtype="auto",
) -> torch.Tensor:
    """Sigmoid loss, equal to ``open_clip.SigLipLoss`` (any ``dist_impl``): −(1/B)·Σ_ij logsigmoid(z_ij·S_ij) over
    this rank's image rows and all ranks' text columns (gathered with grad), positives at ``rank·B``."""
    rank, world_size = _check_rank_world(rank, world_size)
    dispatch.check_backend(backend)
    cd = precision.check_compute_dtype(compute_dtype)
    check_features(image_features, text_features, q_name="image_features", k_name="text_features")
    if world_size == 1:
        return siglip_loss(
            image_features, text_features, logit_scale, logit_bias, 0, backend=backend,
            check_finite_inputs=check_finite, compute_dtype=cd,
        )
    all_txt = bdist.all_gather_with_grad(text_features, name="text_features", world_size=world_size)
    return siglip_loss(
        image_features, all_txt, logit_scale, logit_bias, rank * image_features.shape[0], backend=backend,
        check_finite_inputs=check_finite, k_name="text_features (all ranks)", compute_dtype=cd,
    )


class FusedClipLoss(nn.Module):
    """Drop-in for ``open_clip.ClipLoss`` (see the module docstring). ``cache_labels`` is accepted for
    compatibility; no label tensor is ever needed."""

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        use_horovod: bool = False,
        *,
        backend: str = "auto",
        check_finite: bool = True,
        compute_dtype="auto",
    ):
        super().__init__()
        if use_horovod:
            raise ValueError("use_horovod=True is not supported by FusedClipLoss; use torch.distributed")
        self.rank, self.world_size = _check_rank_world(rank, world_size)
        self.local_loss = bool(local_loss)
        self.gather_with_grad = bool(gather_with_grad)
        self.cache_labels = bool(cache_labels)
        self.use_horovod = False
        self.backend = dispatch.check_backend(backend)
        self.check_finite = bool(check_finite)
        self.compute_dtype = precision.check_compute_dtype(compute_dtype)

    def precision_plan(self, feature_dtype: torch.dtype = torch.float32, autocast_dtype=None) -> dict:
        """What the CUDA dispatch does with features of ``feature_dtype``: operand dtype and ``tl.dot`` input
        precision (see ``bioclip_fast.ops.precision.cuda_plan``)."""
        return precision.cuda_plan(feature_dtype, self.compute_dtype, autocast_dtype)

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict: bool = False):
        loss = fused_clip_loss(
            image_features,
            text_features,
            logit_scale,
            logit_bias,
            rank=self.rank,
            world_size=self.world_size,
            local_loss=self.local_loss,
            gather_with_grad=self.gather_with_grad,
            backend=self.backend,
            check_finite=self.check_finite,
            compute_dtype=self.compute_dtype,
        )
        return {"contrastive_loss": loss} if output_dict else loss

    def extra_repr(self) -> str:
        return (
            f"local_loss={self.local_loss}, gather_with_grad={self.gather_with_grad}, rank={self.rank}, "
            f"world_size={self.world_size}, backend={self.backend!r}"
        )


class FusedSigLipLoss(nn.Module):
    """Drop-in for ``open_clip.SigLipLoss``. ``dist_impl`` is validated like open_clip's but every mode computes the
    same loss here (one all-gather of the text features with gradient, then a fused local-vs-global sweep)."""

    def __init__(
        self,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        dist_impl: str | None = None,
        *,
        backend: str = "auto",
        check_finite: bool = True,
        compute_dtype="auto",
    ):
        super().__init__()
        self.cache_labels = bool(cache_labels)
        self.rank, self.world_size = _check_rank_world(rank, world_size)
        self.dist_impl = dist_impl or "bidir"
        if self.dist_impl not in SIGLIP_DIST_IMPLS:
            raise ValueError(f"dist_impl must be one of {SIGLIP_DIST_IMPLS} or None, got {dist_impl!r}")
        self.backend = dispatch.check_backend(backend)
        self.check_finite = bool(check_finite)
        self.compute_dtype = precision.check_compute_dtype(compute_dtype)

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict: bool = False):
        loss = fused_siglip_loss(
            image_features,
            text_features,
            logit_scale,
            logit_bias,
            rank=self.rank,
            world_size=self.world_size,
            backend=self.backend,
            check_finite=self.check_finite,
            compute_dtype=self.compute_dtype,
        )
        return {"contrastive_loss": loss} if output_dict else loss

    def extra_repr(self) -> str:
        return f"rank={self.rank}, world_size={self.world_size}, dist_impl={self.dist_impl!r}, backend={self.backend!r}"
