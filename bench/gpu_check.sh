#!/usr/bin/env bash
# The GPU path measured on one GPU (bench/gpu_check.py says what and how), in a few minutes, where
# only PyTorch with CUDA and Python are installed. From the repository root:
#     bench/gpu_check.sh                 # the card: correctness, img/s, memory, decode rate
#     bench/gpu_check.sh --quick         # every part at tiny sizes, in seconds
#     bench/gpu_check.sh --device cpu --quick   # the dry run on a CPU (the test suite's)
# PYTHON picks the interpreter (default: python3).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" bench/gpu_check.py "$@"
