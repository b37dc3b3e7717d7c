"""Tile configurations of the pairwise-loss kernels per feature width D, their pruning and autotuned wrappers, and the
launcher that picks the autotuned kernel (GPU), the fixed interpreter tiles (``TRITON_INTERPRET=1``) or the
GPU's launch path under the interpreter (``BIOCLIP_FAST_INTERPRET_AUTOTUNED=1``).

Uses only Triton APIs present from 3.0 through 3.8: triton.autotune(restore_value=,
prune_configs_by={"early_config_prune"}) whose callback is called as (configs, named_args) or
(configs, named_args, **kwargs) depending on the version.
"""
from __future__ import annotations

import functools

import torch
import triton

from bioclip_fast.kernels.settings import autotune_enabled, interpret_autotuned, interpreting

# Tile configuration used under the interpreter instead of autotuning. Tests may change these dicts (e.g. to
# exercise the multi-slice backward path); keys are the kernels' constexpr meta-parameters.
INTERPRET_FWD_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_D": 32}
INTERPRET_BWD_CONFIG = {"BLOCK_X": 32, "BLOCK_Y": 32, "BLOCK_D": 32, "BLOCK_DO": 32, "NUM_ACC": 2}
# Programs a sweep aims for under the interpreter (small, but > 1 so the multi-program reductions are exercised).
INTERPRET_TARGET_PROGRAMS = 4


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def target_programs(device: torch.device) -> int:
    """How many programs a multi-block sweep should launch: a few waves of the GPU's SMs."""
    if interpreting() or device.type != "cuda":
        return INTERPRET_TARGET_PROGRAMS
    return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def size_bucket(n: int) -> int:
    """Autotune key for a batch size: its power-of-two bucket (tile choice depends on the order of magnitude)."""
    return triton.next_power_of_2(max(int(n), 1))


def launch(kernel, tuned, grid, args, meta, interpret_config, device: torch.device):
    """Launch ``tuned`` (autotuned) on ``device``, or ``kernel`` with the fixed interpreter config."""
    if interpreting() and not interpret_autotuned():
        kernel[grid](*args, **meta, **interpret_config)
    elif device.type == "cuda":
        with torch.cuda.device(device):  # Triton launches on the current device, not the tensors' one
            tuned[grid](*args, **meta)
    elif interpreting():
        tuned[grid](*args, **meta)
    else:
        raise ValueError(f"the Triton kernels run on CUDA tensors (or CPU under TRITON_INTERPRET=1), got {device}")


def _d_block(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def fwd_configs(D: int) -> list[triton.Config]:
    """Forward (logits-tile + reduction) configs for feature width D: a GEMM main loop plus an epilogue.

    D <= 128 keeps the whole Q block in registers/SMEM (one BLOCK_D chunk); wider D streams 64- or 128-wide
    chunks through the software pipeline like a GEMM's K loop. (128 x 128 tiles need 8 warps: with 4 the
    column-statistics epilogue spills, per ptxas on sm_90a.)
    """
    if D <= 128:
        bd = _d_block(D)
        shapes = ((128, 128, bd, 8, 3), (128, 64, bd, 4, 3), (64, 128, bd, 4, 3), (64, 64, bd, 4, 4))
    else:
        # First = default (BIOCLIP_FAST_AUTOTUNE=0): 64 x 128 with 8 warps, spill-free at D = 768 under triton 3.6
        # (the GPU host's: 188 registers) and 3.8 (166). With 4 warps the symmetric forward spills 20 B under
        # 3.6 (255 registers; none under 3.8); the 128-row tiles spill 8-12 B of the column-statistics epilogue
        # (kernels/NOTES.md). The autotuner still tries the 4-warp tile.
        shapes = ((64, 128, 64, 8, 4), (64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 128, 64, 8, 4),
                  (128, 64, 64, 4, 4), (128, 128, 128, 8, 2))
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd}, num_warps=w, num_stages=st)
            for bm, bn, bd, w, st in shapes]


def grad_configs(D: int) -> list[triton.Config]:
    """Gradient-tile kernel (GEMM backward): the forward's shapes, but 64 x 64 / 4 warps first (default): its
    symmetric epilogue holds both softmaxes and the centred scale-gradient terms, and spills at 64 x 128 / 4 warps
    (468 B) and 128 x 128 / 8 warps (184 B) per ptxas on sm_90a."""
    bd = _d_block(D) if D <= 128 else 64
    first = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": bd}, num_warps=4, num_stages=3)
    return [first] + [c for c in fwd_configs(D) if c.kwargs != first.kwargs or c.num_warps != 4]


