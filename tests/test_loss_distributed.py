"""Two-process (gloo) parity with open_clip's distributed losses, per-rank gradients included.

Every configuration runs in the same pair of spawned processes (start-up dominates the cost): ClipLoss with
local_loss x gather_with_grad (with and without logit_bias), and SigLipLoss with each of open_clip's dist_impl
modes ('bidir', 'shift', 'reduce', 'gather'), all of which our all-gather formulation must reproduce.
"""
from __future__ import annotations

import os
import socket
import traceback

import pytest
import torch
import torch.multiprocessing as mp

WORLD = 2
B_LOCAL, D = 13, 24  # odd sizes: offsets rank*B are not tile multiples


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _leaves(img, txt, scale, bias):
    out = [img.clone().requires_grad_(), txt.clone().requires_grad_(), scale.clone().requires_grad_()]
    out.append(None if bias is None else bias.clone().requires_grad_())
    return out


def _run(loss_fn, img, txt, scale, bias):
    leaves = _leaves(img, txt, scale, bias)
    loss = loss_fn(*leaves)
    loss.backward()
    return [loss.detach()] + [t.grad for t in leaves if t is not None]


def _worker(rank, port, backends, errors):
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
        torch.set_num_threads(1)
        from open_clip.loss import ClipLoss, SigLipLoss

        from bioclip_fast import FusedClipLoss, FusedSigLipLoss

        g = torch.Generator().manual_seed(1234)  # same global batch on every rank
        img_all = torch.nn.functional.normalize(torch.randn(WORLD * B_LOCAL, D, generator=g), dim=-1)
        txt_all = torch.nn.functional.normalize(torch.randn(WORLD * B_LOCAL, D, generator=g) + 0.3 * img_all, dim=-1)
        sl = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        img, txt = img_all[sl].contiguous(), txt_all[sl].contiguous()
        scale = torch.tensor([12.0])

        cases = []
        for backend in backends:
            for local_loss in (False, True):
                for gather_with_grad in (False, True):
                    for bias in (None, torch.tensor([-0.7])):
                        kw = dict(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank,
                                  world_size=WORLD)
                        cases.append((f"{backend} clip {kw} bias={bias is not None}", ClipLoss(**kw),
                                      FusedClipLoss(**kw, backend=backend), bias))
            for impl in ("bidir", "shift", "reduce", "gather"):
                kw = dict(rank=rank, world_size=WORLD, dist_impl=impl)
                cases.append((f"{backend} siglip {impl}", SigLipLoss(**kw), FusedSigLipLoss(**kw, backend=backend),
                              torch.tensor([-8.0])))
        for name, ref_mod, our_mod, bias in cases:
            want = _run(ref_mod, img, txt, scale, bias)
            got = _run(our_mod, img, txt, scale, bias)
            for what, a, b in zip(["loss", "d_image", "d_text", "d_scale", "d_bias"], got, want):
                torch.testing.assert_close(
                    a.reshape(b.shape), b, rtol=2e-5, atol=2e-6, msg=lambda m: f"rank {rank} {name} {what}: {m}"
                )
        torch.distributed.barrier()
    except Exception:  # noqa: BLE001 - reported to the parent process
        errors.put(traceback.format_exc())
        raise
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_two_rank_parity_with_open_clip():
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    try:
        mp.start_processes(_worker, args=(_free_port(), ("cpp", "torch"), errors), nprocs=WORLD, join=True,
                           start_method="spawn")
    except Exception as exc:  # noqa: BLE001
        details = errors.get() if not errors.empty() else ""
        pytest.fail(f"distributed worker failed: {exc}\n{details}")
