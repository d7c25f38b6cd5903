"""The first cells every notebook runs: choose the profile, seed everything, quiet the logs, say what runs."""

from __future__ import annotations

import logging
import os
import platform
import sys
import warnings

from helpers.colab import on_colab
from helpers.colab import use_drive as drive_outputs
from helpers.profiles import Profile, describe_profile, get_profile
from helpers.standins import activate_standins, standin_note, standins_active

SEED = 42


def quiet_libraries() -> None:
    """Keep notebook outputs short: library warnings and info logs off, errors still shown."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets: text bars
    for name in ("transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes", "lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # "Loading weights" bars on every from_pretrained
    import datasets

    datasets.disable_progress_bars()  # map/filter bars: one per call would flood the outputs
    datasets.logging.set_verbosity_error()  # "Using the latest cached version ... (offline mode is enabled)" + a path
    show = warnings.showwarning
    if not getattr(show, "course_short", False):
        warnings.showwarning = _short_warnings(show)


def _short_warnings(show):
    """The course's own warnings (``DataWarning``) printed as ``Name: message``, without the file path and line of
    the helper that raised them (a path of this machine, and noise for a learner); others as before."""
    from helpers.data import DataWarning  # here, not at the top: helpers.data imports the datasets library

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, DataWarning):
            print(f"{category.__name__}: {message}", file=file or sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)

    showwarning.course_short = True
    return showwarning


def start(profile_name: str | None = None, seed: int = SEED, *, use_drive: bool = True) -> Profile:
    """Resolve and return the profile, seed python/numpy/torch, and print which profile runs and why.

    On Colab with ``use_drive`` (the notebooks' ``USE_DRIVE`` parameter, on by default) Google Drive is mounted and
    the run folders go there (:func:`helpers.colab.use_drive`), so notebook 05 finds in a new runtime what 04
    trained in another. Off Colab ``use_drive`` changes nothing.

    With the offline stand-ins switched on (``$COURSE_STANDINS=1``) the first line printed says so, and the lines
    after the profile say what running on a CPU changes. The Hugging Face libraries are imported only here, after
    the stand-ins (if any) have pointed them at their cache, and after their logs are quieted.
    """
    if standins_active():
        activate_standins()
        print(standin_note(profile_name or os.environ.get("COURSE_PROFILE", "")))
    if use_drive and on_colab():
        drive_outputs()
    quiet_libraries()  # first: importing transformers pulls in bitsandbytes, which logs on import
    import torch
    from transformers import set_seed

    profile = get_profile(profile_name)
    if not torch.cuda.is_available():
        # One thread: the tiny model's matrices are too small to gain from more, and on a busy machine two
        # spinning threads per process run several times slower. Fixed, so results are bit-for-bit repeatable.
        torch.set_num_threads(int(os.environ.get("COURSE_TORCH_THREADS", "1")))
    set_seed(seed)
    print(describe_profile(profile_name))  # the name as asked: "asked for explicitly" only when it was
    for setting, why in profile.differences.items():
        if setting.startswith("cpu."):
            print(f"  on this CPU, {setting[4:]}: {why}")
    return profile


def versions() -> dict[str, str]:
    """Versions of the libraries the course depends on, for the version cell of each notebook."""
    import importlib.metadata as md

    names = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes")
    found = {"python": platform.python_version()}
    for name in names:
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            found[name] = "not installed"
    return found