def bwd_configs(D: int) -> list[triton.Config]:
    """Backward configs: logits tile recompute, then ``acc[BLOCK_X, NUM_ACC*BLOCK_DO] += G @ Y[:, slice]``.

    For D <= 128 the whole dX row block stays in registers; up to D = 512 too (64-row blocks). For wider D: two D
    slices with BLOCK_X = 64 (logits recomputed twice, no spills) and 128-row blocks with 128/256-wide slices
    (the largest MMA tiles, logits recomputed D / BLOCK_DO times). The first config is the default.
    """
    def cfg(bx, by, bd, bdo, nacc, warps, stages):
        return triton.Config({"BLOCK_X": bx, "BLOCK_Y": by, "BLOCK_D": bd, "BLOCK_DO": bdo, "NUM_ACC": nacc},
                             num_warps=warps, num_stages=stages)

    if D <= 128:
        bd = _d_block(D)
        return [cfg(128, 64, bd, bd, 1, 8, 2), cfg(64, 64, bd, bd, 1, 4, 3), cfg(128, 128, bd, bd, 1, 8, 2),
                cfg(64, 128, bd, bd, 1, 8, 2)]
    out = []
    n128 = triton.cdiv(D, 128)
    if n128 <= 4:  # D <= 512: everything in registers with 128-wide accumulators
        out.append(cfg(64, 64, 64, 128, n128, 8, 2))
        # 128-row blocks: all of D in registers up to 256, else two 256-wide slices.
        out.append(cfg(128, 64, 64, 128, n128, 8, 2) if D <= 256 else cfg(128, 64, 64, 256, 1, 8, 2))
    else:
        # All of D in registers (64 rows x 768 fp32) spills 600-800 B per thread at 8 and at 16 warps (ptxas,
        # sm_90a), so it is not offered: two D slices (the logits recomputed twice per kernel) are the widest
        # spill-free tiling. Where memory allows, bwd_plan takes the GEMM backward instead (one recompute).
        half = triton.cdiv(triton.cdiv(D, 2), 128)
        if half <= 4:  # two slices
            out.append(cfg(64, 64, 64, 128, half, 8, 2))
        out += [cfg(128, 64, 64, 256, 1, 8, 2), cfg(128, 128, 64, 128, 1, 8, 2)]
    if not out or triton.cdiv(D, 256) > 4:  # very wide D: sliced only
        out.append(cfg(64, 64, 64, 256, 1, 4, 2))
    return out


def _launch_width(named_args: dict, kwargs: dict) -> int:
    """The feature width D of the launch being pruned. Triton calls ``early_config_prune(configs, named_args,
    **kwargs)`` with only the *positional* arguments in ``named_args`` (3.6 and 3.8 alike) and the keywords in
    ``kwargs``; the launchers pass the constexprs (D among them) as keywords. Either place is accepted."""
    for src in (kwargs, named_args):
        if "D" in src:
            return int(src["D"])
    raise KeyError(f"autotune pruning: no feature width D among the launch arguments "
                   f"{sorted(named_args) + sorted(kwargs)}")


def prune_fwd(configs, named_args, **kwargs):
    out = fwd_configs(_launch_width(named_args, kwargs))
    return out if autotune_enabled() else out[:1]


def prune_grad(configs, named_args, **kwargs):
    out = grad_configs(_launch_width(named_args, kwargs))
    return out if autotune_enabled() else out[:1]


def prune_bwd(configs, named_args, **kwargs):
    out = bwd_configs(_launch_width(named_args, kwargs))
    return out if autotune_enabled() else out[:1]


def _interpreter_bench(kernel_call, quantiles=None, **_):
    """Wall-clock time of one interpreted run (ms): the autotuner's benchmarker under ``TRITON_INTERPRET=1``, where
    triton's own needs a GPU. Only the launch path is exercised; the timings say nothing about a GPU."""
    import time

    t0 = time.perf_counter()
    kernel_call()
    ms = (time.perf_counter() - t0) * 1e3
    return [ms] * len(quantiles) if quantiles else ms


def autotuned(kernel, *, key: list[str], prune, configs: list, reset_to_zero: list[str] | None = None,
              restore_value: list[str] | None = None):
    """``triton.autotune`` of ``kernel`` with the config list built per launch by ``prune`` (from the call's D).

    Autotuning runs every pruned config on the *real* arguments. Buffers a config reads before writing
    (``restore_value``) are restored after each trial; buffers whose slots only some configs write (per-program
    partial sums: a config with fewer programs leaves the slots of a config with more) are zeroed before each trial
    and again before the winning config's run (``reset_to_zero``; triton 3.6 and 3.8 both call the reset after
    benchmarking). ``configs`` is a placeholder list of more than one entry: triton prunes only then."""
    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune},
                           reset_to_zero=reset_to_zero, restore_value=restore_value,
                           do_bench=_interpreter_bench if interpreting() else None)(kernel)
