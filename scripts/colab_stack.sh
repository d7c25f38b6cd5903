#!/usr/bin/env bash
# Colab's GPU runtime, rebuilt on this machine, and the course installed and run in it the way a learner does.
#
#   bash scripts/colab_stack.sh            # everything below, in order; each step skips what is already done
#   bash scripts/colab_stack.sh build      # 1. the image: Python 3.13, torch 2.11.0, Colab's preinstalled versions
#   bash scripts/colab_stack.sh install    # 2. a fresh runtime (a copy of the image) + the notebooks' install cell
#   bash scripts/colab_stack.sh run        # 3. every notebook on tiny, 04-06 on the t4 stand-in; the result block
#   bash scripts/colab_stack.sh built      # exit 0 when the image is built (what the test command asks)
#
# The image copies Colab's GPU image of August 2026 (Python 3.13, torch 2.11.0+cu128, numpy 2.1.3, pandas 2.2.3,
# fsspec 2025.3.0, pyarrow 18.1, transformers 5.15, accelerate 1.14, peft 0.20, datasets 4.0, huggingface_hub
# 1.27) and the preinstalled packages that pin huggingface-hub<2.0 (gradio, gradio_client, diffusers). torch comes
# from PyPI: its default CUDA build (2.11.0 for CUDA 13.0, where Colab has the CUDA 12.8 one: the same Python code),
# about 5.6 GB on disk with the rest, downloaded the first time; it never runs on a GPU here. Everything lives in
# .cache/colab-sim/ (git-ignored): image/ is built once and never changed, runtime/ is a hard-linked copy made fresh
# for each install (seconds), so a rerun of `install` and `run` takes minutes. Needs python3.13 (pyenv) and PyPI.
# The result block (versions, pass/fail, times, date) is printed and written to .cache/colab-sim/result.md.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SIM="$ROOT/.cache/colab-sim"
IMAGE="$SIM/image"      # the Colab image: built once, never installed into again
RUNTIME="$SIM/runtime"  # one learner's runtime: a fresh copy of the image for each `install`
say() { printf '[colab-sim] %s\n' "$*"; }

# What Colab's image has before the course touches it. torch first and alone, then the rest under a constraint
# that keeps it. gradio/gradio_client/diffusers: the newest releases that declare huggingface-hub<2.0 and accept
# hub 1.27 (gradio 6.29, gradio_client 2.7.2 and diffusers 0.41 moved on: <3.0, or hub>=1.32). python-dateutil,
# matplotlib, tqdm, ipykernel: Colab's long-standing versions (its google-cloud-bigquery and bigframes declare
# python-dateutil<3; the kernel runs the notebooks here too).
TORCH="torch==2.11.0"
COLAB_PACKAGES=(
  numpy==2.1.3 pandas==2.2.3 fsspec==2025.3.0 pyarrow==18.1.0
  transformers==5.15.0 accelerate==1.14.0 peft==0.20.0 datasets==4.0.0 huggingface_hub==1.27.0
  gradio==6.28.0 gradio_client==2.7.1 diffusers==0.40.0 sentence-transformers==6.3.0
  python-dateutil==2.9.0.post0 matplotlib==3.10.0 tqdm==4.67.1 ipykernel==6.17.1 nbclient nbconvert nbformat
)
image_key="$(printf '%s\n' "$TORCH" "${COLAB_PACKAGES[@]}" | sha256sum | cut -c1-16)"

find_python313() {
  local candidate
  for candidate in "${COLAB_PYTHON:-}" "$(command -v python3.13 || true)" "$(pyenv which python3.13 2>/dev/null || true)" \
      "$HOME"/.pyenv/versions/3.13*/bin/python3.13; do
    if [[ -n "$candidate" && -x "$candidate" ]]; then echo "$candidate"; return 0; fi
  done
  return 1
}

# pip, quiet; this machine's pip.conf lists local index folders that make pip warn once per package: dropped.
pip_in() {
  local py="$1"; shift
  "$py" -m pip install --progress-bar off --disable-pip-version-check "$@" 2>&1 \
    | { grep -v -e "^WARNING: Location 'file:" -e '^Requirement already satisfied' -e '^Looking in' || true; }
}

built() { [[ -x "$IMAGE/bin/python" && "$(cat "$IMAGE/.colab-image" 2>/dev/null)" == "$image_key" ]]; }

