#!/usr/bin/env bash
# GPU check of the triton backend (see check.py): float64 correctness, fwd+bwd time
# against the cuBLAS floor and peers, peak memory. One CUDA GPU, < 8 minutes on an H100/H200.
#   benchmarks/gpu/check.sh [OUT]     OUT: a .md file or a folder (default $OUT, else benchmarks/gpu)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PY:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
unset TRITON_INTERPRET
exec timeout 480 "$PY" benchmarks/gpu/check.py "$@"
