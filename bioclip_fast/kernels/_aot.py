"""Compile the loss kernels for a GPU target without a GPU; read ptxas's resource report and the SASS.

    TRITON_INTERPRET=0 python -m bioclip_fast.kernels._aot --D 768 --dtype bf16 [--arch 90] [--all-configs]
        [--json out.json] [--notes bioclip_fast/kernels/NOTES.md]

Prints, per kernel and config: whether the tensor-core path is used (``wgmma`` on sm_90), whether loads are
asynchronous copies (``cp.async``), registers per thread, spill bytes, and static SASS counts (``nvdisasm`` of the
cubin) inside the main loop: HGMMA, MUFU.EX2 (and per logit of a tile: 1.0 = one exp2 per logit on the path
taken; both paths of a runtime branch are counted), BAR.SYNC and local-memory loads/stores (LDL/STL, i.e. spill
traffic where it hurts). The main loop is the outermost backward-branch loop that contains the HGMMAs (or, without
tensor cores, the FFMA/HMMA work). ``--notes`` rewrites the table between the ``<!-- aot-table -->`` markers.

The compile mimics the launcher's run-time specialization (16-byte aligned pointers, batch sizes divisible by 16),
otherwise Triton falls back to scalar loads. Runs on any machine with triton's bundled ptxas/nvdisasm; the tests use
it to catch GPU-only compile errors and spills of the default configs in CPU CI.
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

from bioclip_fast.kernels import autotune  # noqa: E402
from bioclip_fast.kernels.backward_fused import pairwise_bwd_kernel  # noqa: E402
from bioclip_fast.kernels.backward_gemm import grad_tile_kernel  # noqa: E402
from bioclip_fast.kernels.clip_loss import clip_fwd_kernel  # noqa: E402
from bioclip_fast.kernels.siglip_loss import siglip_fwd_kernel  # noqa: E402
from bioclip_fast.kernels.tiles import MODE_CLIP_DIR, MODE_CLIP_SYM, MODE_SIGLIP  # noqa: E402

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


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _ptxas() -> str:
    return _tool("ptxas")


def tools_available() -> bool:
    return all(os.path.exists(_tool(n)) for n in ("ptxas", "nvdisasm"))


_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):", re.M)


def sass_loop_stats(sass: str) -> dict:
    """Static instruction counts in the main loop of a kernel's SASS (see the module docstring)."""
    instrs = []  # (address, opcode, operands)
    labels = {}
    pending = []
    for line in sass.splitlines():
        lab = _LABEL.match(line)
        if lab:
            pending.append(lab.group(1))
            continue
        m = _INSTR.search(line)
        if m:
            addr = int(m.group(1), 16)
            for p in pending:
                labels[p] = addr
            pending = []
            instrs.append((addr, m.group(2), m.group(3)))
    loops = []
    for addr, op, args in instrs:
        if op.startswith("BRA"):
            t = re.search(r"(\.L_x_\d+)", args)
            if t and t.group(1) in labels and labels[t.group(1)] <= addr:
                loops.append((labels[t.group(1)], addr))

    def count(lo, hi, pred):
        return sum(1 for a, op, _ in instrs if lo <= a <= hi and pred(op))

    work = (lambda op: op.startswith("HGMMA")) if any(op.startswith("HGMMA") for _, op, _ in instrs) else \
        (lambda op: op.startswith(("HMMA", "FFMA")))
    cands = [lp for lp in loops if count(lp[0], lp[1], work) > 0]
    # outermost: a loop not contained in another candidate
    outer = [lp for lp in cands if not any(o != lp and o[0] <= lp[0] and lp[1] <= o[1] for o in cands)]
    lo, hi = max(outer, key=lambda lp: count(lp[0], lp[1], work)) if outer else (0, -1)
    return {
        "loop_instructions": count(lo, hi, lambda op: True),
        "hgmma": count(lo, hi, lambda op: op.startswith("HGMMA")),
        "mufu_ex2": count(lo, hi, lambda op: op.startswith("MUFU.EX2")),
        "bar_sync": count(lo, hi, lambda op: op.startswith("BAR.SYNC") or op == "BAR"),
        "ldl": count(lo, hi, lambda op: op.startswith("LDL")),
        "stl": count(lo, hi, lambda op: op.startswith("STL")),
        "mufu_ex2_total": count(0, 1 << 62, lambda op: op.startswith("MUFU.EX2")),
        "ldl_total": count(0, 1 << 62, lambda op: op.startswith("LDL")),
        "stl_total": count(0, 1 << 62, lambda op: op.startswith("STL")),
    }


