#!/usr/bin/env python
"""Contrastive-loss benchmark (same as `bioclip-fast bench-loss`): ours vs open_clip.ClipLoss vs Inf-CL (CUDA) vs our
torch chunked reference, fwd+bwd time, peak extra memory, TFLOP/s; JSON + PNG under benchmarks/results/.

    python benchmarks/bench_loss.py --quick              # ~1 minute on a CPU
    python benchmarks/bench_loss.py                      # CUDA: B 4k..1M, D 512/768/1024, bf16+fp32
"""
import sys

from bioclip_fast.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench-loss", *sys.argv[1:]]))
