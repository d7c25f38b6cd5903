#!/usr/bin/env bash
# Set up the course's Python environment; safe to run again (it skips what is already done).
#
#   local machine: .venv/ in the repo root, torch==2.13.0 (CPU build when there is no CUDA GPU),
#                  requirements.txt, and `pip install -e .` so that `import helpers` works anywhere.
#   Colab:         the kernel's own Python (PYTHON=..., which the notebooks' install cell passes: its
#                  sys.executable; else python3 from the PATH) and its CUDA torch are kept (torch 2.6 or newer:
#                  transformers switches an older one off); requirements-colab.txt (the same pins without local
#                  Jupyter/test tooling) and `pip install -e .` go into it.
#
# Nothing is registered globally (no user-wide Jupyter kernel, no system packages).
# Optional: TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu for a small CPU torch wheel elsewhere.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TORCH_VERSION="2.13.0"
say() { printf '[setup] %s\n' "$*"; }
started=$(date +%s)

if [[ -d /content || -n "${COLAB_RELEASE_TAG:-}" ]]; then
  on_colab=1
  PY="${PYTHON:-$(command -v python3 || command -v python)}"
  MARKER="$ROOT/.cache/.course-installed"
  if ! "$PY" -c 'pass' 2>/dev/null; then
    say "error: $PY does not run; pass the notebook's own Python: PYTHON=/path/to/python bash $0" >&2
    exit 1
  fi
  say "Colab detected: installing into $PY ($("$PY" --version 2>&1)), keeping its torch"
else
  on_colab=0
  VENV="$ROOT/.venv"
  PY="$VENV/bin/python"
  MARKER="$VENV/.course-installed"
  if [[ ! -x "$PY" ]]; then
    BASE="$(command -v python3.11 || command -v python3 || true)"
    if [[ -z "$BASE" ]] || ! "$BASE" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      say "error: Python 3.11 or newer is needed (found: ${BASE:-none})" >&2
      exit 1
    fi
    say "creating .venv with $("$BASE" --version 2>&1)"
    "$BASE" -m venv "$VENV"
  fi
  if ! "$PY" -c 'pass' 2>/dev/null; then
    say "error: $PY does not run (was the repository moved?); delete .venv and run this script again" >&2
    exit 1
  fi
  say "python: .venv ($("$PY" --version 2>&1))"
fi

# What the installed environment was made from; unchanged (and still importable) means nothing to do.
want="$( { cat requirements.txt requirements-colab.txt pyproject.toml scripts/setup_env.sh; "$PY" --version 2>&1; echo "colab=$on_colab $PY"; } \
  | sha256sum | cut -d' ' -f1)"
installed_ok() {
  [[ -f "$MARKER" && "$(cat "$MARKER")" == "$want" ]] || return 1
  # run from / so that the repo folder itself does not make `helpers` importable
  (cd / && ROOT="$ROOT" "$PY" - <<'PY' 2>/dev/null
import importlib.util, os, sys
from pathlib import Path
spec = importlib.util.find_spec("helpers")
ok = importlib.util.find_spec("torch") is not None and spec is not None and spec.origin is not None
sys.exit(0 if ok and Path(spec.origin).resolve().parent == Path(os.environ["ROOT"]).resolve() / "helpers" else 1)
PY
  )
}
if installed_ok; then
  say "up to date (requirements.txt and pyproject.toml unchanged since the last install): skipping pip"
  exit 0
fi

# pip, quiet; a pip.conf that lists local index folders makes pip warn once per package: those lines are dropped.
pip_install() {
  "$PY" -m pip install --quiet --progress-bar off "$@" 2>&1 | { grep -v "^WARNING: Location 'file:" || true; }
}
torch_installed() {
  "$PY" -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null || true
}

# 1. torch: installed first, on its own, so nothing later picks the build.
current="$(torch_installed)"
if (( on_colab )); then
  [[ -n "$current" ]] || { say "error: Colab's torch is missing; restart the runtime" >&2; exit 1; }
  # transformers 5.24 switches torch off below 2.6 (transformers.utils.import_utils.is_torch_available)
  if ! "$PY" -c 'import sys; v = sys.argv[1].split("+")[0].split("."); sys.exit((int(v[0]), int(v[1])) < (2, 6))' "$current"; then
    say "error: torch $current is too old for transformers 5.24 (it needs 2.6 or newer): Runtime -> Change runtime type -> pick the newest runtime version" >&2
    exit 1
  fi
  say "torch $current (Colab's own, kept)"
elif [[ "${current%%+*}" == "$TORCH_VERSION" ]]; then
  say "torch $current already installed"
else
  index_args=()
  if [[ -n "${TORCH_INDEX_URL:-}" ]]; then index_args=(--index-url "$TORCH_INDEX_URL"); fi
  if command -v nvidia-smi >/dev/null 2>&1; then
    say "CUDA GPU found: installing torch==$TORCH_VERSION${current:+ (replacing $current)}"
  else
    say "no CUDA GPU (nvidia-smi not found): installing torch==$TORCH_VERSION, CPU build${current:+ (replacing $current)}"
  fi
  pip_install "${index_args[@]}" "torch==$TORCH_VERSION"
  current="$(torch_installed)"
  say "torch $current installed"
fi

# 2. requirements.txt, with the installed torch pinned so that no dependency can replace it.
#    On Colab requirements-colab.txt: the same pins without the local Jupyter and test tooling.
requirements=requirements.txt
if (( on_colab )); then requirements=requirements-colab.txt; fi
keep_torch="$(mktemp)"
trap 'rm -f "$keep_torch"' EXIT
echo "torch==$current" > "$keep_torch"
say "installing $requirements (pinned versions; a first install takes a few minutes)"
pip_install -r "$requirements" -c "$keep_torch"

# 3. the course's own package, editable: `import helpers` works from notebooks/ and anywhere else.
say "installing helpers (pip install -e .)"
pip_install --no-deps -e .

mkdir -p "$(dirname "$MARKER")"
echo "$want" > "$MARKER"
say "done in $(( $(date +%s) - started )) s"
