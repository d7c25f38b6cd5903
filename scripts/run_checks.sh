#!/usr/bin/env bash
# What CI runs: set up, build the tiny model, then ruff, the helper tests (pytest tests/) and every
# notebook executed by nbval (pytest --nbval-lax) with the tiny profile and no network.
# Every check runs even when an earlier one failed; the exit code is non-zero if any failed.
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
export MPLBACKEND=Agg OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false PYTHONHASHSEED=0 PYTHONDONTWRITEBYTECODE=1

failed=()
step() { printf '\n[checks] == %s\n' "$*"; }
# Run one check, time it, and remember it if it failed. pytest's exit code 5 (no test collected) is a failure.
check() {
  local what="$1" rc=0 t0
  shift
  t0=$(date +%s)
  "$@" || rc=$?
  if (( rc == 5 )) && [[ "$*" == *pytest* ]]; then
    echo "[checks] FAILED: $what: pytest collected no tests" >&2
  elif (( rc != 0 )); then
    echo "[checks] FAILED: $what (exit code $rc)" >&2
  fi
  (( rc == 0 )) || failed+=("$what")
  echo "[checks] $what: $(( $(date +%s) - t0 )) s"
}

step "tiny chat model (cached; a first build trains it for a few minutes)"
quiet=(); if [[ ! -t 1 ]]; then quiet=(--quiet); fi  # no progress bars in a log
"$PY" -m helpers build-tiny "${quiet[@]}"  # everything below needs it: a failure stops here

step "ruff check ."
check "ruff" "$PY" -m ruff check .

step "helper tests: pytest tests"
check "pytest tests/" "$PY" -m pytest -p no:cacheprovider -q tests

for dir in notebooks solutions; do
  [[ -d "$dir" ]] || continue
  if ! find "$dir" -maxdepth 1 -name '*.ipynb' -type f | grep -q .; then
    step "nbval $dir/: no notebooks in $dir/ yet, skipped"
    continue
  fi
  step "notebooks: pytest --nbval-lax $dir/ (COURSE_PROFILE=tiny, offline)"
  # one limit per cell, 20 min, for both nbval and pytest-timeout (whose 900 s default is for tests/)
  check "nbval $dir/" "$PY" -m pytest -p no:cacheprovider -q --nbval-lax --nbval-current-env \
    --nbval-cell-timeout=1200 --timeout=1200 "$dir"
done

echo
if (( ${#failed[@]} )); then
  echo "[checks] FAILED after $(( $(date +%s) - started )) s: $(IFS=,; echo "${failed[*]}" | sed 's/,/, /g')" >&2
  exit 1
fi
echo "[checks] all checks passed in $(( $(date +%s) - started )) s"
