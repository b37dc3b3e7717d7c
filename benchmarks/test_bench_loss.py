"""pytest-benchmark view of the CPU loss paths: `pytest benchmarks/test_bench_loss.py --benchmark-only`.

Same fwd+bwd step as `bioclip-fast bench-loss`, at a size that runs in seconds; compare the groups' means.
"""
import pytest
import torch

from bioclip_fast.loss import FusedClipLoss, FusedSigLipLoss

B, D = 1024, 256


@pytest.fixture(scope="module")
def features():
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=-1)
    return img, txt


def _step(loss_mod, img, txt, *extra):
    i, t = img.clone().requires_grad_(), txt.clone().requires_grad_()
    s = torch.tensor(14.0, requires_grad=True)
    loss = loss_mod(i, t, s, *extra)
    loss.backward()
    return float(loss.detach())


@pytest.mark.parametrize("impl", ["cpp", "torch", "open_clip"])
def test_clip_fwd_bwd(benchmark, features, impl):
    if impl == "open_clip":
        from open_clip.loss import ClipLoss

        mod = ClipLoss()
    else:
        mod = FusedClipLoss(backend=impl, check_finite=False)
    benchmark.group = f"clip fwd+bwd B={B} D={D}"
    assert benchmark(_step, mod, *features) > 0


@pytest.mark.parametrize("impl", ["cpp", "torch", "open_clip"])
def test_siglip_fwd_bwd(benchmark, features, impl):
    if impl == "open_clip":
        from open_clip.loss import SigLipLoss

        mod = SigLipLoss()
    else:
        mod = FusedSigLipLoss(backend=impl, check_finite=False)
    benchmark.group = f"siglip fwd+bwd B={B} D={D}"
    assert benchmark(_step, mod, *features, torch.tensor(-10.0)) > 0
