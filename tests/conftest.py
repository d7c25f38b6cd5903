"""Shared fixtures. The tests run offline: the hub variables are set before transformers is imported."""

from __future__ import annotations

import os

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_var] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_path() -> Path:
    """The tiny chat model's folder, built once (about a minute) and then reused from the repo's .cache/."""
    from helpers.tiny_model import build_tiny_model

    return build_tiny_model(progress=False)


@pytest.fixture(scope="module")
def profile():
    """The tiny profile (the one every helper test runs on)."""
    from helpers.profiles import get_profile

    return get_profile("tiny")


@pytest.fixture(scope="module")
def tokenizer(profile, tiny_model_path):
    """The tiny model's tokenizer, loaded and checked the way the course loads it."""
    from helpers.loading import load_tokenizer

    return load_tokenizer(profile, str(tiny_model_path))
