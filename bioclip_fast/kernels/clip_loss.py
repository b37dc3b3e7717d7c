"""Fused CLIP (InfoNCE) loss: Triton forward/backward kernels and host launchers. No autograd here.

Logits ``S = scale * q @ k^T + bias`` (``scale`` already exponentiated, as open_clip passes it) are computed tile by
tile and never stored. The forward keeps an online (max, sum-exp) per row and, for the symmetric loss, per column;
it stores only log-sum-exp vectors. The backward recomputes each logits tile from q, k and those vectors.

FLOPs (``flops()``): forward 2*Bq*Bk*D; forward + backward reported as 8*B^2*D for the symmetric loss (the
kernels execute 10*B^2*D: the dQ and dK kernels each recompute the logits).

Forward layout (``clip_fwd_kernel``): a (G, H) grid. Program (g, h) owns a contiguous range of row blocks (group
g) and a contiguous range of column blocks (split h). It reads each of its q row blocks once and streams its k
column blocks; per row block it writes one row-LSE partial ``row_part[h, rows]``. For the symmetric loss it also
merges the tile's column (max, sum-exp) into ``col_m/col_l[g, cols]``, a slice that only it touches (no atomics).
A tiny torch log-sum-exp over H (rows) and G (columns) finishes the vectors. Extra memory is
``(H*Bq + 2*G*Bk) * 4`` bytes with G, H ~ sqrt(4 * #SMs); about 9 MB at B = 32k on an H100.

Backward (``backward.pairwise_bwd_both``), three strategies, ``BIOCLIP_FAST_BWD=auto|fused|gemm|gemm2d``:
- ``gemm2d`` (fp32 features only; the products in bf16/fp16 with ``compute``, cast per chunk): for each (row
  chunk, column chunk) a Triton kernel writes G into a workspace and cuBLAS accumulates ``dQ_r += G k_c`` and
  ``dK_c += G^T q_r`` in place in the fp32 gradients: each logits tile computed once (6*B^2*D), extra memory
  ``planner.gemm2d_extra_bytes`` (workspace + the two chunk casts), within the budget at every B.
- ``gemm``: a Triton kernel writes G for a chunk of columns into a workspace and cuBLAS computes ``dQ += G k_c``
  (fp32 accumulator) and ``dK_c = G^T q``: each logits tile computed once (6*B^2*D backward FLOPs, two thirds in
  cuBLAS); extra memory ``planner.gemm_extra_bytes`` (workspace + 4*Bq*D accumulator).
- ``fused``: a dQ kernel over q row blocks streaming k and a dK kernel over k row blocks streaming q; each
  recomputes the logits tile, forms G in registers and accumulates ``G @ k`` / ``G^T @ q`` in fp32 registers.
  No atomics, deterministic, O(B) extra memory. For D > 512 a 64-row dX block no longer fits in registers without
  spills (ptxas), so the kernels split D in two slices (the logits recomputed per slice).
- ``auto`` (``planner.bwd_plan``): fp32 features -> ``gemm2d`` (D > 128, or wherever the other strategies'
  full casts would not fit); bf16/fp16 features -> ``gemm`` wherever its extra memory fits
  ``BIOCLIP_FAST_BWD_MEMORY_MB`` (64 MiB) on CUDA for D > 128, else ``fused``: within 64 MiB at every B.
  With bf16/fp16 gradients no single-recompute schedule fits a fixed budget at every B: whichever of dQ / dK is
  not owned by the program holding a tile has partial sums for all B rows live at some point (B*D values kept at
  more than bf16 precision); fp32 gradients are themselves that storage.
Forward with ``compute`` (fp32 features, bf16/fp16 products): q and k are cast per (row x column) chunk within
the budget (``planner.fwd_chunks``: one launch up to B*D*2*2 <= budget), one launch per chunk pair, LSEs merged
in float64 and rounded once.
Numerics (all backends): the owned softmax is renormalized (exactly for one-direction rows, to first order for the
symmetric loss), probabilities are formed from ``t * scale + (bias - lse)`` in natural units, and the scale
gradient is centred on each row's positive dot product (see ``backward_fused.pairwise_bwd_kernel``).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from bioclip_fast.kernels import planner
from bioclip_fast.kernels.autotune import (INTERPRET_FWD_CONFIG, autotuned, fwd_configs, launch, prune_fwd, size_bucket,
                                           target_programs)
from bioclip_fast.kernels.backward import pairwise_bwd_both
from bioclip_fast.kernels.operands import chunk_pairs
from bioclip_fast.kernels.planner import fwd_chunks, pairwise_flops
from bioclip_fast.kernels.precision import dot_precision, fixed_order_logits
from bioclip_fast.kernels.tiles import MODE_CLIP_DIR, MODE_CLIP_SYM, fixed_order_dot, load_rows, mma
from bioclip_fast.kernels.validation import check_loss_inputs, check_vector, compute_operand, grad_loss_tensor

__all__ = ["clip_sym_fwd", "clip_sym_bwd", "clip_dir_fwd", "clip_dir_bwd", "flops"]


@triton.jit
def clip_fwd_kernel(
    Q, K, SCALE, BIAS, ROW_PART, COL_M, COL_L, POS,
    Bq, Bk, offset, n_groups, n_splits,
    B_BUCKET,  # autotune key only
    D: tl.constexpr, HAS_BIAS: tl.constexpr, COL_STATS: tl.constexpr, PREC: tl.constexpr, FIXED_ORDER: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_g = tl.program_id(0)
    pid_h = tl.program_id(1)
    n_rb = tl.cdiv(Bq, BLOCK_M)
    n_cb = tl.cdiv(Bk, BLOCK_N)
    if COL_STATS:
        rb_start = pid_g * n_rb // n_groups
        rb_end = (pid_g + 1) * n_rb // n_groups
    else:
        rb_start = pid_g
        rb_end = pid_g + 1
    cb_start = pid_h * n_cb // n_splits
    cb_end = (pid_h + 1) * n_cb // n_splits

    scale = tl.load(SCALE).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(BIAS).to(tl.float32)
    else:
        bias = 0.0
    # Logits and maxima in natural units, rounded exactly as the backward rounds them (s = t * scale + bias), only
    # the small differences are scaled to log2 units for exp2: the backward's probabilities exp(s - lse) then sum
    # to 1 to rounding (a mismatch in how S is rounded at |S| ~ 100 is a systematic per-row/column error that
    # near-duplicate batches amplify in the feature gradients).
    L2E: tl.constexpr = 1.4426950408889634

    NUM_D: tl.constexpr = (D + BLOCK_D - 1) // BLOCK_D
    for rb in range(rb_start, rb_end):
        offs_m = rb * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < Bq
        if NUM_D == 1 and not FIXED_ORDER:
            q_tile = load_rows(Q, offs_m, mask_m, 0, D, BLOCK_D)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        tgt = offs_m + offset  # column of each row's positive
        # The (column block, D chunk) nest is flattened by the compiler into one software pipeline
        # (tl.range(flatten=True)): the next column block's first chunks load while this block's epilogue runs.
        for cb in tl.range(cb_start, cb_end, flatten=True):
            n0 = cb * BLOCK_N
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < Bk
            if FIXED_ORDER:  # the interpreter: every kernel sums each logit in the same order (tiles.fixed_order_dot)
                t = fixed_order_dot(Q, K, offs_m, mask_m, offs_n, mask_n, D, BLOCK_M, BLOCK_N)
            elif NUM_D == 1:
                k_tile = load_rows(K, offs_n, mask_n, 0, D, BLOCK_D)
                t = mma(q_tile, tl.trans(k_tile), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), PREC)
            else:
                t = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                for d0 in range(0, D, BLOCK_D):
                    t = mma(load_rows(Q, offs_m, mask_m, d0, D, BLOCK_D),
                            tl.trans(load_rows(K, offs_n, mask_n, d0, D, BLOCK_D)), t, PREC)
            s2 = t * scale + bias

            # Positive logits S[i, i + offset]: only tiles the shifted diagonal crosses.
            if (rb * BLOCK_M + offset < n0 + BLOCK_N) and (rb * BLOCK_M + BLOCK_M + offset > n0):
                pos = tl.sum(tl.where(offs_n[None, :] == tgt[:, None], t, 0.0), 1) * scale + bias
                hit = mask_m & (tgt >= n0) & (tgt < n0 + BLOCK_N) & (tgt < Bk)
                tl.store(POS + offs_m, pos, mask=hit)

            # Online row log-sum-exp (padding columns -> -inf; each tile has at least one real column).
            # Exponentials are taken against each row's own maximum in this tile (mt), not the running one:
            # every row of p then has a 1, so the column sums below stay far from underflow even when a
            # row's running maximum (e.g. its positive at logit scale 100) sits far above this tile.
            s_row = tl.where(mask_n[None, :], s2, float("-inf"))
            mt = tl.max(s_row, 1)
            m_new = tl.maximum(m_i, mt)
            p = tl.exp2((s_row - mt[:, None]) * L2E)
            l_i = l_i * tl.exp2((m_i - m_new) * L2E) + tl.sum(p, 1) * tl.exp2((mt - m_new) * L2E)
            m_i = m_new

            if COL_STATS:
                # Column sums from the row exponentials: exp(s - r) = p * exp(mt - r), r = the tile's largest
                # logit, so no second exp2 per logit. Exact to fp32 precision while each column's sum is
                # >= 2^-60 (its significant terms then stay normal floats); else the tile is redone directly.
                r = tl.max(tl.where(mask_m, mt, float("-inf")), 0)
                w = tl.where(mask_m, tl.exp2((mt - r) * L2E), 0.0)
                c_l = tl.sum(p * w[:, None], 0)
                if tl.min(tl.where(mask_n, c_l, 1.0), 0) >= 8.673617379884035e-19:  # 2^-60
                    c_m = tl.zeros([BLOCK_N], dtype=tl.float32) + r
                else:
                    s_col = tl.where(mask_m[:, None], s2, float("-inf"))
                    c_m = tl.max(s_col, 0)
                    c_l = tl.sum(tl.exp2((s_col - c_m[None, :]) * L2E), 0)
                cptr = pid_g.to(tl.int64) * Bk + offs_n
                # The previous row block's store of this slice may come from other threads of this program.
                tl.debug_barrier()
                o_m = tl.load(COL_M + cptr, mask=mask_n, other=float("-inf"))
                o_l = tl.load(COL_L + cptr, mask=mask_n, other=0.0)
                n_m = tl.maximum(o_m, c_m)
                n_l = o_l * tl.exp2((o_m - n_m) * L2E) + c_l * tl.exp2((c_m - n_m) * L2E)
                tl.store(COL_M + cptr, n_m, mask=mask_n)
                tl.store(COL_L + cptr, n_l, mask=mask_n)

        # (max, sum) partials, combined in float64 on the host side: the LSE is rounded once, at the end (a
        # rounded fp32 LSE at |lse| ~ 100 is a systematic per-row error in every backward probability).
        rptr = pid_h.to(tl.int64) * Bq + offs_m
        tl.store(ROW_PART + rptr, m_i, mask=mask_m)
        tl.store(ROW_PART + n_splits.to(tl.int64) * Bq + rptr, l_i, mask=mask_m)


clip_fwd_tuned = autotuned(
    clip_fwd_kernel, configs=fwd_configs(64),  # placeholder: prune_fwd builds the list for the call's D
    key=["B_BUCKET", "D", "COL_STATS", "PREC"], prune=prune_fwd,
    restore_value=["COL_M", "COL_L"],  # read-modify-write buffers: benchmarking runs must not accumulate
)


def reduce_lse(m: torch.Tensor, l: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Combine per-split (max, sum of exp below it) partials [S, N] (natural units) into the LSE [N], in float64
    so the fp32 result is rounded once (``dtype=torch.float64``: not rounded, for a chunked forward that merges
    several launches). Chunked over N: the float64 temporaries are bounded (``planner.reduce_lse_bytes``) at any B."""
    out = torch.empty(m.shape[1], device=m.device, dtype=dtype)
    for c0 in range(0, m.shape[1], planner.REDUCE_COLS):
        c1 = min(m.shape[1], c0 + planner.REDUCE_COLS)
        part = m[:, c0:c1].double() + torch.log(l[:, c0:c1].double())
        out[c0:c1] = torch.logsumexp(part, dim=0)
    return out


