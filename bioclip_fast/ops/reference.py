"""Pure-torch chunked reference of the six loss primitives (the Triton kernels and the C++ path implement the same).

Readable on purpose: the tests compare every backend against these functions, and they are the fallback where no
kernel is available. Memory is O(chunk·B_k) (+ one [B, D] accumulator in the symmetric backward) — rows of ``q``
are processed ``chunk`` at a time and the B×B logits matrix never exists — and everything accumulates in fp32
whatever the input dtype (float64 inputs: in float64).

Conventions shared by all backends (see DESIGN.md, "Fused CLIP loss: the math"):
  ``S = scale·q@kᵀ + bias``; ``scale`` is a fp32 tensor of shape [] or [1] (already exp'd, as open_clip passes it),
  ``bias`` the same or None. Losses and LSEs are fp32 scalars/vectors, ``dq``/``dk`` come back in the input dtype,
  ``dscale``/``dbias`` in fp32 shaped like ``scale``/``bias``.

  clip_sym   q, k both [B, D]; positives on the diagonal;
             loss = ½(mean_i(lse_row_i − S_ii) + mean_j(lse_col_j − S_jj)).
  clip_dir   q [Bq, D] rows, k [Bk, D] columns; positive of row i is column i+offset;
             loss = mean_i(lse_i − S_{i,i+offset}).
  siglip     loss = −(1/Bq) Σ_ij logsigmoid(z_ij·S_ij), z_ij = +1 iff j == i+offset (columns ≥ Bk do not exist,
             so an offset ≥ Bk means all pairs are negatives).

Backward recomputes S chunk by chunk. With ``G = ∂loss/∂S`` (never stored whole):
  dq = scale·G@k,  dk = scale·Gᵀ@q,  dscale = Σ G∘(q@kᵀ),  dbias = Σ G.
The "−δ" part of G (the positives) is subtracted inside each chunk before the products, as the kernels do: folding
it in afterwards would cancel two large terms and lose accuracy when the positives dominate.

``dscale`` is computed cancellation-free (every backend does the same): each softmax direction's G sums to zero along
its row (column), so ``Σ G_ij·t_ij = Σ G_ij·(t_ij − c_i)`` with ``c_i`` the row's positive dot product. On
near-duplicate batches (many identical captions, logit scale 100) every ``t_ij ≈ 1`` and the plain sum cancels
catastrophically; the centred terms are small. SigLIP's G rows do not sum to zero: ``Σ_j G_ij·t_ij = Σ_j G_ij·(t_ij −
c_i) + c_i·Σ_j G_ij``. CLIP's ``dbias`` is exactly 0 (a constant shift of all logits leaves both softmaxes unchanged)
and is returned as such, not as rounding noise.
"""
from __future__ import annotations

import torch

# Elements of one fp32 S chunk (32 MB). Large enough that each chunk is a efficient GEMM, small enough that
# B = 65,536 stays far below the 17 GB a dense B×B fp32 matrix would need.
CHUNK_ELEMENTS = 1 << 23


