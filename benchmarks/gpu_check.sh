#!/usr/bin/env bash
# One prepared GPU check (< 8 minutes): pytest -m gpu, the loss ladder vs open_clip / Inf-CL, the kernel benchmark
# with both backwards, the decode benchmark (when DALI imports) and a short ViT-L/14 training benchmark.
#
#   benchmarks/gpu_check.sh OUTDIR [--site DIR] [--budget-s 450] [--only STEP ...] [--dry-run]
#
# OUTDIR gets gpu_check.json + gpu_check.png and one folder per step. --site DIR: a folder of pure-Python wheels
# and/or unpacked packages (pytest, open_clip_torch, inf-cl, ...) for a host without a package index. Uses
# $PYTHON (default: .venv/bin/python if present, else python3). Exit: 0 all ok, 1 a step failed or timed out,
# 2 bad usage / triton too old, 3 no CUDA GPU. Details: benchmarks/gpu_check.py.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
if [[ $# -lt 1 || "$1" == -h || "$1" == --help ]]; then
  sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  [[ $# -lt 1 ]] && exit 2 || exit 0
fi
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$root/.venv/bin/python" ]]; then PYTHON="$root/.venv/bin/python"; else PYTHON=python3; fi
fi
exec "$PYTHON" "$here/gpu_check.py" "$@" --python "$PYTHON"