def _grid_split(n_rows: int, n_cols: int, target: int, col_stats: bool) -> tuple[int, int]:
    """(G row groups, H column splits). Sizes are in units of 128 (the largest tile) so no program is idle."""
    rows128 = triton.cdiv(n_rows, 128)
    cols128 = triton.cdiv(n_cols, 128)
    if col_stats:
        side = max(1, math.isqrt(target))
        return min(rows128, side), min(cols128, max(1, triton.cdiv(target, min(rows128, side))))
    return 0, min(cols128, max(1, triton.cdiv(target, rows128)))  # G is the row-block count (set per config)


def _clip_fwd_launch(q, k, scale, bias, offset: int, col_stats: bool, pos: torch.Tensor):
    """One forward launch over q [Bq, D] x k [Bk, D] (operands as given): float64 (row LSE, column LSE or None);
    writes the positive logits of the rows whose positive column lies in k into ``pos``."""
    Bq, D = q.shape
    Bk = k.shape[0]
    dev = q.device
    G, H = _grid_split(Bq, Bk, _target(dev), col_stats)
    row_part = torch.empty((2, H, Bq), device=dev, dtype=torch.float32)
    if col_stats:
        col_m = torch.full((G, Bk), float("-inf"), device=dev, dtype=torch.float32)
        col_l = torch.zeros((G, Bk), device=dev, dtype=torch.float32)
    else:
        col_m = col_l = pos  # unused
    args = (q, k, scale, bias if bias is not None else scale, row_part, col_m, col_l, pos, Bq, Bk, int(offset),
            max(G, 1), H, size_bucket(max(Bq, Bk)))
    meta = dict(D=D, HAS_BIAS=bias is not None, COL_STATS=col_stats, PREC=dot_precision(q.dtype),
                FIXED_ORDER=fixed_order_logits(dev))

    def grid(META):
        return (G if col_stats else triton.cdiv(Bq, META["BLOCK_M"]), H)

    launch(clip_fwd_kernel, clip_fwd_tuned, grid, args, meta, INTERPRET_FWD_CONFIG, dev)
    lse_row = reduce_lse(row_part[0], row_part[1], torch.float64)
    lse_col = reduce_lse(col_m, col_l, torch.float64) if col_stats else None
    return lse_row, lse_col