def _chunk_rows(n_cols: int, chunk: int | None) -> int:
    if chunk is not None:
        return max(1, int(chunk))
    return max(16, CHUNK_ELEMENTS // max(1, n_cols))


def _work(x: torch.Tensor) -> torch.Tensor:
    """The working dtype: float64 stays float64 (open_clip's ClipLoss accepts it), everything else runs in fp32."""
    return x if x.dtype == torch.float64 else x.float()


def _scalar(t: torch.Tensor | None, like: torch.Tensor | None = None) -> torch.Tensor | None:
    if t is None:
        return None
    return t.reshape(()).to(torch.float64 if like is not None and like.dtype == torch.float64 else torch.float32)


def _logits(qc: torch.Tensor, kt: torch.Tensor, s: torch.Tensor, b: torch.Tensor | None):
    """Return (dot, S) for one chunk: dot = qc@kᵀ (fp32), S = s·dot + b."""
    dot = qc @ kt
    S = dot * s
    if b is not None:
        S += b
    return dot, S


def _positive_rows(n_rows: int, n_cols: int, offset: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column indices of the positives (j = i + offset) that exist."""
    i = torch.arange(n_rows, device=device)
    j = i + offset
    keep = (j >= 0) & (j < n_cols)
    return i[keep], j[keep]


def _sub_positives(P: torch.Tensor, i0: int, offset: int, n_cols: int, delta: float) -> None:
    """P[r, i0 + r + offset] −= delta for the rows of this chunk whose positive column exists."""
    r = torch.arange(P.shape[0], device=P.device)
    j = r + i0 + offset
    keep = (j >= 0) & (j < n_cols)
    P[r[keep], j[keep]] -= delta


def positive_dots(qf: torch.Tensor, kf: torch.Tensor, offset: int) -> torch.Tensor:
    """Centres ``c_i = <q_i, k_{i+offset}>`` (fp32) for rows whose positive exists, 0 elsewhere (SigLIP)."""
    Bq, Bk = qf.shape[0], kf.shape[0]
    c = torch.zeros(Bq, dtype=qf.dtype, device=qf.device)
    lo, hi = max(0, -offset), min(Bq, Bk - offset)
    if hi > lo:
        c[lo:hi] = (qf[lo:hi] * kf[lo + offset:hi + offset]).sum(1)
    return c


def _finish_grads(q, k, scale, bias, dq, dk, dscale, dbias, need_q=True, need_k=True):
    dscale = dscale.reshape(scale.shape).to(scale.dtype)
    dbias = None if bias is None else dbias.reshape(bias.shape).to(bias.dtype)
    return (dq.to(q.dtype) if need_q else None), (dk.to(k.dtype) if need_k else None), dscale, dbias


# --------------------------------------------------------------------------------------------------- CLIP (sym)
def clip_sym_fwd(q, k, scale, bias, *, chunk: int | None = None):
    """Symmetric InfoNCE over a square batch. Returns (loss, lse_row [B], lse_col [B]), all fp32."""
    B = q.shape[0]
    s, b = _scalar(scale, q), _scalar(bias, q)
    qf, kf = _work(q), _work(k)
    kt = kf.t()
    c = _chunk_rows(B, chunk)
    lse_row = torch.empty(B, dtype=qf.dtype, device=q.device)
    lse_col = torch.full((B,), float("-inf"), dtype=qf.dtype, device=q.device)
    for i0 in range(0, B, c):
        _, S = _logits(qf[i0:i0 + c], kt, s, b)
        lse_row[i0:i0 + c] = torch.logsumexp(S, dim=1)
        lse_col = torch.logaddexp(lse_col, torch.logsumexp(S, dim=0))
    diag = (qf * kf).sum(1) * s
    if b is not None:
        diag = diag + b
    loss = 0.5 * ((lse_row - diag).mean() + (lse_col - diag).mean())
    return loss, lse_row, lse_col


def clip_sym_bwd(q, k, scale, bias, lse_row, lse_col, grad_loss, *, chunk: int | None = None, need_q: bool = True,
                 need_k: bool = True):
    """Gradients of ``clip_sym_fwd``'s loss. Returns (dq, dk, dscale, dbias or None)."""
    B = q.shape[0]
    s, b = _scalar(scale, q), _scalar(bias, q)
    g = _scalar(grad_loss, q)
    qf, kf = _work(q), _work(k)
    kt = kf.t()
    c = _chunk_rows(B, chunk)
    dq = torch.empty_like(qf)
    dk = torch.zeros_like(kf)
    ds = torch.zeros((), dtype=qf.dtype, device=q.device)
    db = torch.zeros((), dtype=qf.dtype, device=q.device)
    cen = positive_dots(qf, kf, 0)
    col_sum = torch.zeros(B, dtype=qf.dtype, device=q.device)
    dk_col = torch.zeros_like(kf) if need_k else None
    for i0 in range(0, B, c):
        qc = qf[i0:i0 + c]
        dot, S = _logits(qc, kt, s, b)
        # softmax over the row + softmax over the column; the ½·g/B factor is applied once at the end.
        Pr = torch.exp(S - lse_row[i0:i0 + c, None])
        Pr /= Pr.sum(1, keepdim=True)  # exact row softmax whatever the rounding of the stored LSE (see clip_dir_bwd)
        _sub_positives(Pr, i0, 0, B, 1.0)
        Pc = torch.exp(S - lse_col[None, :])
        col_sum += Pc.sum(0)
        if need_k:  # the column softmax's part of dk, renormalized exactly once all rows are in (below)
            dk_col.addmm_(Pc.t(), qc)
        _sub_positives(Pc, i0, 0, B, 1.0)
        # centred dscale: rows of Pr and columns of Pc sum to zero
        ds += (Pr * (dot - cen[i0:i0 + c, None])).sum() + (Pc * (dot - cen[None, :])).sum()
        if need_q:
            dq[i0:i0 + c] = (Pr + Pc) @ kf
        if need_k:
            dk.addmm_(Pr.t(), qc)
    if need_k:
        dk += dk_col / col_sum[:, None] - qf
    coef = 0.5 * g / B
    return _finish_grads(q, k, scale, bias, (coef * s) * dq, (coef * s) * dk, coef * ds, coef * db,
                         need_q, need_k)


# --------------------------------------------------------------------------------------------------- CLIP (dir)
def clip_dir_fwd(q, k, scale, bias, offset: int, *, chunk: int | None = None):
    """One direction: rows q vs columns k, positive of row i at column i+offset. Returns (loss, lse [Bq])."""
    Bq, Bk = q.shape[0], k.shape[0]
    s, b = _scalar(scale, q), _scalar(bias, q)
    qf, kf = _work(q), _work(k)
    kt = kf.t()
    c = _chunk_rows(Bk, chunk)
    lse = torch.empty(Bq, dtype=qf.dtype, device=q.device)
    for i0 in range(0, Bq, c):
        _, S = _logits(qf[i0:i0 + c], kt, s, b)
        lse[i0:i0 + c] = torch.logsumexp(S, dim=1)
    pos = (qf * kf[offset:offset + Bq]).sum(1) * s
    if b is not None:
        pos = pos + b
    return (lse - pos).mean(), lse


def clip_dir_bwd(q, k, scale, bias, lse, offset: int, grad_loss, *, chunk: int | None = None, need_q: bool = True,
                 need_k: bool = True):
    """Gradients of ``clip_dir_fwd``'s loss. Returns (dq, dk, dscale, dbias or None)."""
    Bq, Bk = q.shape[0], k.shape[0]
    s, b = _scalar(scale, q), _scalar(bias, q)
    g = _scalar(grad_loss, q)
    qf, kf = _work(q), _work(k)
    kt = kf.t()
    c = _chunk_rows(Bk, chunk)
    dq = torch.empty_like(qf)
    dk = torch.zeros_like(kf)
    ds = torch.zeros((), dtype=qf.dtype, device=q.device)
    db = torch.zeros((), dtype=qf.dtype, device=q.device)
    cen = positive_dots(qf, kf, offset)
    for i0 in range(0, Bq, c):
        qc = qf[i0:i0 + c]
        dot, S = _logits(qc, kt, s, b)
        P = torch.exp(S - lse[i0:i0 + c, None])
        # Renormalize each row: the stored LSE is rounded (fp32 at |lse| ~ 100: up to 4e-6 relative, the same for
        # the whole row), and on near-duplicate columns G @ k amplifies that systematic error.
        P /= P.sum(1, keepdim=True)
        _sub_positives(P, i0, offset, Bk, 1.0)
        ds += (P * (dot - cen[i0:i0 + c, None])).sum()  # centred: rows of P sum to zero
        if need_q:
            dq[i0:i0 + c] = P @ kf
        if need_k:
            dk.addmm_(P.t(), qc)
    coef = g / Bq
    return _finish_grads(q, k, scale, bias, (coef * s) * dq, (coef * s) * dk, coef * ds, coef * db,
                         need_q, need_k)


# --------------------------------------------------------------------------------------------------- SigLIP
def siglip_fwd(q, k, scale, bias, offset: int, *, chunk: int | None = None):
    """Sigmoid loss −(1/Bq) Σ_ij logsigmoid(z_ij·S_ij). Returns the fp32 loss.

    Written as softplus(S) over all pairs minus S at the positives (−logsigmoid(S) = softplus(S) − S), so the
    chunk loop needs no labels.
    """
    Bq, Bk = q.shape[0], k.shape[0]
    s, b = _scalar(scale, q), _scalar(bias, q)
    qf, kf = _work(q), _work(k)
    kt = kf.t()
    c = _chunk_rows(Bk, chunk)
    total = torch.zeros((), dtype=qf.dtype, device=q.device)
    for i0 in range(0, Bq, c):
        _, S = _logits(qf[i0:i0 + c], kt, s, b)
        total += torch.nn.functional.softplus(S).sum()
    ip, jp = _positive_rows(Bq, Bk, offset, q.device)
    if ip.numel():
        pos = (qf[ip] * kf[jp]).sum(1) * s
        if b is not None:
            pos = pos + b
        total = total - pos.sum()
    return total / Bq


def siglip_bwd(q, k, scale, bias, offset: int, grad_loss, *, chunk: int | None = None, need_q: bool = True,
                 need_k: bool = True):
    """Gradients of ``siglip_fwd``'s loss: G = (g/Bq)·(σ(S) − δ). Returns (dq, dk, dscale, dbias or None)."""
    Bq, Bk = q.shape[0], k.shape[0]
    s, b = _scalar(scale, q), _scalar(bias, q)
    g = _scalar(grad_loss, q)
    qf, kf = _work(q), _work(k)
    kt = kf.t()
    c = _chunk_rows(Bk, chunk)
    dq = torch.empty_like(qf)
    dk = torch.zeros_like(kf)
    ds = torch.zeros((), dtype=qf.dtype, device=q.device)
    db = torch.zeros((), dtype=qf.dtype, device=q.device)
    cen = positive_dots(qf, kf, offset)
    for i0 in range(0, Bq, c):
        qc = qf[i0:i0 + c]
        dot, S = _logits(qc, kt, s, b)
        P = torch.sigmoid_(S)
        _sub_positives(P, i0, offset, Bk, 1.0)
        rows = P.sum(1)
        ds += (P * (dot - cen[i0:i0 + c, None])).sum() + (cen[i0:i0 + c] * rows).sum()
        db += rows.sum()
        if need_q:
            dq[i0:i0 + c] = P @ kf
        if need_k:
            dk.addmm_(P.t(), qc)
    coef = g / Bq
    return _finish_grads(q, k, scale, bias, (coef * s) * dq, (coef * s) * dk, coef * ds, coef * db,
                         need_q, need_k)
