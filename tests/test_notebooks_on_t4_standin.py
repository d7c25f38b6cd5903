"""Notebooks 04-06 and 11 on a free Colab T4's path: the `t4` profile's cells on the offline stand-ins of
Qwen2.5-0.5B-Instruct and Intel/orca_dpo_pairs (tests only, standins/): a Qwen2 with q/k/v biases and tied
embeddings, a byte-level BPE tokenizer and Qwen's own chat template, trained in 4-bit, merged and evaluated in one
output folder as a learner's Colab runs go from one notebook to the next. Every cell must run; only the exercise
checks (tagged ``raises-exception``) may fail. See tests/test_notebooks_on_full_standin.py for every notebook on
`full`."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_notebooks_on_full_standin import runs_top_to_bottom, trained_in_4bit_and_merged

PROFILE = "t4"
NOTEBOOKS = ["04_dpo_training", "05_merging", "06_evaluation", "11_data_audit"]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp(f"{PROFILE}-notebooks")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_the_notebook_runs_top_to_bottom(name, outputs):
    runs_top_to_bottom(name, PROFILE, outputs)


def test_the_recipe_trained_in_4bit_and_merged(outputs):
    trained_in_4bit_and_merged(PROFILE, outputs)
