"""Compile the loss kernels for a GPU target without a GPU, and read ptxas's resource report.

    TRITON_INTERPRET=0 python -m bioclip_fast.kernels._aot --D 768 --dtype bf16 [--arch 90] [--all-configs]

Prints, per kernel and config: whether the tensor-core path is used (``wgmma`` on sm_90), whether loads are
asynchronous copies (``cp.async``), registers per thread and spill bytes. The compile mimics the launcher's run-time
specialization (16-byte aligned pointers, batch sizes divisible by 16), otherwise Triton falls back to scalar loads.
Runs on any machine with triton's bundled ptxas; the tests use it to catch GPU-only compile errors in CPU CI.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    raise RuntimeError("run with TRITON_INTERPRET=0: interpreted kernels cannot be compiled")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from bioclip_fast.kernels import _pairwise as P  # noqa: E402
from bioclip_fast.kernels import clip_loss as C  # noqa: E402
from bioclip_fast.kernels import siglip_loss as S  # noqa: E402

_INT_ARGS_DIV16 = ("Bq", "Bk", "Bx", "By", "C")


_INT_ARGS = {"Bq", "Bk", "Bx", "By", "offset", "n_groups", "n_splits", "B_BUCKET", "c0", "C"}
_FEATURE_PTRS = {"Q", "K", "X", "Y", "DX", "W"}  # in the features' dtype; every other pointer is fp32


def _signature(kernel, dtype: str, constexprs: dict) -> dict:
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in _INT_ARGS:
            sig[name] = "i32"
        elif name == "inv_n":
            sig[name] = "fp32"
        else:
            sig[name] = "*" + dtype if name in _FEATURE_PTRS else "*fp32"
    return sig


def _attrs(sig: dict) -> dict:
    return {(i,): [["tt.divisibility", 16]] for i, (n, t) in enumerate(sig.items())
            if t.startswith("*") or n in _INT_ARGS_DIV16}


def _ptxas() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def compile_one(kernel, dtype: str, constexprs: dict, num_warps: int, num_stages: int, arch: int = 90) -> dict:
    sig = _signature(kernel, dtype, constexprs)
    src = ASTSource(kernel, sig, constexprs=constexprs, attrs=_attrs(sig))
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = compiled.asm["ptx"]
    report = {"wgmma": "wgmma" in ptx, "mma": "mma.sync" in ptx or "wgmma" in ptx, "cp_async": "cp.async" in ptx}
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        sm = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        out = subprocess.run([_ptxas(), f"-arch={sm}", "-v", f.name, "-o", os.devnull], capture_output=True,
                             text=True, check=True).stderr
    finally:
        os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores", out)
    report["registers"] = int(regs.group(1)) if regs else None
    report["spill_store_bytes"] = int(spill.group(1)) if spill else 0
    return report


def kernel_cases(D: int, dtype: str, all_configs: bool):
    """(label, kernel, constexprs, num_warps, num_stages) for every kernel variant a launcher can pick."""
    prec = "ieee" if dtype == "fp32" else ""
    fwd = P.fwd_configs(D) if all_configs else P.fwd_configs(D)[:1]
    bwd = P.bwd_configs(D) if all_configs else P.bwd_configs(D)[:1]
    for cfg in fwd:
        for col in (True, False):
            yield (f"clip_fwd col_stats={col} {cfg}", C._clip_fwd_kernel,
                   dict(D=D, HAS_BIAS=True, COL_STATS=col, PREC=prec, **cfg.kwargs), cfg.num_warps, cfg.num_stages)
        yield (f"siglip_fwd {cfg}", S._siglip_fwd_kernel, dict(D=D, HAS_BIAS=True, PREC=prec, **cfg.kwargs),
               cfg.num_warps, cfg.num_stages)
    for cfg in fwd:
        for mode in (P.MODE_CLIP_SYM, P.MODE_CLIP_DIR, P.MODE_SIGLIP):
            yield (f"grad_tile mode={mode} {cfg}", P._grad_tile_kernel,
                   dict(D=D, MODE=mode, HAS_BIAS=True, PREC=prec, **cfg.kwargs), cfg.num_warps, cfg.num_stages)
    for cfg in bwd:
        for mode, x_is_rows in ((P.MODE_CLIP_SYM, True), (P.MODE_CLIP_SYM, False), (P.MODE_CLIP_DIR, True),
                                (P.MODE_CLIP_DIR, False), (P.MODE_SIGLIP, True)):
            yield (f"bwd mode={mode} x_is_rows={x_is_rows} {cfg}", P._pairwise_bwd_kernel,
                   dict(D=D, MODE=mode, X_IS_ROWS=x_is_rows, HAS_BIAS=True, SCALAR_GRADS=x_is_rows, PREC=prec,
                        **cfg.kwargs), cfg.num_warps, cfg.num_stages)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--D", type=int, nargs="+", default=[768])
    ap.add_argument("--dtype", nargs="+", default=["bf16"], choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--all-configs", action="store_true", help="every autotune config, not only the first")
    ap.add_argument("--json", help="write the reports here")
    args = ap.parse_args(argv)
    rows = []
    for D in args.D:
        for dtype in args.dtype:
            for label, kernel, consts, warps, stages in kernel_cases(D, dtype, args.all_configs):
                rep = compile_one(kernel, dtype, consts, warps, stages, args.arch)
                rows.append({"D": D, "dtype": dtype, "kernel": label, **rep})
                print(f"D={D:5d} {dtype:4s} regs={rep['registers']!s:>4} spill={rep['spill_store_bytes']:>5}B "
                      f"wgmma={int(rep['wgmma'])} cp.async={int(rep['cp_async'])}  {label}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
