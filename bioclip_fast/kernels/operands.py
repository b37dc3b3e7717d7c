"""Host-side operands of the launchers: the (row chunk, column chunk) casts the chunked forward and the gemm2d
backward multiply (``chunk_pairs``), and the centres of the scale gradient (``positive_dots``)."""
from __future__ import annotations

import torch

from bioclip_fast.kernels.planner import CENTRE_ROWS, clamp_chunks


def positive_dots(q: torch.Tensor, k: torch.Tensor, offset: int, rows: int = CENTRE_ROWS) -> torch.Tensor:
    """Centres of the scale gradient: ``c_i = <q_i, k_{i+offset}>`` (fp32) where row i's positive exists, else 0.

    Any centre is exact in exact arithmetic (see ``backward_fused.pairwise_bwd_kernel``); the positive's dot makes
    the centred terms small on near-duplicate batches. Chunked so the temporaries stay a few MB at any B.
    """
    Bq, Bk = q.shape[0], k.shape[0]
    c = torch.zeros(Bq, device=q.device, dtype=torch.float32)
    lo, hi = max(0, -offset), min(Bq, Bk - offset)
    for r0 in range(lo, hi, rows):
        r1 = min(hi, r0 + rows)
        c[r0:r1] = (q[r0:r1].float() * k[r0 + offset:r1 + offset].float()).sum(1)
    return c


def chunk_pairs(q: torch.Tensor, k: torch.Tensor, chunks: tuple[int, int], op: torch.dtype):
    """``(r0, q_r, c0, k_c)`` for every (row chunk, column chunk) pair, the chunks cast to ``op`` (views when the
    features already are ``op``). Row i of ``q_r`` is global row r0 + i, so a positive at global column i + offset
    is local column i + (offset + r0 - c0) of ``k_c``.

    The casts go into one row buffer and one column buffer, reused (a single column chunk is cast once): at most
    one cast row chunk and one cast column chunk exist at any time, as ``fwd_extra_bytes`` / ``gemm2d_extra_bytes``
    plan (``q[...].to(op)`` per chunk would hold the previous chunk, still referenced by the caller's loop
    variables, while casting the next: twice the plan). The yielded chunks are valid until the next pair."""
    Bq, Bk = q.shape[0], k.shape[0]
    rows, cols = clamp_chunks(chunks, Bq, Bk)
    if op == q.dtype and op == k.dtype:
        for r0 in range(0, Bq, rows):
            for c0 in range(0, Bk, cols):
                yield r0, q[r0:r0 + rows], c0, k[c0:c0 + cols]
        return
    k_whole = k.to(op) if cols >= Bk else None
    q_buf = q.to(op) if rows >= Bq else torch.empty((rows, q.shape[1]), device=q.device, dtype=op)
    k_buf = None if k_whole is not None else torch.empty((cols, k.shape[1]), device=k.device, dtype=op)
    for r0 in range(0, Bq, rows):
        if rows >= Bq:
            q_r = q_buf
        else:
            q_r = q_buf[:min(rows, Bq - r0)]
            q_r.copy_(q[r0:r0 + rows])
        for c0 in range(0, Bk, cols):
            if k_whole is not None:
                k_c = k_whole
            else:
                k_c = k_buf[:min(cols, Bk - c0)]
                k_c.copy_(k[c0:c0 + cols])
            yield r0, q_r, c0, k_c
