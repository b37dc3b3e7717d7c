"""Pure-torch chunked reference of the six loss primitives (the Triton kernels and the C++ path implement the same).

Readable on purpose: the tests compare every backend against these functions, and they are the fallback where no
kernel is available. Memory is O(chunk·B_k) — rows of ``q`` are processed ``chunk`` at a time and the B×B logits
matrix never exists — and everything accumulates in fp32 whatever the input dtype.

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


def _scalar(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.reshape(()).float()


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


def _finish_grads(q, k, scale, bias, dq, dk, dscale, dbias):
    dscale = dscale.reshape(scale.shape)
    dbias = None if bias is None else dbias.reshape(bias.shape)
    return dq.to(q.dtype), dk.to(k.dtype), dscale, dbias


# --------------------------------------------------------------------------------------------------- CLIP (sym)
def clip_sym_fwd(q, k, scale, bias, *, chunk: int | None = None):
    """Symmetric InfoNCE over a square batch. Returns (loss, lse_row [B], lse_col [B]), all fp32."""
    B = q.shape[0]
    s, b = _scalar(scale), _scalar(bias)
    qf, kf = q.float(), k.float()
    kt = kf.t()
    c = _chunk_rows(B, chunk)
    lse_row = torch.empty(B, dtype=torch.float32, device=q.device)
    lse_col = torch.full((B,), float("-inf"), dtype=torch.float32, device=q.device)
    for i0 in range(0, B, c):
        _, S = _logits(qf[i0:i0 + c], kt, s, b)
        lse_row[i0:i0 + c] = torch.logsumexp(S, dim=1)
        lse_col = torch.logaddexp(lse_col, torch.logsumexp(S, dim=0))
    diag = (qf * kf).sum(1) * s
    if b is not None:
        diag = diag + b
    loss = 0.5 * ((lse_row - diag).mean() + (lse_col - diag).mean())
    return loss, lse_row, lse_col


def clip_sym_bwd(q, k, scale, bias, lse_row, lse_col, grad_loss, *, chunk: int | None = None):
    """Gradients of ``clip_sym_fwd``'s loss. Returns (dq, dk, dscale, dbias or None)."""
    B = q.shape[0]
    s, b = _scalar(scale), _scalar(bias)
    g = grad_loss.reshape(()).float()
    qf, kf = q.float(), k.float()
    kt = kf.t()
    c = _chunk_rows(B, chunk)
    dq = torch.empty_like(qf)
    dk = torch.zeros_like(kf)
    ds = torch.zeros((), dtype=torch.float32, device=q.device)
    db = torch.zeros((), dtype=torch.float32, device=q.device)
    for i0 in range(0, B, c):
        qc = qf[i0:i0 + c]
        dot, S = _logits(qc, kt, s, b)
        # softmax over the row + softmax over the column; the ½·g/B factor is applied once at the end.
        P = torch.exp(S - lse_row[i0:i0 + c, None])
        P += torch.exp(S - lse_col[None, :])
        _sub_positives(P, i0, 0, B, 2.0)  # −δ in each direction
        ds += (P * dot).sum()
        db += P.sum()
        dq[i0:i0 + c] = P @ kf
        dk.addmm_(P.t(), qc)
    coef = 0.5 * g / B
    return _finish_grads(q, k, scale, bias, (coef * s) * dq, (coef * s) * dk, coef * ds, coef * db)


# --------------------------------------------------------------------------------------------------- CLIP (dir)
def clip_dir_fwd(q, k, scale, bias, offset: int, *, chunk: int | None = None):
    """One direction: rows q vs columns k, positive of row i at column i+offset. Returns (loss, lse [Bq])."""
    Bq, Bk = q.shape[0], k.shape[0]
    s, b = _scalar(scale), _scalar(bias)
    qf, kf = q.float(), k.float()
    kt = kf.t()
    c = _chunk_rows(Bk, chunk)
    lse = torch.empty(Bq, dtype=torch.float32, device=q.device)
    for i0 in range(0, Bq, c):
        _, S = _logits(qf[i0:i0 + c], kt, s, b)
        lse[i0:i0 + c] = torch.logsumexp(S, dim=1)
    pos = (qf * kf[offset:offset + Bq]).sum(1) * s
    if b is not None:
        pos = pos + b
    return (lse - pos).mean(), lse


def clip_dir_bwd(q, k, scale, bias, lse, offset: int, grad_loss, *, chunk: int | None = None):
    """Gradients of ``clip_dir_fwd``'s loss. Returns (dq, dk, dscale, dbias or None)."""
    Bq, Bk = q.shape[0], k.shape[0]
    s, b = _scalar(scale), _scalar(bias)
    g = grad_loss.reshape(()).float()
    qf, kf = q.float(), k.float()
    kt = kf.t()
    c = _chunk_rows(Bk, chunk)
    dq = torch.empty_like(qf)
    dk = torch.zeros_like(kf)
    ds = torch.zeros((), dtype=torch.float32, device=q.device)
    db = torch.zeros((), dtype=torch.float32, device=q.device)
    for i0 in range(0, Bq, c):
        qc = qf[i0:i0 + c]
        dot, S = _logits(qc, kt, s, b)
        P = torch.exp(S - lse[i0:i0 + c, None])
        _sub_positives(P, i0, offset, Bk, 1.0)
        ds += (P * dot).sum()
        db += P.sum()
        dq[i0:i0 + c] = P @ kf
        dk.addmm_(P.t(), qc)
    coef = g / Bq
    return _finish_grads(q, k, scale, bias, (coef * s) * dq, (coef * s) * dk, coef * ds, coef * db)


# --------------------------------------------------------------------------------------------------- SigLIP
def siglip_fwd(q, k, scale, bias, offset: int, *, chunk: int | None = None):
    """Sigmoid loss −(1/Bq) Σ_ij logsigmoid(z_ij·S_ij). Returns the fp32 loss.

    Written as softplus(S) over all pairs minus S at the positives (−logsigmoid(S) = softplus(S) − S), so the
    chunk loop needs no labels.
    """
    Bq, Bk = q.shape[0], k.shape[0]
    s, b = _scalar(scale), _scalar(bias)
    qf, kf = q.float(), k.float()
    kt = kf.t()
    c = _chunk_rows(Bk, chunk)
    total = torch.zeros((), dtype=torch.float32, device=q.device)
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


def siglip_bwd(q, k, scale, bias, offset: int, grad_loss, *, chunk: int | None = None):
    """Gradients of ``siglip_fwd``'s loss: G = (g/Bq)·(σ(S) − δ). Returns (dq, dk, dscale, dbias or None)."""
    Bq, Bk = q.shape[0], k.shape[0]
    s, b = _scalar(scale), _scalar(bias)
    g = grad_loss.reshape(()).float()
    qf, kf = q.float(), k.float()
    kt = kf.t()
    c = _chunk_rows(Bk, chunk)
    dq = torch.empty_like(qf)
    dk = torch.zeros_like(kf)
    ds = torch.zeros((), dtype=torch.float32, device=q.device)
    db = torch.zeros((), dtype=torch.float32, device=q.device)
    for i0 in range(0, Bq, c):
        qc = qf[i0:i0 + c]
        dot, S = _logits(qc, kt, s, b)
        P = torch.sigmoid_(S)
        _sub_positives(P, i0, offset, Bk, 1.0)
        ds += (P * dot).sum()
        db += P.sum()
        dq[i0:i0 + c] = P @ kf
        dk.addmm_(P.t(), qc)
    coef = g / Bq
    return _finish_grads(q, k, scale, bias, (coef * s) * dq, (coef * s) * dk, coef * ds, coef * db)
