#!/usr/bin/env bash
# The course, end to end on the CPU path: set up, build the tiny model, then execute every notebook in
# notebooks/ in name order, top to bottom, with the tiny profile and no network.
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

echo "[course] tiny chat model (cached; a first build trains it for a few minutes)"
quiet=(); if [[ ! -t 1 ]]; then quiet=(--quiet); fi  # no progress bars in a log
"$PY" -m helpers build-tiny "${quiet[@]}"

mapfile -t notebooks < <(find notebooks -maxdepth 1 -name '*.ipynb' -type f 2>/dev/null | LC_ALL=C sort)
if (( ${#notebooks[@]} == 0 )); then
  echo "[course] no notebooks in notebooks/ yet: nothing to run"
  exit 0
fi

out="${COURSE_OUTPUT_DIR:-$ROOT/outputs}/executed"
mkdir -p "$out"
echo "[course] running ${#notebooks[@]} notebooks with COURSE_PROFILE=tiny, offline; executed copies in $out"
for nb in "${notebooks[@]}"; do
  name="$(basename "$nb" .ipynb)"
  t0=$(date +%s)
  # nbconvert runs each notebook's kernel in the notebook's own folder (notebooks/).
  if ! "$PY" -m jupyter nbconvert --to notebook --execute --ExecutePreprocessor.timeout=1200 \
      --ExecutePreprocessor.kernel_name=python3 --output-dir "$out" "$nb" > "$out/$name.log" 2>&1; then
    tail -n 40 "$out/$name.log" >&2
    echo "[course] FAILED: $nb after $(( $(date +%s) - t0 )) s (full log: $out/$name.log); stopping here" >&2
    exit 1
  fi
  printf '[course] %-40s ok  %4d s\n' "$(basename "$nb")" "$(( $(date +%s) - t0 ))"
done
echo "[course] all ${#notebooks[@]} notebooks ran in $(( $(date +%s) - started )) s; results in ${COURSE_OUTPUT_DIR:-outputs}/"
