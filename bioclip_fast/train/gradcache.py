"""Gradient caching (GradCache, Gao et al. 2021) for contrastive steps larger than activation memory allows.

1. Encode the per-rank batch chunk by chunk under ``no_grad`` and keep only the features (B×E per tower).
2. Compute the contrastive loss over the full (all-gathered) batch on leaf copies of those features and of the raw
   ``logit_scale``; one backward gives d loss / d features and d loss / d logit_scale.
3. Re-encode each chunk with grad and backpropagate the cached feature gradients through it with the surrogate
   ``Σ ⟨features, cached grad⟩`` (plus ``logit_scale · its grad`` once), one engine micro-step per chunk.

The gradients equal the unchunked step's up to float summation order; the loss is the same number. RNG states are
replayed per chunk so stochastic layers (patch dropout, dropout) make the same choices in both passes.
"""
from __future__ import annotations

from typing import Any, Callable

import torch


def _rng_get(device: torch.device):
    return (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _rng_set(state, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _chunks(batch: dict[str, torch.Tensor], keys: tuple[str, str], size: int) -> list[dict[str, torch.Tensor]]:
    n = batch[keys[0]].shape[0]
    return [{k: batch[k][i:i + size] for k in keys} for i in range(0, n, size)]


def grad_cache_step(
    engine,
    loss_from_features: Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]],
    inputs: dict[str, torch.Tensor],
    chunk: int,
    *,
    check_loss: Callable[[torch.Tensor, dict[str, torch.Tensor]], bool],
) -> tuple[torch.Tensor, dict[str, float], bool]:
    """One GradCache step. `inputs` has image/text and optionally replay_image/replay_text (per-rank tensors).

    `check_loss(loss, parts)` decides (collectively) whether the loss is usable; if not, nothing is backpropagated
    and the caller skips or aborts. Returns (loss, loss parts, stepped?) where the engine has received every micro-backward
    but `engine.step()` is left to the caller.
    """
    device = engine.device
    groups: list[tuple[tuple[str, str], tuple[str, str]]] = [(("image", "text"), ("image", "text"))]
    if "replay_image" in inputs:
        groups.append((("replay_image", "replay_text"), ("replay_image", "replay_text")))

    n_chunks = sum(-(-inputs[keys[0]].shape[0] // chunk) for keys, _ in groups)
    if engine.kind == "deepspeed" and n_chunks != engine.micro_steps:  # its accumulation count is fixed
        raise ValueError(
            f"GradCache step has {n_chunks} chunks but the engine was built for {engine.micro_steps} micro-steps "
            f"(per-rank batch / grad_cache_chunk, + replay batch / chunk): build the Trainer with the batch sizes "
            f"it will be fed"
        )

    # pass 1: features without activations
    plan: list[tuple[dict[str, torch.Tensor], Any]] = []
    feats: dict[str, list[torch.Tensor]] = {}
    logit_scale = logit_bias = None
    with torch.no_grad():
        for keys, _ in groups:
            for part in _chunks(inputs, keys, chunk):
                state = _rng_get(device)
                out = engine.forward(**part)
                plan.append((part, state))
                for k in keys:
                    feats.setdefault(k, []).append(out[k])
                logit_scale = out["logit_scale"]
                logit_bias = out.get("logit_bias")
    final_rng = _rng_get(device)

    # loss over the whole batch on leaf copies -> cached gradients
    leaves = {k: torch.cat(v).detach().float().requires_grad_(True) for k, v in feats.items()}
    scale_leaf = logit_scale.detach().float().requires_grad_(True)
    full = dict(leaves, logit_scale=scale_leaf)
    bias_leaf = None
    if logit_bias is not None:
        bias_leaf = logit_bias.detach().float().requires_grad_(True)
        full["logit_bias"] = bias_leaf
    loss, parts = loss_from_features(full)
    if not check_loss(loss, parts):
        return loss.detach(), parts, False
    wrt = list(leaves.values()) + [scale_leaf] + ([bias_leaf] if bias_leaf is not None else [])
    grads = torch.autograd.grad(loss, wrt)
    cached = dict(zip(list(leaves.keys()) + ["logit_scale", "logit_bias"], grads))

    # pass 2: re-encode each chunk with grad and push the cached gradients through it
    offsets = {k: 0 for k in leaves}
    for i, (part, state) in enumerate(plan):
        _rng_set(state, device)
        out = engine.forward(**part)
        surrogate = 0.0
        for k, v in part.items():
            n = v.shape[0]
            g = cached[k][offsets[k]:offsets[k] + n]
            offsets[k] += n
            surrogate = surrogate + (out[k].float() * g).sum()
        if i == 0:  # the logit_scale/bias terms once per step (their graph is independent of the chunk)
            surrogate = surrogate + (out["logit_scale"].float() * cached["logit_scale"]).sum()
            if bias_leaf is not None:
                surrogate = surrogate + (out["logit_bias"].float() * cached["logit_bias"]).sum()
        engine.backward(surrogate)
    _rng_set(final_rng, device)
    return loss.detach(), parts, True