def _clip_fwd(q, k, scale, bias, offset: int, col_stats: bool, op_dtype: torch.dtype | None = None,
              chunks: tuple[int, int] | None = None):
    """fp32 (row LSE, column LSE or None, positive logits). ``op_dtype``: compute dtype when it differs from the
    features' (fp32 features, bf16/fp16 products): q and k are cast in (row x column) chunks that fit the memory
    budget (``fwd_chunks``), each chunk pair is one launch, and the LSEs are merged in float64."""
    Bq, D = q.shape
    Bk = k.shape[0]
    op = op_dtype or q.dtype
    if chunks is None:
        chunks = fwd_chunks(Bq, Bk, D, op.itemsize, op != q.dtype)
    pos = torch.empty(Bq, device=q.device, dtype=torch.float32)
    lse_row = torch.full((Bq,), float("-inf"), device=q.device, dtype=torch.float64)
    lse_col = torch.full((Bk,), float("-inf"), device=q.device, dtype=torch.float64) if col_stats else None
    for r0, q_r, c0, k_c in chunk_pairs(q, k, chunks, op):
        rows, cols = q_r.shape[0], k_c.shape[0]
        lr, lc = _clip_fwd_launch(q_r, k_c, scale, bias, offset + r0 - c0, col_stats, pos[r0:r0 + rows])
        torch.logaddexp(lse_row[r0:r0 + rows], lr, out=lse_row[r0:r0 + rows])  # exact for one chunk: -inf + x
        if col_stats:
            torch.logaddexp(lse_col[c0:c0 + cols], lc, out=lse_col[c0:c0 + cols])
    return lse_row.to(torch.float32), (lse_col.to(torch.float32) if col_stats else None), pos


