"""The GEMM backwards of the pairwise losses: a Triton kernel writes the gradient tile G into a bounded workspace and
cuBLAS does the products, so each logits tile is computed once (6*Bq*Bk*D FLOPs, 2/3 of them in cuBLAS).

``pairwise_bwd_gemm`` (``gemm``): column chunks, ``dQ += G k_c`` into an fp32 accumulator, ``dK_c = G^T q``.
``pairwise_bwd_gemm2d`` (``gemm2d``, fp32 features): (row chunk x column chunk) tiles accumulated in place into the
fp32 gradients, bounded memory at every B. Their extra memory is planned in ``planner``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from bioclip_fast.kernels import planner
from bioclip_fast.kernels.autotune import INTERPRET_FWD_CONFIG, autotuned, grad_configs, launch, prune_grad, size_bucket
from bioclip_fast.kernels.operands import chunk_pairs, positive_dots
from bioclip_fast.kernels.planner import clamp_chunks
from bioclip_fast.kernels.precision import dot_precision, fixed_order_logits, grad_prescale
from bioclip_fast.kernels.tiles import MODE_CLIP_DIR, MODE_CLIP_SYM, row_probs, sym_probs, tile_dot

# ----------------------------------------------------------------------------------------------------------------
# GEMM-assisted backward for wide D: a Triton kernel writes the gradient tile G for a chunk of columns into a
# bounded workspace, cuBLAS does dQ += G K_c and dK_c = G^T Q. Executes 6*Bq*Bk*D FLOPs (the fused path: 8, more
# with D slices) with 2/3 of them in cuBLAS; costs a [Bq, chunk] workspace and an fp32 [Bq, D] dQ accumulator.
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def grad_tile_kernel(
    Q, K, SCALE, BIAS, LSE_R, LSE_C, CEN_R, CEN_C, W, DS_PART, DB_PART, RS_PART,
    Bq, Bk, c0, C, offset,
    B_BUCKET,  # autotune key only
    D: tl.constexpr, MODE: tl.constexpr, HAS_BIAS: tl.constexpr, PREC: tl.constexpr, GSCALE: tl.constexpr,
    ROW_SUMS: tl.constexpr, FIXED_ORDER: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """W[i, j - c0] = GSCALE * G[i, j] / coef for rows i of one block and columns j in [c0, c0 + C) of one block,
    plus centred partial sums for dscale / dbias (see ``backward_fused.pairwise_bwd_kernel``). One-direction CLIP
    also writes the block's row sums of P to ``RS_PART[pid_n, i]``: the host renormalizes dQ with them (as the
    fused dQ kernel does), since G leaves the tile before its row is complete; only with ``ROW_SUMS`` (dQ needed:
    otherwise RS_PART is a one-element dummy)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_w = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # column inside the chunk
    offs_n = c0 + offs_w
    mask_m = offs_m < Bq
    mask_n = (offs_w < C) & (offs_n < Bk)
    t = tile_dot(Q, K, offs_m, mask_m, offs_n, mask_n, D, BLOCK_M, BLOCK_N, BLOCK_D, PREC, FIXED_ORDER)
    scale2 = tl.load(SCALE).to(tl.float32) * 1.4426950408889634
    if HAS_BIAS:
        bias2 = tl.load(BIAS).to(tl.float32) * 1.4426950408889634
    else:
        bias2 = 0.0
    s2 = t * scale2 + bias2
    is_pos = offs_n[None, :] == (offs_m[:, None] + offset)
    onehot = tl.where(is_pos, 1.0, 0.0)
    valid = mask_m[:, None] & mask_n[None, :]
    cr = tl.load(CEN_R + offs_m, mask=mask_m, other=0.0)
    if MODE == 2:
        zs2 = tl.minimum(tl.where(is_pos, s2, -s2), 126.0)
        g = tl.where(valid, (1.0 - 2.0 * onehot) / (1.0 + tl.exp2(zs2)), 0.0)
        rows = tl.sum(g, 1)
        ds = tl.sum(tl.sum(g * (t - cr[:, None]), 1) + cr * rows, 0)
        db = tl.sum(rows, 0)
    else:
        scale = tl.load(SCALE).to(tl.float32)
        if HAS_BIAS:
            bias = tl.load(BIAS).to(tl.float32)
        else:
            bias = 0.0
        lr = tl.load(LSE_R + offs_m, mask=mask_m, other=0.0)
        if MODE == 0:
            lc = tl.load(LSE_C + offs_n, mask=mask_n, other=0.0)
            pa, pb = sym_probs(t, scale, bias, lr, lc)
            g = tl.where(valid, 0.5 * (pa + pb) - onehot, 0.0)
            cc = tl.load(CEN_C + offs_n, mask=mask_n, other=0.0)
            ds = tl.sum(tl.sum(tl.where(valid, (pa - onehot) * (t - cr[:, None]) + (pb - onehot) * (t - cc[None, :]),
                                        0.0), 1), 0) * 0.5
        else:
            p = tl.where(valid, row_probs(t, scale, bias, lr[:, None]), 0.0)
            g = p - tl.where(valid, onehot, 0.0)
            ds = tl.sum(tl.sum(g * (t - cr[:, None]), 1), 0)
            if ROW_SUMS:
                tl.store(RS_PART + pid_n.to(tl.int64) * Bq + offs_m, tl.sum(p, 1), mask=mask_m)
        db = 0.0  # CLIP: sum G = 0 exactly (a logit shift changes neither softmax)
    w_ptrs = W + offs_m.to(tl.int64)[:, None] * C + offs_w[None, :]
    tl.store(w_ptrs, (g * GSCALE).to(W.dtype.element_ty), mask=mask_m[:, None] & (offs_w[None, :] < C))
    pid = pid_m * tl.num_programs(1) + pid_n
    tl.store(DS_PART + pid, ds)
    tl.store(DB_PART + pid, db)


