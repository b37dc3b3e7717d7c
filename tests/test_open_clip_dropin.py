"""`bioclip_fast.integrations.open_clip.patch()` makes open_clip build our losses, and real open_clip training
(``open_clip_train.train.train_one_epoch``) takes the same steps with them as with open_clip's own losses."""
from __future__ import annotations

import argparse

import pytest
import torch

import open_clip
import open_clip.factory
from open_clip.loss import ClipLoss, SigLipLoss

from bioclip_fast import FusedClipLoss, FusedSigLipLoss
from bioclip_fast.integrations import open_clip as integration

from tests._tolerances import assert_normwise_close


def _args(**kw):
    base = dict(
        model="bioclip-micro", distill=False, siglip=False, local_loss=False, gather_with_grad=False, rank=0,
        world_size=1, horovod=False, loss_dist_impl=None, device="cpu", precision="fp32", accum_freq=1,
        skip_scheduler=True, grad_clip_norm=None, log_every_n_steps=1000, batch_size=8, wandb=False,
        local_rank=0, coca_caption_loss_weight=2.0, coca_contrastive_loss_weight=1.0,
    )
    base.update(kw)
    return argparse.Namespace(**base)


@pytest.fixture(autouse=True)
def _always_unpatch():
    yield
    integration.unpatch()


def test_patch_swaps_create_loss_and_unpatch_restores():
    original = open_clip.create_loss
    integration.patch()
    assert open_clip.create_loss is not original and open_clip.factory.create_loss is open_clip.create_loss
    loss = open_clip.create_loss(_args(local_loss=True, gather_with_grad=True, rank=1, world_size=4))
    assert isinstance(loss, FusedClipLoss)
    assert (loss.local_loss, loss.gather_with_grad, loss.rank, loss.world_size) == (True, True, 1, 4)
    sig = open_clip.create_loss(_args(siglip=True, loss_dist_impl="shift", rank=2, world_size=3))
    assert isinstance(sig, FusedSigLipLoss) and (sig.dist_impl, sig.rank, sig.world_size) == ("shift", 2, 3)
    # Trainers that imported create_loss by name while patched see ours, and get the original back on unpatch.
    import open_clip_train.main as oc_main

    integration.patch(backend="torch")  # idempotent; updates options
    assert oc_main.create_loss(_args()).backend == "torch"
    integration.unpatch()
    assert open_clip.create_loss is original and open_clip.factory.create_loss is original
    assert oc_main.create_loss is original
    assert type(open_clip.create_loss(_args())) is ClipLoss


def test_uncovered_configs_keep_open_clip_loss_with_warning():
    with integration.patched():
        with pytest.warns(RuntimeWarning, match="distillation"):
            assert type(open_clip.create_loss(_args(distill=True))).__name__ == "DistillClipLoss"
        with pytest.warns(RuntimeWarning, match="CoCa"):
            assert type(open_clip.create_loss(_args(model="coca_ViT-B-32"))).__name__ == "CoCaLoss"
    assert not integration.is_patched()


class _Loader(list):
    """What train_one_epoch needs from a dataloader: iteration plus num_batches / num_samples."""

    def __init__(self, batches):
        super().__init__(batches)
        self.num_batches = len(batches)
        self.num_samples = sum(len(b[0]) for b in batches)


def _train(patch: bool, steps=4, batch=8):
    from open_clip_train.data import DataInfo
    from open_clip_train.train import train_one_epoch

    from bioclip_fast.model import create_model

    torch.manual_seed(0)
    model = create_model("bioclip-micro")
    model.output_dict = True  # as open_clip_train.main creates it
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(batch, 3, 32, 32, generator=g), torch.randint(1, 49407, (batch, 77), generator=g))
        for _ in range(steps)
    ]
    args = _args(batch_size=batch)
    if patch:
        with integration.patched():
            loss = open_clip.create_loss(args)
    else:
        loss = open_clip.create_loss(args)
    assert isinstance(loss, FusedClipLoss if patch else ClipLoss)
    seen = []
    loss.register_forward_hook(lambda m, i, out: seen.append(out["contrastive_loss"].item()))
    # SGD: parameters move linearly in the gradients, so they can be compared tightly (Adam turns ~1e-9 gradient
    # noise on near-zero-gradient weights into ±lr steps).
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    train_one_epoch(model, {"train": DataInfo(_Loader(batches))}, loss, 0, optimizer, None, None, None, args)
    return seen, [p.detach().clone() for p in model.parameters()]


def test_open_clip_training_steps_match_with_and_without_patch():
    base_losses, base_params = _train(patch=False)
    ours_losses, ours_params = _train(patch=True)
    assert len(base_losses) == len(ours_losses) == 4
    assert base_losses[0] != base_losses[-1]  # training moved
    torch.testing.assert_close(torch.tensor(ours_losses), torch.tensor(base_losses), rtol=1e-5, atol=1e-5)
    for a, b in zip(ours_params, base_params):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_siglip_dropin_matches_open_clip_on_model_features():
    """SigLIP through the patched factory on real model features (with a learnable bias), grads included."""
    from bioclip_fast.model import create_model

    torch.manual_seed(0)
    model = create_model("bioclip-micro")
    model.output_dict = True
    images = torch.randn(6, 3, 32, 32)
    texts = torch.randint(1, 49407, (6, 77))
    bias = torch.nn.Parameter(torch.tensor([-10.0]))
    with integration.patched():
        ours = open_clip.create_loss(_args(siglip=True))
    results = []
    for loss_mod in (ours, SigLipLoss()):
        model.zero_grad()
        bias.grad = None
        out = model(images, texts)
        value = loss_mod(out["image_features"], out["text_features"], out["logit_scale"], bias)
        value.backward()
        results.append([value.detach(), bias.grad.clone()] + [p.grad.clone() for p in model.parameters()
                                                              if p.grad is not None])
    for a, b in zip(*results):  # gradients: normwise, scaled to each tensor's magnitude (not a bare atol)
        assert_normwise_close(a, b, rtol=1e-5)
