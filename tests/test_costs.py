"""One table of costs: docs/costs.csv writes the README's two cost tables and every notebook's **Cost** line, so no
figure can disagree with another. Run ``python scripts/nbtools.py costs`` after editing the table."""

from __future__ import annotations

import nbformat
import pytest

from helpers.profiles import REPO_ROOT
from scripts.nbtools import README_BLOCKS, cost_line, read_costs, readme_block

COSTS = read_costs()
NOTEBOOKS = sorted(p.stem for p in (REPO_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def _title_cell(name: str) -> str:
    return nbformat.read(REPO_ROOT / "notebooks" / f"{name}.ipynb", as_version=4).cells[0].source


def test_every_notebook_has_a_row_and_every_row_a_notebook() -> None:
    assert sorted(COSTS) == NOTEBOOKS


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_the_notebooks_cost_line_is_its_row(name: str) -> None:
    assert cost_line(COSTS[name]) in _title_cell(name), f"run `python scripts/nbtools.py costs` ({name})"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_every_gpu_figure_says_whether_it_was_measured(name: str) -> None:
    row = COSTS[name]
    assert float(row["cpu_seconds"]) > 0
    for column in ("t4", "a100"):
        assert any(word in row[column] for word in ("estimated", "computed", "model card")), (name, row[column])


@pytest.mark.parametrize("block", README_BLOCKS)
def test_the_readme_tables_are_the_cost_table(block: str) -> None:
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    written = text.split(f"<!-- costs:{block} -->\n", 1)[1].split(f"\n<!-- /costs:{block} -->", 1)[0]
    titles = {name: (_title_cell(name).splitlines()[0].split("·", 1)[1].strip(), COSTS[name]["learn"])
              for name in COSTS}
    assert written == readme_block(block, COSTS, titles), "run `python scripts/nbtools.py costs`"