grad_tile_tuned = autotuned(
    grad_tile_kernel, configs=grad_configs(64),  # placeholder: prune_grad builds the list for the call's D
    key=["B_BUCKET", "D", "MODE", "ROW_SUMS", "PREC"], prune=prune_grad,
    reset_to_zero=["DS_PART", "DB_PART", "RS_PART"],  # per-program partials: the host sums every slot
)


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with fp32 accumulation and fp32 output (cuBLAS out_dtype for half inputs on CUDA)."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


class _GradTiles:
    """What the GEMM backwards share: the gradient-tile launches over (row range, column range) blocks of the
    problem, with their scalar-gradient sums and one-direction row sums of P, in one ``rows x cols`` workspace
    reused by every launch.

    ``sweep(q_r, k_c, r0, c0)`` launches ``grad_tile_kernel`` on rows r0.. x columns c0.. (``q_r`` / ``k_c`` the
    operands of those rows / columns, in the compute dtype) and returns the [R, C] tile ``gscale * G / coef``."""

    def __init__(self, q, k, scale, bias, lse_r, lse_c, grad, *, offset: int, inv_n: float, mode: int, op,
                 rows: int, cols: int, cen_r, need_q: bool):
        Bq = q.shape[0]
        dev = q.device
        self.scale, self.bias, self.lse_r, self.lse_c = scale, bias, lse_r, lse_c
        self.offset, self.bucket = int(offset), size_bucket(max(Bq, k.shape[0]))
        self.cen_r = positive_dots(q, k, offset) if cen_r is None else cen_r
        self.cen_c = self.cen_r if mode == MODE_CLIP_SYM else None
        self.op = op
        self.gscale = grad_prescale(op)
        self.coef = grad.to(torch.float32) * inv_n
        self.factor = scale.to(torch.float32) * self.coef / self.gscale  # on device: no host sync
        self.w = torch.empty(rows * cols, device=dev, dtype=op)
        n_part = triton.cdiv(rows, 16) * triton.cdiv(cols, 16)  # >= programs per launch for every config
        self.ds_part = torch.zeros(n_part, device=dev, dtype=torch.float32)
        self.db_part = torch.zeros_like(self.ds_part)
        self.ds = torch.zeros((), device=dev, dtype=torch.float32)
        self.db = torch.zeros((), device=dev, dtype=torch.float32)
        self.renorm = mode == MODE_CLIP_DIR and need_q
        self.rs_part = torch.zeros((triton.cdiv(cols, 16), rows) if self.renorm else 1, device=dev,
                                   dtype=torch.float32)
        self.rs = torch.zeros(Bq if self.renorm else 0, device=dev, dtype=torch.float64)
        self.meta = dict(D=q.shape[1], MODE=mode, HAS_BIAS=bias is not None, PREC=dot_precision(op),
                         GSCALE=self.gscale, ROW_SUMS=self.renorm, FIXED_ORDER=fixed_order_logits(dev))

    def sweep(self, q_r, k_c, r0: int, c0: int) -> torch.Tensor:
        R, C = q_r.shape[0], k_c.shape[0]
        dummy = self.ds_part
        wc = self.w[:R * C].view(R, C)
        self.ds_part.zero_()
        self.db_part.zero_()
        if self.renorm:
            self.rs_part.zero_()
        # Local row / column indices: row i of the block is global row r0 + i, so its positive (global column
        # r0 + i + offset) is local column i + (offset + r0 - c0).
        args = (q_r, k_c, self.scale, self.bias if self.bias is not None else dummy,
                self.lse_r[r0:r0 + R] if self.lse_r is not None else dummy,
                self.lse_c[c0:c0 + C] if self.lse_c is not None else dummy, self.cen_r[r0:r0 + R],
                self.cen_c[c0:c0 + C] if self.cen_c is not None else dummy, wc, self.ds_part, self.db_part,
                self.rs_part, R, C, 0, C, self.offset + r0 - c0, self.bucket)

        def grid(META):
            return (triton.cdiv(R, META["BLOCK_M"]), triton.cdiv(C, META["BLOCK_N"]))

        launch(grad_tile_kernel, grad_tile_tuned, grid, args, self.meta, INTERPRET_FWD_CONFIG, q_r.device)
        self.ds += self.ds_part.sum()
        self.db += self.db_part.sum()
        if self.renorm:  # the kernel's row stride is this block's R
            n_cb = self.rs_part.shape[0]
            self.rs[r0:r0 + R] += self.rs_part.view(-1)[:n_cb * R].view(n_cb, R).sum(0, dtype=torch.float64)
        return wc

    def finish_dq(self, acc: torch.Tensor, k: torch.Tensor, offset: int) -> torch.Tensor:
        """acc (fp32, in place) -> dQ: renormalized one-direction rows, times scale * coef / gscale."""
        if self.renorm:
            renormalize_rows(acc, self.rs, k, offset, self.gscale, self.op)
        return acc.mul_(self.factor)

    def scalars(self):
        return self.ds * self.coef, self.db * self.coef


