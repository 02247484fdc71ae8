#!/usr/bin/env bash
# The GPU check of issue 10 for a lent accelerator, under 8 minutes: the biomedclip student preset in bf16 on
# synthetic data (random weights, a tokenizer trained here, no downloads), printing samples/s, MFU and peak memory
# with and without gradient caching (data.micro_batch_size) and train.compile, and with JPEGs decoded on the GPU
# (data.decode=device); a variant whose config key the
# trainer does not know yet prints status=skipped (the keys `distill train --help` lists).
#
#   bash benchmarks/gpu_check.sh                 # on the GPU; figures also in ${OUT:-/tmp}/gpu_check.json
#   bash benchmarks/gpu_check.sh --smoke         # on a CPU in seconds (tests/test_gpu_check.py runs this)
#   bash benchmarks/gpu_check.sh --batch-size 128 --variants plain,compile   # any gpu_check.py flag
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"   # per process: the loader's workers share the cores
JSON="${OUT:-/tmp}/gpu_check.json"
"$PY" -c 'import torch; print("gpu_check torch", torch.__version__, "cuda", torch.cuda.is_available())'
# under 8 minutes in all: gpu_check.py stops starting variants after --budget-s (440 s)
exec timeout 470 "$PY" -m benchmarks.gpu_check --json-out "$JSON" "$@"
