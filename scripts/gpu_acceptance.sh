#!/usr/bin/env bash
# The GPU acceptance run in one command: no network, about 5 minutes on one GPU (H100/H200/A100, or a T4).
#
#   (a) scripts/dpo.py --profile t4 on the t4 stand-in at Qwen2.5-0.5B's real width (random weights,
#       COURSE_STANDINS=real): train a few steps in 4-bit, merge, score the held-out pairs - with --precision fp16
#       (the T4's path), then bf16;
#   (b) python -m benchmarks.gpu step: the full profile's DPO on a Mistral-7B-shaped random model in 4-bit, a few
#       steps - seconds per step, pairs per second, peak memory, MFU;
#   (c) python -m benchmarks.gpu reference: the reference model three ways on the GPU.
#
# Each step is timed; a failing step is reported loudly and the next one runs. One JSON, rewritten after every step
# (benchmarks/results/gpu_acceptance.json: the GPU, the library versions, each step's status, figures and the end
# of its log) and a short table. Without CUDA it says so and exits 2. The steps and their sizes live in
# benchmarks/gpu_acceptance.py; the wheels a machine without the course's libraries needs, in .whl/
# (python -m benchmarks.gpu_wheels; benchmarks/README.md gives the command that installs them).
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
