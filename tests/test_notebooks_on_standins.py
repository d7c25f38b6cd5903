"""Notebooks 04-06 on the t4 profile's path: their cells, executed top to bottom on the offline stand-ins.

The notebooks' committed outputs are the tiny profile's (nbval compares those). Here a copy of each runs with
``COURSE_STANDINS=1 COURSE_PROFILE=t4`` - a Qwen2 of the real structure at tiny width, loaded in 4-bit NF4 with
gradient checkpointing, trained 2 steps on a stand-in of Intel/orca_dpo_pairs - through training (04), merging and
the QLoRA merge gap (05) and evaluation with lm-eval through the hub id (06), in one output folder, as a learner's
Colab run would go from one notebook to the next. Every cell must run; only the exercise checks (tagged
``raises-exception``) may fail, as they do until a learner answers them.
"""

from __future__ import annotations

import json

import nbformat
import pytest

from helpers.paths import REPO_ROOT
from scripts.nbtools import execute_copy

NOTEBOOKS = ("04_dpo_training", "05_merging", "06_evaluation")
PARAMETERS = {"04_dpo_training": {"MAX_STEPS": 2}}


@pytest.fixture(scope="module")
def executed(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("t4-notebooks")
    env = {
        "COURSE_STANDINS": "1",
        "COURSE_PROFILE": "t4",
        "COURSE_OUTPUT_DIR": str(root / "outputs"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "MPLBACKEND": "Agg",
        "TOKENIZERS_PARALLELISM": "false",
        "CUDA_VISIBLE_DEVICES": "",
    }
    notebooks = {}
    for name in NOTEBOOKS:
        out = root / f"{name}.ipynb"
        execute_copy(REPO_ROOT / "notebooks" / f"{name}.ipynb", out, parameters=PARAMETERS.get(name, {}), env=env)
        notebooks[name] = nbformat.read(out, as_version=4)
    return {"root": root, "notebooks": notebooks, "run": root / "outputs" / "runs" / "t4-main"}


def _text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")


def test_every_notebook_says_first_that_it_runs_on_standins(executed) -> None:
    for name, nb in executed["notebooks"].items():
        start = next(c for c in nb.cells if "notebook.start(" in c.source)
        assert _text(start).startswith("OFFLINE STAND-INS (profile t4)"), name


def test_04_trained_the_t4_standin_in_4bit_for_the_steps_asked(executed) -> None:
    profile = json.loads((executed["run"] / "adapter" / "course_profile.json").read_text())
    assert profile["name"] == "t4" and profile["quantization"]["load_in_4bit"] is True
    assert profile["training"]["max_steps"] == 2
    assert json.loads((executed["run"] / "history.json").read_text())[-1]["step"] == 2


def test_05_merged_and_found_the_qlora_gap_of_the_4bit_run(executed) -> None:
    assert (executed["run"] / "merged" / "config.json").is_file()
    nb = executed["notebooks"]["05_merging"]
    gap_check = next(c for c in nb.cells if "the merge into the dequantised weights is the trained model" in c.source)
    assert "the merge into the dequantised weights is the trained model" in _text(gap_check)


def test_06_evaluated_hub_rows_and_wrote_a_results_file_that_says_standins(executed) -> None:
    results = json.loads((executed["run"] / "eval_results.json").read_text())
    assert "NOT the real model" in results["standins"]
    assert list(results["lm_eval"]) == ["course_preferences"]
    assert set(results["heldout_preference_accuracy"]["by_kind"]) == {"Intel/orca_dpo_pairs"}
