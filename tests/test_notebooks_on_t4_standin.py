"""Notebooks 04-06 and 11 on a free Colab T4's path: the `t4` profile's cells on the offline stand-ins of
Qwen2.5-0.5B-Instruct and Intel/orca_dpo_pairs (tests only, standins/): a Qwen2 with q/k/v biases and tied
embeddings, a byte-level BPE tokenizer and Qwen's own chat template, trained in 4-bit, merged and evaluated in one
output folder as a learner's Colab runs go from one notebook to the next. Every cell must run; only the exercise
checks (tagged ``raises-exception``) may fail. See tests/test_notebooks_on_full_standin.py for every notebook on
`full`."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

from helpers.profiles import REPO_ROOT
from scripts.nbtools import run_on_standin

PROFILE = "t4"
NOTEBOOKS = ["04_dpo_training", "05_merging", "06_evaluation", "11_data_audit"]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp(f"{PROFILE}-notebooks")


def stream_text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_the_notebook_runs_top_to_bottom(name, outputs):
    run_on_standin(REPO_ROOT / "notebooks" / f"{name}.ipynb", PROFILE, outputs)
    nb = nbformat.read(outputs / "executed" / f"{name}.ipynb", as_version=4)
    start = next(c for c in nb.cells if "notebook.start(" in c.source)
    assert stream_text(start).startswith(f"OFFLINE STAND-INS (profile {PROFILE})"), "the first line must say so"


def test_the_recipe_trained_in_4bit_and_merged(outputs):
    run = outputs / "runs" / f"{PROFILE}-main"
    if not (run / "adapter").is_dir():
        pytest.skip("notebook 04 did not run in this session (run the whole file)")
    profile = json.loads((run / "adapter" / "course_profile.json").read_text())
    assert profile["name"] == PROFILE and profile["bnb"]["load_in_4bit"] is True
    assert profile["dpo"]["gradient_checkpointing"] is True
    assert (run / "merged" / "config.json").is_file()
