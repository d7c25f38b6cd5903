"""The shape of the course (issue 17): a small helper package a learner can read, with the recipe's library calls
written in the notebooks' cells rather than hidden in helpers.

Read from the files themselves: line counts, the import graph of ``helpers/`` (no cycles; a notebook's module never
imports a later notebook's), imports at the top, the library calls each notebook must show, and lesson lengths.
"""

from __future__ import annotations

import ast
import json
import re

import pytest

from helpers.profiles import REPO_ROOT

HELPERS = REPO_ROOT / "helpers"
MAX_LINES, MAX_MODULE_LINES = 3500, 400
# Where each module sits in the course: shared modules first, then one module per notebook, by its number.
LEVELS = {"profiles": 0, "runs": 0, "notebook": 0, "plots": 0, "chatml": 1, "models": 1, "data": 1, "scoring": 1,
          "loading": 2, "lora": 3, "training": 4, "merging": 5, "evaluation": 6, "dpo_from_scratch": 7,
          "beyond_dpo": 8, "export_gguf": 9, "on_policy_dpo": 10, "data_audit": 11}
# The library calls a learner comes to copy, each written in a code cell of its notebook.
CALLS = {
    "02": ["BitsAndBytesConfig(", "AutoModelForCausalLM.from_pretrained(", "quantization_config="],
    "03": ["LoraConfig("],
    "04": ["DPOConfig(", "DPOTrainer(", "trainer.train()", "AutoModelForCausalLM.from_pretrained(", "LoraConfig("],
    "05": ["PeftModel.from_pretrained(", ".merge_and_unload()"],
    "06": ["lm_eval.simple_evaluate("],
    "08": ["DPOTrainer(", "ORPOTrainer(", "ORPOConfig("],
    "10": ["RewardTrainer(", "DPOTrainer(", "OnlineDPOTrainer("],
    "11": ["RewardTrainer("],
}
MAX_WORDS = {"08": 1500, "09": 1500, "10": 1500}


def modules() -> dict[str, str]:
    """Every helpers module's source, by name."""
    return {p.stem: p.read_text() for p in sorted(HELPERS.glob("*.py")) if p.stem != "__init__"}


def notebook(number: str) -> dict:
    found = sorted((REPO_ROOT / "notebooks").glob(f"{number}_*.ipynb"))
    assert len(found) == 1, f"expected one notebook numbered {number}, found {found}"
    return json.loads(found[0].read_text())


def cells(nb: dict, kind: str) -> list[str]:
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == kind]


def test_the_package_is_small():
    lines = {name: len(src.splitlines()) for name, src in modules().items()}
    assert sum(lines.values()) <= MAX_LINES, f"helpers/ has {sum(lines.values())} lines (at most {MAX_LINES})"
    big = {name: n for name, n in lines.items() if n > MAX_MODULE_LINES}
    assert not big, f"modules over {MAX_MODULE_LINES} lines: {big}"


def test_every_module_has_a_place_in_the_course():
    assert set(modules()) <= set(LEVELS), f"modules without a level here: {set(modules()) - set(LEVELS)}"


def imports_of(source: str) -> set[str]:
    """The helpers modules a module imports (anywhere in it)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("helpers"):
            found |= {node.module.split(".")[1]} if "." in node.module else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("helpers.")}
    return found


def test_the_import_graph_has_no_cycle_and_runs_from_earlier_notebooks_to_later_ones():
    graph = {name: imports_of(src) - {name} for name, src in modules().items()}
    for name, targets in graph.items():
        for target in targets:
            assert LEVELS[name] >= LEVELS[target], (
                f"helpers.{name} (level {LEVELS[name]}) imports helpers.{target} (level {LEVELS[target]}): a module "
                "may only use shared modules and the modules of earlier notebooks")
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            assert state.get(nxt) != 1, f"import cycle: {' -> '.join([*path, node, nxt])}"
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [])


def test_imports_stand_at_the_top_or_say_why_not():
    for name, source in modules().items():
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.Import | ast.ImportFrom):
                        at = inner.lineno - 1  # a comment on the line, or above its block of imports
                        above = lines[at - 1].strip()
                        while at > 0 and above.startswith(("import ", "from ")) and "#" not in lines[at]:
                            at -= 1
                            above = lines[at - 1].strip()
                        assert "#" in lines[at] or lines[at - 1].strip().startswith("#"), (
                            f"helpers/{name}.py:{inner.lineno} imports inside {node.name}() without a comment why")


def test_learner_modules_never_branch_on_the_test_standins():
    for name, source in modules().items():
        if name != "notebook":  # the one switch at start-up
            assert "standins" not in source and "COURSE_STANDINS" not in source, f"helpers/{name}.py mentions them"


@pytest.mark.parametrize("number", sorted(CALLS))
def test_the_recipe_calls_stand_in_the_notebooks_cells(number):
    code = "\n".join(cells(notebook(number), "code"))
    missing = [call for call in CALLS[number] if call not in code]
    assert not missing, f"notebook {number} should write these calls in a code cell: {missing}"


@pytest.mark.parametrize("number", sorted(MAX_WORDS))
def test_the_long_lessons_stay_short(number):
    words = sum(len(re.findall(r"\S+", text)) for text in cells(notebook(number), "markdown"))
    assert words <= MAX_WORDS[number], f"notebook {number} has {words} words of text (at most {MAX_WORDS[number]})"
