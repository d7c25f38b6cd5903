#!/usr/bin/env bash
# What CI runs: set up, build the offline stand-ins, then ruff, the helper tests (pytest tests/, two workers) and every
# notebook and solution executed by nbval (pytest --nbval-lax, two lanes) with the tiny profile and no network.
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

step "offline stand-ins of the GPU profiles' hub models and data (tests only; cached, seconds to build)"
"$PY" -c "from standins.build import build_standins; build_standins()"  # the GPU paths' tests share them

step "ruff check ."
check "ruff" "$PY" -m ruff check .

step "helper tests: pytest tests (two workers, a test file per worker, the longest files first: tests/conftest.py)"
check "pytest tests/" "$PY" -m pytest -p no:cacheprovider -q -n 2 --dist loadfile --no-loadscope-reorder tests

# nbval: every notebook, then its solutions, in two lanes side by side (scripts/nbtools.py lanes): the notebooks
# that read each other's run folders (04 -> 05 -> 06, 09, 10) in course order in one, the others in the other.
# One limit per cell, 20 min, for both nbval and pytest-timeout (whose 900 s default is for tests/).
if find notebooks -maxdepth 1 -name '*.ipynb' -type f | grep -q .; then
  step "notebooks and solutions: pytest --nbval-lax, two lanes (COURSE_PROFILE=tiny, offline)"
  mapfile -t lane_lines < <("$PY" scripts/nbtools.py lanes)
  logs="$(mktemp -d)"
  pids=()
  for i in "${!lane_lines[@]}"; do
    read -r -a lane <<< "${lane_lines[$i]}"
    (( ${#lane[@]} )) || continue
    "$PY" -m pytest -p no:cacheprovider -q --nbval-lax --nbval-current-env \
      --nbval-cell-timeout=1200 --timeout=1200 "${lane[@]}" > "$logs/lane$i.log" 2>&1 &
    pids+=("$!:$i")
  done
  for entry in "${pids[@]}"; do
    pid="${entry%%:*}" i="${entry##*:}" rc=0
    wait "$pid" || rc=$?
    echo "[checks] nbval lane $i: ${lane_lines[$i]}"
    tail -n 25 "$logs/lane$i.log"
    if (( rc != 0 )); then
      echo "[checks] FAILED: nbval lane $i (exit code $rc)" >&2
      failed+=("nbval lane $i")
    fi
  done
  rm -rf "$logs"
else
  step "nbval: no notebooks in notebooks/ yet, skipped"
fi

echo
if (( ${#failed[@]} )); then
  echo "[checks] FAILED after $(( $(date +%s) - started )) s: $(IFS=,; echo "${failed[*]}" | sed 's/,/, /g')" >&2
  exit 1
fi
echo "[checks] all checks passed in $(( $(date +%s) - started )) s"
