"""Offline stand-ins of what the GPU profiles download, for the tests: not part of the course a learner reads.

The ``t4`` and ``full`` profiles load ``Qwen/Qwen2.5-0.5B-Instruct`` or ``teknium/OpenHermes-2.5-Mistral-7B`` and the
pairs ``Intel/orca_dpo_pairs`` (notebook 11 also ``argilla/distilabel-intel-orca-dpo-pairs``) from the Hugging Face
hub. Nothing in the tests can download, so :mod:`standins.build` makes small look-alikes (the real architectures
at tiny width with random weights, the real tokenizer conventions, generated rows in the real columns) and puts them
where the libraries look when offline: a folder that becomes ``HF_HOME``. The course's own code then runs unchanged,
``from_pretrained("teknium/OpenHermes-2.5-Mistral-7B")`` included.

Switch them on with ``COURSE_STANDINS=1`` (``real``: the Qwen stand-in at Qwen2.5-0.5B's real width, for the GPU
acceptance run). ``helpers.notebook.start`` then calls :func:`activate` before any Hugging Face library is imported:
those libraries read ``HF_HOME`` and the offline switches once, at import. :func:`activate` also gives the profile
the sizes a random stand-in on a CPU needs (:func:`adapt`): the numbers of such a run test the code path, nothing else.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

from helpers.profiles import COURSE_TASK, Profile, get_profile
from standins.build import MARKER, StandinRecipe, build_standins, standins_home

ENV_VAR = "COURSE_STANDINS"
QWEN_ID = "Qwen/Qwen2.5-0.5B-Instruct"
OPENHERMES_ID = "teknium/OpenHermes-2.5-Mistral-7B"
__all__ = ["MARKER", "StandinRecipe", "activate", "adapt", "build_standins", "environment", "standins_home"]


class StandinsActivationError(RuntimeError):
    """The stand-ins were switched on after a Hugging Face library had already read where its cache is."""


def requested_width() -> str | None:
    """``$COURSE_STANDINS`` as a width: "tiny" (1, true, yes, on), "real", or None (off); anything else is refused."""
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if value in {"", "0", "false", "no", "off"}:
        return None
    if value in {"1", "true", "yes", "on", "tiny", "real"}:
        return "real" if value == "real" else "tiny"
    raise ValueError(f"${ENV_VAR}={value!r} is not understood; use 1 (tiny stand-ins), real, or 0 (off)")


def environment(home: str | Path, width: str = "tiny") -> dict[str, str]:
    """The variables that point the Hugging Face libraries at the stand-ins in ``home``, offline (children inherit)."""
    home = Path(home).resolve()
    return {"HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"), "HF_DATASETS_CACHE": str(home / "datasets"),
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            ENV_VAR: "real" if width == "real" else "1"}


def _too_late(env: dict[str, str]) -> list[str]:
    """The already-imported libraries that read their cache settings from elsewhere than ``env``."""
    def same(a, b) -> bool:
        return os.path.realpath(os.path.expanduser(str(a))) == os.path.realpath(str(b))

    late = []
    hub = sys.modules.get("huggingface_hub.constants")
    if hub is not None and not (same(hub.HF_HUB_CACHE, env["HF_HUB_CACHE"]) and hub.HF_HUB_OFFLINE):
        late.append(f"huggingface_hub (HF_HUB_CACHE={hub.HF_HUB_CACHE})")
    config = sys.modules.get("datasets.config")
    if config is not None and not (same(config.HF_DATASETS_CACHE, env["HF_DATASETS_CACHE"]) and config.HF_HUB_OFFLINE):
        late.append(f"datasets (HF_DATASETS_CACHE={config.HF_DATASETS_CACHE})")
    return late


def activate_cache(width: str | None = None) -> Path:
    """Build the stand-ins if needed and point the Hugging Face libraries at them; returns the folder (``HF_HOME``).

    Refuses (:class:`StandinsActivationError`, nothing changed) when a Hugging Face library already reads its cache
    elsewhere: it would keep looking there.
    """
    width = width or requested_width() or "tiny"
    recipe = StandinRecipe(width=width)
    env = environment(standins_home(recipe), width)
    late = _too_late(env)
    if late:
        raise StandinsActivationError(
            "the stand-ins came too late: " + "; ".join(late) + " already read its cache location. Set "
            f"{ENV_VAR}=1 before anything imports transformers, datasets, trl or peft (in a notebook: restart the "
            "kernel and run the first cells in order).")
    os.environ.update(env)
    return build_standins(recipe)


def adapt(profile: Profile) -> Profile:
    """The profile as a random stand-in on a CPU runs it: the course's own lm-eval task (the card's suite needs the
    hub), small sampling and training sizes for notebooks 08, 10 and 11, a judge floor of 0 (a reward model on random
    weights ranks pairs by chance) and never a push to the hub. The tiny profile is returned unchanged."""
    if profile.name == "tiny":
        return profile
    small = dict(prompts_per_round=16, max_new_tokens=32, round_steps=4, reward_steps=4, online_steps=2,
                 warmup_steps=1, min_judge_accuracy=0.0)
    return replace(
        profile,
        real_model=False,
        lm_eval={**profile.lm_eval, "tasks": [COURSE_TASK], "metrics": {COURSE_TASK: "acc"}, "limit": None},
        beyond={**profile.beyond, "steps": 4, "answers": 8},
        on_policy={**profile.on_policy, **small},
        audit={**profile.audit, "reward_steps": 4, "train_steps": 4, "min_judge_accuracy": 0.0},
        why={**profile.why, "standins": "OFFLINE STAND-INS: random-weight look-alikes of the hub model and data: "
             "the numbers test the code path only and say nothing about the real recipe"},
    )


def activate(profile_name: str | None = None) -> Profile:
    """Activate the stand-ins (:func:`activate_cache`), print a line saying so, and return the profile for them."""
    activate_cache()
    profile = adapt(get_profile(profile_name, allow_cpu=True))
    print(f"OFFLINE STAND-INS (profile {profile.name}): random-weight look-alikes of {profile.model_id} and "
          f"{profile.dataset} - NOT the real model and data; the numbers test the code path only.")
    return profile