def compile_one(kernel, dtype: str, constexprs: dict, num_warps: int, num_stages: int, arch: int = 90,
                sass: bool = True) -> dict:
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
    spill_ld = re.search(r"(\d+) bytes spill loads", out)
    report["registers"] = int(regs.group(1)) if regs else None
    report["spill_store_bytes"] = int(spill.group(1)) if spill else 0
    report["spill_load_bytes"] = int(spill_ld.group(1)) if spill_ld else 0
    if sass and os.path.exists(_tool("nvdisasm")):
        with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
            f.write(compiled.asm["cubin"])
        try:
            text = subprocess.run([_tool("nvdisasm"), "-c", f.name], capture_output=True, text=True,
                                  check=True).stdout
        finally:
            os.unlink(f.name)
        report.update(sass_loop_stats(text))
        tile = constexprs.get("BLOCK_M", constexprs.get("BLOCK_X", 0)) * constexprs.get(
            "BLOCK_N", constexprs.get("BLOCK_Y", 0))
        per_thread = tile / (32 * num_warps) if tile else 0
        # single-tile kernels (the gradient tile) have their epilogue after the D loop: count the whole kernel
        ex2 = report["mufu_ex2"] or report["mufu_ex2_total"]
        report["mufu_ex2_per_logit"] = round(ex2 / per_thread, 2) if per_thread else None
    return report


def kernel_cases(D: int, dtype: str, all_configs: bool):
    """(label, kernel, constexprs, num_warps, num_stages) for every kernel variant a launcher can pick (the first
    config of each autotune list is the default: the one ``BIOCLIP_FAST_AUTOTUNE=0`` runs)."""
    prec = "ieee" if dtype == "fp32" else ""
    gs = 16384.0 if dtype == "fp16" else 1.0
    fwd = autotune.fwd_configs(D) if all_configs else autotune.fwd_configs(D)[:1]
    bwd = autotune.bwd_configs(D) if all_configs else autotune.bwd_configs(D)[:1]

    def tag(cfg):
        k = cfg.kwargs
        shape = "x".join(str(k[n]) for n in ("BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_X", "BLOCK_Y", "BLOCK_DO",
                                              "NUM_ACC") if n in k)
        return f"[{shape} w{cfg.num_warps} s{cfg.num_stages}]"

    for cfg in fwd:
        for col in (True, False):
            yield (f"clip_fwd {'sym' if col else 'dir'} {tag(cfg)}", clip_fwd_kernel,
                   dict(D=D, HAS_BIAS=True, COL_STATS=col, PREC=prec, FIXED_ORDER=False, **cfg.kwargs), cfg.num_warps,
                   cfg.num_stages)
        yield (f"siglip_fwd {tag(cfg)}", siglip_fwd_kernel,
               dict(D=D, HAS_BIAS=True, PREC=prec, FIXED_ORDER=False, **cfg.kwargs),
               cfg.num_warps, cfg.num_stages)
    for cfg in (autotune.grad_configs(D) if all_configs else autotune.grad_configs(D)[:1]):
        for mode, name in ((MODE_CLIP_SYM, "sym"), (MODE_CLIP_DIR, "dir"), (MODE_SIGLIP, "siglip")):
            yield (f"grad_tile {name} {tag(cfg)}", grad_tile_kernel,
                   dict(D=D, MODE=mode, HAS_BIAS=True, PREC=prec, GSCALE=gs, ROW_SUMS=mode == MODE_CLIP_DIR,
                        FIXED_ORDER=False, **cfg.kwargs), cfg.num_warps,
                   cfg.num_stages)
    for cfg in bwd:
        for mode, x_is_rows, name in ((MODE_CLIP_SYM, True, "sym dQ"), (MODE_CLIP_SYM, False, "sym dK"),
                                      (MODE_CLIP_DIR, True, "dir dQ"), (MODE_CLIP_DIR, False, "dir dK"),
                                      (MODE_SIGLIP, True, "siglip dQ"), (MODE_SIGLIP, False, "siglip dK")):
            yield (f"bwd {name} {tag(cfg)}", pairwise_bwd_kernel,
                   dict(D=D, MODE=mode, X_IS_ROWS=x_is_rows, HAS_BIAS=True, SCALAR_GRADS=x_is_rows, PREC=prec,
                        GSCALE=gs, QK_ORDER=False, FIXED_ORDER=False, **cfg.kwargs), cfg.num_warps, cfg.num_stages)