def pairwise_bwd_gemm(q, k, scale, bias, lse_r, lse_c, grad, *, offset: int, inv_n: float, mode: int,
                      chunk: int | None = None, cen_r=None, need_q: bool = True, need_k: bool = True):
    """(dq, dk, dscale_sum, dbias_sum) of a pairwise loss through gradient-tile chunks and cuBLAS products.

    The logits are computed once per tile (in ``grad_tile_kernel``); G goes through a [Bq, chunk] workspace:
    ``dQ += G k_c`` into an fp32 accumulator, ``dK_c = G^T q`` whole per chunk. ``need_q`` / ``need_k`` = False
    skip that product (and return None for it)."""
    Bq, D = q.shape
    Bk = k.shape[0]
    if chunk is None:
        chunk = planner.bwd_plan(Bq, Bk, D, q.element_size(), q.device.type, choice="gemm")[1]
    chunk = max(1, min(chunk, Bk))
    tiles = _GradTiles(q, k, scale, bias, lse_r, lse_c, grad, offset=offset, inv_n=inv_n, mode=mode, op=q.dtype,
                       rows=Bq, cols=chunk, cen_r=cen_r, need_q=need_q)
    dq_acc = torch.zeros((Bq, D), device=q.device, dtype=torch.float32) if need_q else None
    dk = torch.empty_like(k) if need_k else None
    for c0 in range(0, Bk, chunk):
        kc = k[c0:c0 + chunk]
        wc = tiles.sweep(q, kc, 0, c0)
        if need_q:  # accumulate in place in fp32: no [Bq, D] temporary per chunk
            _addmm_f32(dq_acc, wc, kc)
        if need_k:
            dk[c0:c0 + chunk] = _mm_f32(wc.T, q).mul_(tiles.factor).to(k.dtype)
    dq = tiles.finish_dq(dq_acc, k, offset).to(q.dtype) if need_q else None
    return (dq, dk, *tiles.scalars())


def renormalize_rows(acc: torch.Tensor, rs: torch.Tensor, k: torch.Tensor, offset: int, gscale: float,
                     op: torch.dtype, rows: int = 1024) -> None:
    """One-direction CLIP dQ with its row softmax renormalized, in place: ``acc`` holds ``sum_j gscale * (P_ij -
    onehot_ij) k_j`` with P from the stored LSE, whose rows sum to ``rs`` = 1 + (rounding of the LSE) instead of
    1; near-duplicate columns turn that per-row error into a large one in ``P k``. The renormalized row is
    ``(acc_i + gscale k_pos) / rs_i - gscale k_pos``, exactly what the fused dQ kernel computes. Chunked over
    rows: a few MB of temporaries at any B. ``k_pos`` is rounded to ``op``, the dtype the products used."""
    inv = (1.0 / rs).to(torch.float32)
    for r0 in range(0, acc.shape[0], rows):
        r1 = min(acc.shape[0], r0 + rows)
        kpos = k[r0 + offset:r1 + offset].to(op).to(torch.float32, copy=True)  # never a view of the caller's k
        c = inv[r0:r1, None]
        acc[r0:r1].mul_(c).add_(kpos.mul_(c - 1.0).mul_(gscale))


