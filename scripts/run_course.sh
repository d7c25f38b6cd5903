#!/usr/bin/env bash
# The course, end to end on the CPU path: set up, check the shipped data, then execute every notebook in
# notebooks/ top to bottom, with the tiny profile and no network, two at a time (scripts/nbtools.py course:
# a notebook waits for the notebooks whose run folders it reads). COURSE_JOBS=1 runs them one by one.
# Executed copies (with their outputs) land in outputs/executed/; the first failing notebook stops the run.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
started=$(date +%s)

bash scripts/setup_env.sh
if [[ -d /content || -n "${COLAB_RELEASE_TAG:-}" ]]; then
  PY="$(command -v python3 || command -v python)"
else
  PY="$ROOT/.venv/bin/python"
  export VIRTUAL_ENV="$ROOT/.venv" PATH="$ROOT/.venv/bin:$PATH"
  export JUPYTER_PATH="$ROOT/.venv/share/jupyter${JUPYTER_PATH:+:$JUPYTER_PATH}"  # the venv's kernel first
fi
export COURSE_PROFILE=tiny HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" PYTHONHASHSEED=0

"$PY" - <<'PY'  # the shipped tiny model is intact (data/SHA256SUMS): a damaged copy would train nonsense quietly
import hashlib, pathlib, sys
data = pathlib.Path("data")
bad = [name for digest, name in (line.split() for line in (data / "SHA256SUMS").read_text().splitlines())
       if hashlib.sha256((data / name).read_bytes()).hexdigest() != digest]
sys.exit(f"[course] data/ files changed since they were checksummed: {bad}" if bad else 0)
PY

mapfile -t notebooks < <(find notebooks -maxdepth 1 -name '*.ipynb' -type f 2>/dev/null | LC_ALL=C sort)
if (( ${#notebooks[@]} == 0 )); then
  echo "[course] no notebooks in notebooks/ yet: nothing to run"
  exit 0
fi

out="${COURSE_OUTPUT_DIR:-$ROOT/outputs}/executed"
mkdir -p "$out"
echo "[course] running ${#notebooks[@]} notebooks with COURSE_PROFILE=tiny, offline, two at a time (each one thread;"
echo "[course] a notebook starts when the ones whose run folders it reads have finished); executed copies in $out"
# nbconvert runs each notebook's kernel in the notebook's own folder (notebooks/).
"$PY" scripts/nbtools.py course "$out" "${notebooks[@]}"
echo "[course] done in $(( $(date +%s) - started )) s (with set-up); results in ${COURSE_OUTPUT_DIR:-outputs}/"