def _target(dev):
    return target_programs(dev)


def _scalar_grads(ds, db, scale, bias):
    dscale = ds.reshape(scale.shape).to(torch.float32)
    dbias = db.reshape(bias.shape).to(torch.float32) if bias is not None else None
    return dscale, dbias


def clip_sym_fwd(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                 compute: torch.dtype | None = None):
    """Symmetric CLIP loss with positives on the diagonal (q, k both [B, D]).

    Returns ``(loss, lse_row, lse_col)`` (fp32): ``loss = 0.5 * (mean_i(lse_row_i - S_ii) + mean_j(lse_col_j -
    S_jj))``, ``lse_row_i = logsumexp_j S_ij``, ``lse_col_j = logsumexp_i S_ij``. ``compute``: the products'
    dtype when it differs from the features' (fp32 features, bf16/fp16 tensor-core products; cast per chunk).
    """
    q, k, scale32, bias32 = check_loss_inputs(q, k, scale, bias)
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"symmetric CLIP loss needs as many rows in q ({q.shape[0]}) as in k ({k.shape[0]})")
    lse_row, lse_col, pos = _clip_fwd(q, k, scale32, bias32, 0, col_stats=True, op_dtype=compute_operand(q, compute))
    loss = 0.5 * ((lse_row - pos).mean() + (lse_col - pos).mean())
    return loss, lse_row, lse_col