# ----------------------------------------------------------------------------------------------------------------
# One-recompute backward with bounded memory at every B: (row chunk x column chunk) gradient tiles, accumulated in
# place into fp32 gradients by cuBLAS. Needs fp32 gradients (fp32 features: the trainer's path and open_clip's
# normalized features), which are then the accumulators; the products run in the compute dtype (bf16 on the tensor
# cores) on per-chunk casts, so no [B, D] copy in another dtype exists either.
# ----------------------------------------------------------------------------------------------------------------


def pairwise_bwd_gemm2d(q, k, scale, bias, lse_r, lse_c, grad, *, offset: int, inv_n: float, mode: int,
                        op_dtype: torch.dtype | None = None, chunks: tuple[int, int] | None = None, cen_r=None,
                        need_q: bool = True, need_k: bool = True):
    """(dq, dk, dscale_sum, dbias_sum) of a pairwise loss with fp32 features, each logits tile computed once.

    For every (row chunk r, column chunk c): ``grad_tile_kernel`` writes G_rc (compute dtype) into a [rows, cols]
    workspace, then ``dq[r] += G_rc k_c`` and ``dk[c] += G_rc^T q_r`` accumulate in place in the fp32 gradients
    (cuBLAS, fp32 accumulation). ``op_dtype`` (bf16/fp16) casts q_r and k_c per chunk; None computes in fp32 (the
    matmul precision torch is set to). Extra memory: ``gemm2d_extra_bytes``, bounded at every B."""
    Bq, D = q.shape
    Bk = k.shape[0]
    if q.dtype != torch.float32:
        raise ValueError(f"the chunked GEMM backward accumulates into fp32 gradients; got {q.dtype} features")
    op = op_dtype or q.dtype
    cast = op != q.dtype
    if chunks is None:
        chunks = planner.gemm2d_chunks(Bq, Bk, D, op.itemsize, cast, planner.BWD_MEMORY_BYTES)
        if chunks is None:
            chunks = (min(Bq, planner.MIN_CHUNK), min(Bk, planner.MIN_CHUNK))
    rows, cols = clamp_chunks(chunks, Bq, Bk)
    tiles = _GradTiles(q, k, scale, bias, lse_r, lse_c, grad, offset=offset, inv_n=inv_n, mode=mode, op=op,
                       rows=rows, cols=cols, cen_r=cen_r, need_q=need_q)
    dq = torch.zeros((Bq, D), device=q.device, dtype=torch.float32) if need_q else None
    dk = torch.zeros((Bk, D), device=q.device, dtype=torch.float32) if need_k else None
    for r0, q_r, c0, k_c in chunk_pairs(q, k, (rows, cols), op):
        wc = tiles.sweep(q_r, k_c, r0, c0)
        if need_q:
            _addmm_f32(dq[r0:r0 + rows], wc, k_c)
        if need_k:
            _addmm_f32(dk[c0:c0 + cols], wc.T, q_r)
    if need_q:
        tiles.finish_dq(dq, k, offset)
    if need_k:
        dk.mul_(tiles.factor)
    return (dq, dk, *tiles.scalars())


# What this torch offers for fp32-output half-precision products on CUDA: addmm(out_dtype=) (torch >= 2.8) until a
# call fails, then mm(out_dtype=); "warned" once the last resort (a rounded product) has been reported.
_F32_MATMUL = {"addmm": True, "warned": False}


def _addmm_f32(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out += a @ b in place, out fp32, a/b in the compute dtype (fp32 accumulation, no temporary on CUDA).
    Without ``addmm(out_dtype=)`` (older torch): ``mm(out_dtype=)`` plus an add (a [rows, D] fp32 temporary),
    else the half-precision product rounded once per chunk, with one warning."""
    if a.dtype == torch.float32:
        out.addmm_(a, b)
        return
    if not a.is_cuda:
        out += a.float() @ b.float()
        return
    if _F32_MATMUL["addmm"]:
        try:
            torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
            return
        except (TypeError, RuntimeError):
            _F32_MATMUL["addmm"] = False
    try:
        out += torch.mm(a, b, out_dtype=torch.float32)
    except (TypeError, RuntimeError):
        if not _F32_MATMUL["warned"]:
            _F32_MATMUL["warned"] = True
            import warnings

            warnings.warn("bioclip_fast: this torch has no fp32-output half-precision matmul (addmm/mm out_dtype); "
                          f"the GEMM backward rounds each chunk's products to {a.dtype}", RuntimeWarning,
                          stacklevel=2)
        out += (a @ b).float()