_COLS = ("D", "dtype", "kernel", "registers", "spill_store_bytes", "hgmma", "mufu_ex2", "mufu_ex2_total",
         "mufu_ex2_per_logit", "bar_sync", "ldl", "stl")


def markdown_table(rows: list[dict]) -> str:
    head = ("| D | dtype | kernel [tile, warps, stages] | regs | spill B | HGMMA (loop) | MUFU.EX2 (loop) | "
            "MUFU.EX2 (kernel) | EX2/logit | BAR.SYNC (loop) | LDL (loop) | STL (loop) |")
    lines = [head, "|" + "---|" * len(_COLS)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in _COLS) + " |")
    return "\n".join(lines)


def write_notes(path: str, rows: list[dict], command: str) -> None:
    """Replace the text between ``<!-- aot-table -->`` and ``<!-- /aot-table -->`` in ``path``."""
    with open(path) as f:
        text = f.read()
    start, end = "<!-- aot-table -->", "<!-- /aot-table -->"
    if start not in text or end not in text:
        raise ValueError(f"{path} has no {start} ... {end} markers")
    body = f"{start}\nGenerated by `{command}` (triton {triton.__version__}, sm_90a, no GPU needed).\n\n" + \
        markdown_table(rows) + f"\n{end}"
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    with open(path, "w") as f:
        f.write(head + body + tail)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--D", type=int, nargs="+", default=[768])
    ap.add_argument("--dtype", nargs="+", default=["bf16"], choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--all-configs", action="store_true", help="every autotune config, not only the default")
    ap.add_argument("--json", help="write the reports here")
    ap.add_argument("--notes", help="rewrite the table in this markdown file (between <!-- aot-table --> markers)")
    args = ap.parse_args(argv)
    if not tools_available():
        print("triton's bundled ptxas/nvdisasm were not found; nothing to do", file=sys.stderr)
        return 2
    rows = []
    for D in args.D:
        for dtype in args.dtype:
            for label, kernel, consts, warps, stages in kernel_cases(D, dtype, args.all_configs):
                rep = compile_one(kernel, dtype, consts, warps, stages, args.arch)
                rows.append({"D": D, "dtype": dtype, "kernel": label, **rep})
                print(f"D={D:5d} {dtype:4s} regs={rep['registers']!s:>4} spill={rep['spill_store_bytes']:>5}B "
                      f"hgmma={rep.get('hgmma')} ex2={rep.get('mufu_ex2')} ({rep.get('mufu_ex2_per_logit')}/logit) "
                      f"bar={rep.get('bar_sync')} ldl/stl={rep.get('ldl')}/{rep.get('stl')}  {label}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.notes:
        cmd = "python -m bioclip_fast.kernels._aot " + " ".join(argv if argv is not None else sys.argv[1:])
        write_notes(args.notes, rows, cmd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
