"""The notebooks' shape: one worked-answers notebook per course notebook with exercises, following the skeleton.

Only the notebooks' JSON is read here (nothing is executed): nbval runs the solutions themselves
(``pytest --nbval-lax solutions/`` after ``notebooks/``, see scripts/run_checks.sh).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
SOLUTIONS = REPO / "solutions"
EXERCISE = re.compile(r"\*\*Exercise (\d+)")
CHECK_CALL = re.compile(r"\bcheck\(")
ASSERT = re.compile(r"^\s*assert\b", re.MULTILINE)
RAISES_MARKER = "# NBVAL_RAISES_EXCEPTION"


def cells(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def source(cell: dict) -> str:
    return "".join(cell["source"])


def has_exercises(path: Path) -> bool:
    return any(c["cell_type"] == "markdown" and "## Exercises" in source(c) for c in cells(path))


def exercise_numbers(path: Path) -> list[int]:
    """The exercise numbers stated in a notebook's markdown (``**Exercise 1 ★ ...``), in order, without repeats."""
    found: list[int] = []
    for cell in cells(path):
        if cell["cell_type"] == "markdown":
            found += [int(n) for n in EXERCISE.findall(source(cell)) if int(n) not in found]
    return found


def self_checks(path: Path) -> list[str]:
    """A course notebook's exercise self-check cells, without their first line (the NBVAL_RAISES_EXCEPTION marker)."""
    return [source(c).split("\n", 1)[1] for c in cells(path)
            if "raises-exception" in c.get("metadata", {}).get("tags", [])]


def solution_path(course: Path) -> Path:
    return SOLUTIONS / f"{course.stem}_solutions.ipynb"


COURSE = sorted(p for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb") if has_exercises(p))
IDS = [p.stem for p in COURSE]


def test_there_are_course_notebooks_with_exercises():
    assert len(COURSE) >= 8, [p.name for p in COURSE]


@pytest.mark.parametrize("course", COURSE, ids=IDS)
def test_every_notebook_with_exercises_has_a_solution(course):
    assert solution_path(course).exists(), f"{course.name} has exercises but no {solution_path(course).name}"


def test_no_orphan_solutions():
    courses = {p.stem for p in NOTEBOOKS.glob("*.ipynb")}
    orphans = [p.name for p in SOLUTIONS.glob("*.ipynb") if p.stem.removesuffix("_solutions") not in courses]
    assert not orphans, f"solutions without a course notebook: {orphans}"


@pytest.mark.parametrize("course", COURSE, ids=IDS)
def test_solution_checks_at_least_every_exercise(course):
    numbers = exercise_numbers(course)
    assert numbers == list(range(1, len(numbers) + 1)), f"{course.name}: exercises numbered {numbers}"
    code = "\n".join(source(c) for c in cells(solution_path(course)) if c["cell_type"] == "code")
    checks = len(CHECK_CALL.findall(code)) + len(ASSERT.findall(code))
    assert checks >= len(numbers), f"{solution_path(course).name}: {checks} check()/assert for {len(numbers)} exercises"


@pytest.mark.parametrize("course", COURSE, ids=IDS)
def test_solution_runs_the_course_self_checks_unchanged(course):
    """Each exercise's self-check cell of the course notebook appears, as is, in the solution (where it must pass)."""
    course_checks = self_checks(course)
    assert len(course_checks) >= len(exercise_numbers(course)), f"{course.name}: an exercise has no self-check cell"
    solution_code = [source(c) for c in cells(solution_path(course)) if c["cell_type"] == "code"]
    for check in course_checks:
        assert check in solution_code, f"{solution_path(course).name} lacks the self-check:\n{check}"
    positions = [solution_code.index(check) for check in course_checks]
    assert positions == sorted(positions), "the self-checks should come in the course notebook's order"


@pytest.mark.parametrize("course", COURSE, ids=IDS)
def test_solution_follows_the_skeleton(course):
    path = solution_path(course)
    solution, original = cells(path), cells(course)
    title = source(solution[0])
    assert solution[0]["cell_type"] == "markdown" and title.startswith(f"# {course.stem[:2]} · "), title[:80]
    assert f"/blob/main/solutions/{path.name})" in title, "the Colab badge must open the solution itself"
    assert source(solution[1]) == source(original[1]), "the Colab-only install cell differs from the course notebook's"
    assert solution[2].get("metadata", {}).get("tags") == ["parameters"], "cell 3 must be the tagged parameters cell"
    assert "PROFILE = None" in source(solution[2])
    start = source(solution[3])
    assert start.startswith("# NBVAL_IGNORE_OUTPUT")
    assert "profile = notebook.start(PROFILE, use_drive_on_colab=USE_DRIVE, seed=SEED)" in start
    assert "SEED = " in source(solution[2]), "the parameters cell sets the seed (benchmarks/seeds.py injects others)"


@pytest.mark.parametrize("course", COURSE, ids=IDS)
def test_solution_cells_must_pass(course):
    """No cell of a solution is allowed to raise, and the committed outputs hold no error."""
    for cell in cells(solution_path(course)):
        assert "raises-exception" not in cell.get("metadata", {}).get("tags", []), source(cell)[:80]
        if cell["cell_type"] == "code":
            assert not source(cell).startswith(RAISES_MARKER), source(cell)[:80]
            assert "raise NotImplementedError" not in source(cell), "an exercise stub was left in the solution"
            errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
            assert not errors, f"{solution_path(course).name}: committed output holds an error: {errors[0]['ename']}"


NOTEBOOKS_ALL = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS_ALL, ids=[p.stem for p in NOTEBOOKS_ALL])
def test_every_notebook_opens_the_same_way_and_can_run_short(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    opening = [source(c) for c in nb["cells"][:4]]
    assert opening[0].startswith(f"# {path.stem[:2]} · ") and f"/blob/main/notebooks/{path.name})" in opening[0]
    assert "**Cost**" in opening[0], "the title cell says what the notebook costs (docs/costs.csv)"
    assert nb["cells"][2].get("metadata", {}).get("tags") == ["parameters"]
    for line in ("PROFILE = None", "USE_DRIVE = ", "RUN_ID = ", "SEED = "):
        assert line in opening[2], f"{path.name}: the parameters cell lacks {line!r}"
    assert "profile = notebook.start(PROFILE, use_drive_on_colab=USE_DRIVE, seed=SEED)" in opening[3]
    short = nb["metadata"].get("course", {}).get("short_run")
    assert isinstance(short, dict), f"{path.name}: metadata course.short_run (the stand-in tests' parameters) missing"
    text = "\n".join(source(c) for c in nb["cells"] if c["cell_type"] == "markdown")
    assert "## Summary" in text, f"{path.name} ends without a Summary"
