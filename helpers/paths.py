"""Where things live: the repository, the shipped data, the tiny-model cache and the run folders."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data"
# The environment of every offline run (CI, the course command, the tests' subprocesses, the benchmarks): no hub,
# the tiny profile, deterministic hashing, no tokenizer thread pool.
OFFLINE_ENV = {
    "COURSE_PROFILE": "tiny",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONHASHSEED": "0",
}


def cache_dir() -> Path:
    """Built artefacts that can be rebuilt (the tiny model): $COURSE_CACHE_DIR or .cache/ in the repo."""
    return Path(os.environ.get("COURSE_CACHE_DIR", REPO_ROOT / ".cache"))


def outputs_dir() -> Path:
    """Run outputs (adapters, merged models, plots, results): $COURSE_OUTPUT_DIR or outputs/ in the repo."""
    return Path(os.environ.get("COURSE_OUTPUT_DIR", REPO_ROOT / "outputs"))


def run_dir(profile_name: str, run_id: str = "main") -> Path:
    """The folder of one run: ``outputs/runs/<profile>-<run_id>``; later notebooks find artefacts here.

    Named by profile and run id so the outputs of one run cannot be mistaken for another's.
    """
    if not run_id or any(c in run_id for c in "/\\ ") or run_id.startswith("."):
        raise ValueError(f"run_id must be a plain name without spaces or slashes, not {run_id!r}")
    return outputs_dir() / "runs" / f"{profile_name}-{run_id}"


def display_path(path: str | Path) -> str:
    """``path`` relative to the repository when inside it (short, and free of this machine's folders)."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)