build() {
  if built; then say "image up to date: $IMAGE"; return 0; fi
  local base
  base="$(find_python313)" || { say "error: python3.13 not found (pyenv install 3.13, or set COLAB_PYTHON)" >&2; exit 1; }
  [[ -x "$IMAGE/bin/python" ]] || { say "creating the image's Python 3.13 ($base)"; "$base" -m venv "$IMAGE"; }
  local have
  have="$("$IMAGE/bin/python" -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null || true)"
  if [[ "${have%%+*}" != "${TORCH#torch==}" ]]; then
    say "installing $TORCH from PyPI (a CUDA build: several GB, the first time only)"
    pip_in "$IMAGE/bin/python" --quiet "$TORCH"
  fi
  local keep
  keep="$(mktemp)"
  "$IMAGE/bin/python" -c 'import importlib.metadata as m; print("torch==" + m.version("torch"))' > "$keep"
  say "installing Colab's preinstalled versions: ${COLAB_PACKAGES[*]}"
  pip_in "$IMAGE/bin/python" --quiet -c "$keep" "${COLAB_PACKAGES[@]}"
  rm -f "$keep"
  "$IMAGE/bin/python" -m pip freeze --all > "$SIM/image-freeze.txt"
  echo "$image_key" > "$IMAGE/.colab-image"
  say "image built: $(grep -c . "$SIM/image-freeze.txt") packages ($SIM/image-freeze.txt)"
}

