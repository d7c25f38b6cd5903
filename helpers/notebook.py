"""The first cells of every notebook: choose the profile, seed everything, keep the output short, say what runs;
and ``check``, the exercises' self-check.

On Colab the run folders go to Google Drive (``use_drive``), so notebook 05 finds in a new runtime what 04 trained
in another. The tests also run the notebooks on offline stand-ins of the GPU profiles' hub models
(``COURSE_STANDINS=1``, the ``standins`` package beside this one); that switch is read here, and only here.
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import os
import platform
import sys
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

from helpers.profiles import Profile, describe, get_profile

SEED = 42
DRIVE = Path("/content/drive")  # where Colab mounts Google Drive
LIBRARIES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes")


def on_colab() -> bool:
    """True inside a Google Colab runtime (its ``google.colab`` module is loaded there, and only there)."""
    return "google.colab" in sys.modules


def use_drive(folder: str = "MyDrive/dpo-course") -> Path:
    """On Colab: mount Google Drive and send every run's outputs to ``/content/drive/<folder>/outputs``."""
    from google.colab import drive  # type: ignore[import-not-found]  # exists on Colab only

    if Path(folder).is_absolute() or ".." in Path(folder).parts:
        raise ValueError(f"folder must be a path inside your Drive such as 'MyDrive/dpo-course', not {folder!r}")
    if not (DRIVE / "MyDrive").is_dir():
        drive.mount(str(DRIVE))
    target = DRIVE / folder / "outputs"
    target.mkdir(parents=True, exist_ok=True)
    os.environ["COURSE_OUTPUT_DIR"] = str(target)
    found = sorted(p.name for p in (target / "runs").glob("*") if p.is_dir())
    print(f"outputs on Google Drive: {target}" + (f" (runs found: {', '.join(found)})" if found else ""))
    return target


def quiet_libraries() -> None:
    """Library warnings, info logs and per-call progress bars off; errors still show."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for category in (UserWarning, FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets: text bars are fine
    for name in ("transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes", "lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # Imported here, not at the top: only after start() has (in the tests) pointed the hub cache at the stand-ins.
    import datasets
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # a "Loading weights" bar at every from_pretrained
    datasets.disable_progress_bars()  # a bar for every map and filter
    datasets.logging.set_verbosity_error()


def start(profile_name: str | None = None, *, use_drive_on_colab: bool = True, seed: int = SEED) -> Profile:
    """Resolve the profile for this machine, seed python/numpy/torch, print which profile runs and why.

    ``seed`` also becomes the trainers' ``seed`` and ``data_seed`` (``profile.dpo``): benchmarks/seeds.py runs a
    notebook with other seeds to measure how much its results move from run to run.
    """
    if os.environ.get("COURSE_STANDINS"):
        # Tests only. Imported here, not at the top: it must point the hub cache at the stand-ins before any
        # Hugging Face library is imported, and it belongs to the test tooling, not to the course.
        from standins import activate

        profile = activate(profile_name)
    else:
        profile = None
    if use_drive_on_colab and on_colab():
        use_drive()
    quiet_libraries()
    import torch  # here, not at the top: after the stand-ins' switch above and with the libraries' logs quieted
    from transformers import set_seed

    profile = profile or get_profile(profile_name)
    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # the tiny model's matrices gain nothing from more; two notebooks share 2 cores
    set_seed(seed)
    print(describe(profile_name))
    return replace(profile, dpo={**profile.dpo, "seed": seed, "data_seed": seed})


def versions() -> dict[str, str]:
    """Python's and the course libraries' versions, for the version cell of each notebook."""
    found = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def check(name: str, answer: Any, expected: Any, *, tol: float = 0.0, hint: str = "") -> None:
    """An exercise's self-check: print the verdict once, raise AssertionError when wrong (None = not answered).

    Numbers match within ``tol`` (relative and absolute); anything else must be equal.
    """
    if answer is None:
        raise AssertionError(f"{name}: not answered yet - replace the None with your answer. {hint}".strip())
    number = isinstance(expected, int | float) and isinstance(answer, int | float) and not isinstance(answer, bool)
    if isinstance(answer, bool) != isinstance(expected, bool):  # True == 1.0 in Python: not an answer to "how many"
        kind = type(expected).__name__
        raise AssertionError(f"{name}: {answer!r} is not right (a {kind} is expected). {hint}".strip())
    if answer == expected:
        print(f"{name}: exact ✓")
    elif number and math.isclose(answer, expected, rel_tol=tol, abs_tol=tol):
        print(f"{name}: approximately right ✓ (off by {abs(answer - expected):.2g})")
    else:
        raise AssertionError(f"{name}: {answer!r} is not right. {hint}".strip())
