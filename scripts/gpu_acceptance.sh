#!/usr/bin/env bash
# The GPU acceptance run in one command: no network, at most 8 minutes on one GPU (H100/H200/A100, or a T4).
#
#   (a) python -m helpers run --profile t4 on the t4 stand-in at Qwen2.5-0.5B's real width (random weights):
#       train a few steps, merge, evaluate - with --precision fp16 (the T4's path), then bf16;
#   (b) python -m benchmarks.gpu step: the full profile's DPO on a Mistral-7B-shaped random model in 4-bit,
#       about 10 steps - seconds per step, pairs per second, peak memory, MFU;
#   (c) python -m benchmarks.gpu reference: the reference model three ways on the GPU.
#
# Each step is timed; a failing step is reported loudly and the next one runs. One JSON at the end
# (benchmarks/results/gpu_acceptance.json: the GPU, the library versions, each step's status and figures) and a
# short table. Without CUDA it says so and exits 2. The steps and their sizes live in benchmarks/gpu_acceptance.py.
#
#   scripts/gpu_acceptance.sh                              # on the GPU machine
#   GPU_ACCEPTANCE_TEST_MODE=1 scripts/gpu_acceptance.sh   # anywhere: the same steps on CPU at tiny sizes
#   scripts/gpu_acceptance.sh --help                       # options (--only STEP, --budget S, --json FILE, --keep)
#
# Python: $PYTHON if set, else the repository's .venv, else python3 from PATH.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
exec "$PYTHON" -m benchmarks.gpu_acceptance "$@"