# The install cell of every notebook (scripts/nbtools.py INSTALL_CELL), run by the runtime's own Python with a
# google.colab module present, COURSE_DIR pointing at this checkout (it is already "cloned": no network needed).
install() {
  built || { say "error: no image yet: run 'bash scripts/colab_stack.sh build' first" >&2; exit 1; }
  say "a fresh runtime: hard-linked copy of the image"
  rm -rf "$RUNTIME" "$SIM/content"
  cp -al "$IMAGE" "$RUNTIME"
  # the image's console scripts (jupyter-nbconvert, ...) start with #!<image>/bin/python: point them at the copy
  # (sed -i writes a new file, so the image's hard-linked original is left as it was)
  grep -l -s "^#!$IMAGE/bin/" "$RUNTIME"/bin/* | xargs -r sed -i "1s|^#!$IMAGE/bin/|#!$RUNTIME/bin/|"
  mkdir -p "$SIM/content"
  ln -s "$ROOT" "$SIM/content/neuralhermes-dpo-course"
  local py="$RUNTIME/bin/python" started
  started=$(date +%s)
  # the cell as stamped into the notebooks, COURSE_DIR moved from /content to $SIM/content
  "$py" -c 'import sys; sys.path.insert(0, sys.argv[1]); from scripts.nbtools import INSTALL_CELL; print(INSTALL_CELL)' \
    "$ROOT" | sed "s|\"/content/|\"$SIM/content/|" > "$SIM/install_cell.py"
  say "running the notebooks' install cell twice in a new kernel ($("$py" --version)); the second run must skip"
  (cd "$SIM/content" && PATH="$RUNTIME/bin:$PATH" COLAB_RELEASE_TAG=colab-sim "$py" - "$SIM/install_cell.py" <<'PY'
import sys
import types

sys.modules["google.colab"] = types.ModuleType("google.colab")  # what a Colab kernel has, and the cell looks for
namespace = {}
for attempt in ("first run", "second run"):
    print(f"[colab-sim] install cell, {attempt}", flush=True)
    exec(compile(open(sys.argv[1]).read(), "install cell", "exec"), namespace)
PY
  ) 2>&1 | tee "$SIM/install.log"
  echo "$(( $(date +%s) - started ))" > "$SIM/install-seconds"
  "$py" -m pip freeze --all > "$SIM/runtime-freeze.txt"
  say "versions the course install moved (Colab's image -> after the install cell):"
  moved | tee "$SIM/moved.txt"
  say "pip check:"
  { "$py" -m pip check || true; } 2>&1 | tee "$SIM/pip-check.txt"
  touch "$RUNTIME/.course-installed-by-cell"
}

moved() {
  python3 - "$SIM/image-freeze.txt" "$SIM/runtime-freeze.txt" <<'PY'
import re
import sys


def read(path):
    pins = {}
    for line in open(path):
        if "==" in line and not line.startswith("#"):
            name, version = line.strip().split("==", 1)
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


before, after = read(sys.argv[1]), read(sys.argv[2])
for name in sorted(before.keys() | after.keys()):
    if before.get(name) != after.get(name):
        print(f"  {name:24} {before.get(name, '-'):>14} -> {after.get(name, '-')}")
PY
}

run_notebooks() {
  [[ -f "$RUNTIME/.course-installed-by-cell" ]] || { say "error: run 'bash scripts/colab_stack.sh install' first" >&2; exit 1; }
  local py="$RUNTIME/bin/python" out="$SIM/outputs" status=0 started
  rm -rf "$out"
  mkdir -p "$out/executed"
  export PATH="$RUNTIME/bin:$PATH" VIRTUAL_ENV="$RUNTIME" JUPYTER_PATH="$RUNTIME/share/jupyter"
  export COURSE_OUTPUT_DIR="$out" COURSE_PROFILE=tiny HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
  export TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1 PYTHONHASHSEED=0 MPLBACKEND=Agg COURSE_CACHE_DIR="$SIM/cache"
  export PYDEVD_DISABLE_FILE_VALIDATION=1  # ipykernel 6.17's debugger warns about frozen modules on every start
  mapfile -t notebooks < <(find notebooks -maxdepth 1 -name '[0-9][0-9]_*.ipynb' | LC_ALL=C sort)
  say "every notebook on the tiny profile (two at a time): executed copies in ${out#"$ROOT"/}/executed"
  started=$(date +%s)
  if "$py" scripts/nbtools.py course "$out/executed" "${notebooks[@]}" 2>&1 | tee "$SIM/tiny.log"; then
    echo "tiny pass $(( $(date +%s) - started ))" > "$SIM/tiny.status"
  else
    echo "tiny FAIL $(( $(date +%s) - started ))" > "$SIM/tiny.status"; status=1
  fi
  : > "$SIM/t4.status"
  for nb in notebooks/04_*.ipynb notebooks/05_*.ipynb notebooks/06_*.ipynb; do
    say "$(basename "$nb") on the t4 stand-in (short run)"
    started=$(date +%s)
    if "$py" - "$nb" "$out/standins/t4" <<'PY' 2>&1 | tail -n 30 | tee -a "$SIM/t4.log"; then
import sys
from pathlib import Path

from scripts.nbtools import run_on_standin

print(f"ok in {run_on_standin(Path(sys.argv[1]), 't4', Path(sys.argv[2])):.0f} s")
PY
      echo "$(basename "$nb") pass $(( $(date +%s) - started ))" >> "$SIM/t4.status"
    else
      echo "$(basename "$nb") FAIL $(( $(date +%s) - started ))" >> "$SIM/t4.status"; status=1
    fi
  done
  report | tee "$SIM/result.md"
  return "$status"
}

report() {
  local py="$RUNTIME/bin/python" tiny
  read -r _ tiny_result tiny_seconds < "$SIM/tiny.status"
  tiny="$(grep -c ' ok ' "$SIM/tiny.log" || true)"
  echo "Colab stack, simulated ($(date -u +%Y-%m-%d), scripts/colab_stack.sh):"
  "$py" - <<'PY'
import importlib.metadata as m
import platform

names = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "huggingface_hub", "bitsandbytes",
         "numpy", "pandas", "pyarrow", "fsspec", "gradio", "diffusers")
print(f"  python {platform.python_version()}; " + ", ".join(f"{n} {m.version(n)}" for n in names))
PY
  echo "  moved by the install cell: $(awk '$2 != "-" {printf "%s%s %s -> %s", sep, $1, $2, $4; sep=", "}' "$SIM/moved.txt")"
  echo "  install cell: $(cat "$SIM/install-seconds") s; pip check: $(tail -n 1 "$SIM/pip-check.txt")"
  local kernels
  kernels="$(grep -l -s "'python': '3.13" "$SIM/outputs/executed/"*.ipynb | wc -l)"
  echo "  tiny, every notebook: $tiny_result ($tiny notebooks ok, ${tiny_seconds} s two at a time; the kernel ran" \
    "Python 3.13 in $kernels of them)"
  while read -r name result seconds; do echo "  t4 stand-in, $name: $result ($seconds s)"; done < "$SIM/t4.status"
  echo "  load average at the end: $(cut -d' ' -f1-3 /proc/loadavg) (wall-clock times on this machine)"
}

case "${1:-all}" in
  built) if built; then say "image built: $IMAGE"; else say "no image: bash scripts/colab_stack.sh build"; exit 1; fi ;;
  build) build ;;
  install) install ;;
  run) run_notebooks ;;
  all) build; install; run_notebooks ;;
  *) sed -n '2,8p' "$0"; exit 2 ;;
esac