def clip_sym_bwd(q, k, scale, bias, lse_row, lse_col, grad_loss, need_q: bool = True, need_k: bool = True,
                 compute: torch.dtype | None = None):
    """Gradients of ``clip_sym_fwd``'s loss: ``(dq, dk, dscale, dbias_or_None)``.

    ``G = (0.5 * (P_row + P_col) - I) / B * grad_loss`` with ``P_row = exp(S - lse_row)``, ``P_col = exp(S -
    lse_col)``; ``dq = scale G k``, ``dk = scale G^T q``, ``dscale = sum G * (q k^T)``, ``dbias = sum G``.
    """
    q, k, scale32, bias32 = check_loss_inputs(q, k, scale, bias)
    B = q.shape[0]
    if k.shape[0] != B:
        raise ValueError(f"symmetric CLIP loss needs as many rows in q ({B}) as in k ({k.shape[0]})")
    lse_row = check_vector(lse_row, "lse_row", B, q.device)
    lse_col = check_vector(lse_col, "lse_col", B, q.device)
    g = grad_loss_tensor(grad_loss, q.device)
    dq, dk, ds, db = pairwise_bwd_both(q, k, scale32, bias32, lse_row, lse_col, g, offset=0, inv_n=1.0 / B,
                                       mode=MODE_CLIP_SYM, need_q=need_q, need_k=need_k,
                                       op_dtype=compute_operand(q, compute))
    dscale, dbias = _scalar_grads(ds, db, scale, bias)
    return dq, dk, dscale, dbias


def _check_offset(offset, Bq, Bk):
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise TypeError(f"offset must be an int, got {type(offset).__name__}")
    if offset < 0 or offset + Bq > Bk:
        raise ValueError(f"offset={offset} puts positives outside k: need 0 <= offset and offset + Bq ({Bq}) <= "
                         f"Bk ({Bk})")


def clip_dir_fwd(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, offset: int,
                 compute: torch.dtype | None = None):
    """One direction of the CLIP loss: rows q [Bq, D] against columns k [Bk, D], positive of row i at column
    ``i + offset`` (multi-GPU local loss: offset = rank * Bq). Returns ``(loss, lse)``, ``loss = mean_i(lse_i -
    S_{i, i+offset})``."""
    q, k, scale32, bias32 = check_loss_inputs(q, k, scale, bias)
    _check_offset(offset, q.shape[0], k.shape[0])
    lse, _, pos = _clip_fwd(q, k, scale32, bias32, offset, col_stats=False, op_dtype=compute_operand(q, compute))
    return (lse - pos).mean(), lse


def clip_dir_bwd(q, k, scale, bias, lse, offset: int, grad_loss, need_q: bool = True, need_k: bool = True,
                 compute: torch.dtype | None = None):
    """Gradients of ``clip_dir_fwd``'s loss: ``(dq, dk, dscale, dbias_or_None)`` with ``G = (P - onehot) / Bq *
    grad_loss``."""
    q, k, scale32, bias32 = check_loss_inputs(q, k, scale, bias)
    Bq, Bk = q.shape[0], k.shape[0]
    _check_offset(offset, Bq, Bk)
    lse = check_vector(lse, "lse", Bq, q.device)
    g = grad_loss_tensor(grad_loss, q.device)
    dq, dk, ds, db = pairwise_bwd_both(q, k, scale32, bias32, lse, None, g, offset=offset, inv_n=1.0 / Bq,
                                       mode=MODE_CLIP_DIR, need_q=need_q, need_k=need_k,
                                       op_dtype=compute_operand(q, compute))
    dscale, dbias = _scalar_grads(ds, db, scale, bias)
    return dq, dk, dscale, dbias


def flops(Bq: int, Bk: int, D: int, backward: bool = True, symmetric: bool = True) -> int:
    """Reported FLOPs: forward 2*Bq*Bk*D, forward + backward 8*Bq*Bk*D (symmetric: 8*B^2*D). The two
    directions of the multi-GPU loss are two such problems (``symmetric=False`` counts one)."""
    return pairwise_flops(Bq, Bk, D, backward)
