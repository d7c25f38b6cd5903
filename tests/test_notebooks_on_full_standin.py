"""Every notebook on the recipe's own path: the `full` profile's cells, executed top to bottom on the offline
stand-ins (tests only: random-weight look-alikes of OpenHermes-2.5-Mistral-7B and Intel/orca_dpo_pairs served under
their hub ids, standins/).

An A100 learner runs every notebook with `full`: a Mistral in 4-bit NF4 with gradient checkpointing, a
sentencepiece-style tokenizer that puts `<s>` first, the card's suite of lm-eval tasks. Each notebook runs here with
its own short-run parameters (its metadata `course.short_run`: a few steps of everything) in one output folder, in
course order, as a learner's run goes from one notebook to the next. Every cell must run; only the exercise checks
(tagged ``raises-exception``) may fail, as they do until a learner answers them. The numbers say nothing about the
real recipe: the point is that no cell stops.
"""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

from helpers.profiles import REPO_ROOT
from scripts.nbtools import run_on_standin

PROFILE = "full"
NOTEBOOKS = sorted(p.stem for p in (REPO_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp(f"{PROFILE}-notebooks")


def stream_text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")


def runs_top_to_bottom(name: str, profile: str, outputs: Path) -> None:
    """Run notebook ``name`` on ``profile``'s stand-in; every cell must pass and the first line must say so."""
    run_on_standin(REPO_ROOT / "notebooks" / f"{name}.ipynb", profile, outputs)
    nb = nbformat.read(outputs / "executed" / f"{name}.ipynb", as_version=4)
    start = next(c for c in nb.cells if "notebook.start(" in c.source)
    assert stream_text(start).startswith(f"OFFLINE STAND-INS (profile {profile})"), "the first line must say so"


def trained_in_4bit_and_merged(profile: str, outputs: Path) -> None:
    """Notebook 04's run in ``outputs`` trained ``profile``'s recipe in 4-bit with checkpointing; 05 merged it."""
    run = outputs / "runs" / f"{profile}-main"
    if not (run / "adapter").is_dir():
        pytest.skip("notebook 04 did not run in this session (run the whole file)")
    saved = json.loads((run / "adapter" / "course_profile.json").read_text())
    assert saved["name"] == profile and saved["bnb"]["load_in_4bit"] is True
    assert saved["dpo"]["gradient_checkpointing"] is True
    assert (run / "merged" / "config.json").is_file()


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_the_notebook_runs_top_to_bottom(name, outputs):
    runs_top_to_bottom(name, PROFILE, outputs)


def test_the_recipe_trained_in_4bit_and_merged(outputs):
    trained_in_4bit_and_merged(PROFILE, outputs)
