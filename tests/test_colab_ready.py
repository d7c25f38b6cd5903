"""Every notebook opens and installs on Colab the way CONTRIBUTING.md says, and helpers.colab works off Colab.

Checked for each notebook in notebooks/ (and solutions/ when it exists), without running anything:
the title cell's Colab badge points at the notebook itself, the install cell clones exactly
``helpers.course.REPO_URL`` and installs ``requirements-colab.txt`` only on Colab, and a ``parameters`` cell
exists. requirements-colab.txt must never (re)install torch: Colab's CUDA build has to stay.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
import types
from pathlib import Path

import pytest

from helpers import course
from helpers.paths import REPO_ROOT

BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"
GUARD = 'if "google.colab" in sys.modules:'
NOTEBOOKS = sorted(p for folder in ("notebooks", "solutions") for p in (REPO_ROOT / folder).glob("*.ipynb"))
TORCH_PACKAGES = re.compile(r"^\s*(torch|torchvision|torchaudio)\s*($|[=<>!~;\[ ])", re.IGNORECASE)


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def _source(cell: dict) -> str:
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else source


def expected_colab_url(path: Path) -> str:
    """The Colab link of a notebook: helpers.course.NOTEBOOK_COLAB_URL, with solutions/ for the solutions."""
    url = course.NOTEBOOK_COLAB_URL.format(name=path.name)
    if path.parent.name != "notebooks":
        url = url.replace("/notebooks/", f"/{path.parent.name}/")
    return url


def _ids(paths: list[Path]) -> list[str]:
    return [f"{p.parent.name}/{p.name}" for p in paths]


def test_there_are_notebooks_to_check():
    assert NOTEBOOKS, "no notebooks found in notebooks/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_title_cell_has_a_colab_badge_for_this_notebook(path: Path):
    first = _cells(path)[0]
    assert first["cell_type"] == "markdown", f"{path.name}: the first cell must be the markdown title cell"
    text = _source(first)
    badge = f"[![Open In Colab]({BADGE_IMAGE})]({expected_colab_url(path)})"
    assert badge in text, (
        f"{path.name}: the title cell needs the Colab badge {badge} (its URL is "
        "helpers.course.NOTEBOOK_COLAB_URL with this notebook's own file name)"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_install_cell_clones_the_course_and_installs_only_on_colab(path: Path):
    cell = _cells(path)[1]
    assert cell["cell_type"] == "code", f"{path.name}: the second cell must be the Colab-only install (code)"
    lines = _source(cell).splitlines()
    assert "import sys" in (line.strip() for line in lines), f"{path.name}: the install cell must import sys"
    guards = [i for i, line in enumerate(lines) if line.strip() == GUARD]
    assert guards, f"{path.name}: the install cell must be guarded by `{GUARD}`"
    guard = guards[0]
    shell = [(i, line) for i, line in enumerate(lines) if line.lstrip().startswith("!")]
    assert shell, f"{path.name}: the install cell runs no `!git clone` / `!pip install`"
    for i, line in shell:
        assert i > guard and line.startswith((" ", "\t")), f"{path.name}: `{line.strip()}` runs outside the guard"

    clones = [shlex.split(line.strip()[1:]) for _, line in shell if line.strip().startswith("!git clone")]
    assert len(clones) == 1, f"{path.name}: exactly one `!git clone` expected, found {len(clones)}"
    args = [a for a in clones[0][2:] if not a.startswith("-") and not a.isdigit()]
    assert args[0] == course.REPO_URL, f"{path.name}: clones {args[0]!r}, not helpers.course.REPO_URL"
    target = args[1] if len(args) > 1 else course.REPO_DIRNAME
    assert Path(target).name == course.REPO_DIRNAME, f"{path.name}: clones into {target!r}"

    pips = [shlex.split(line.strip()[1:]) for _, line in shell if line.strip().startswith("!pip")]
    assert len(pips) == 1, f"{path.name}: exactly one `!pip install` expected"
    pip = pips[0]
    requirements = [pip[i + 1] for i, a in enumerate(pip[:-1]) if a in {"-r", "--requirement"}]
    assert requirements == [f"{target}/requirements-colab.txt"], (
        f"{path.name}: the install cell must install {target}/requirements-colab.txt (found {requirements})"
    )
    named = [a for a in pip[2:] if not a.startswith("-") and a not in requirements and a != target]
    assert not any(TORCH_PACKAGES.match(a) for a in named), f"{path.name}: the install cell names torch: {named}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_a_parameters_cell_exists(path: Path):
    tagged = [c for c in _cells(path) if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: exactly one code cell tagged `parameters` expected, found {len(tagged)}"
    assert tagged[0]["cell_type"] == "code"
    assert "PROFILE = None" in _source(tagged[0]), f"{path.name}: the parameters cell must set PROFILE = None"


def _requirement_lines(path: Path) -> list[str]:
    lines = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            lines.append(line)
    return lines


def test_colab_requirements_never_reinstall_torch():
    colab = REPO_ROOT / "requirements-colab.txt"
    lines = _requirement_lines(colab)
    assert not [line for line in lines if TORCH_PACKAGES.match(line)], "requirements-colab.txt must not name torch"
    # its constraint files must not pin torch either: a pin there would make pip replace Colab's torch
    for line in lines:
        if line.startswith(("-c", "--constraint", "-r", "--requirement")):
            included = REPO_ROOT / line.split(maxsplit=1)[1].strip()
            pinned = [x for x in _requirement_lines(included) if TORCH_PACKAGES.match(x)]
            assert not pinned, f"{included.name}, used by requirements-colab.txt, pins {pinned}"


def test_repo_url_is_stated_once():
    assert course.REPO_URL.startswith("https://github.com/")
    assert course.REPO_URL.rstrip("/").endswith("/" + course.REPO_DIRNAME)
    assert course.NOTEBOOK_COLAB_URL.startswith(
        "https://colab.research.google.com/github/" + course.REPO_URL.removeprefix("https://github.com/")
    )


# --- helpers.colab ------------------------------------------------------------------------------------


def test_use_drive_off_colab_changes_nothing(monkeypatch, tmp_path, capsys):
    from helpers import colab
    from helpers.paths import outputs_dir

    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    monkeypatch.setenv("COURSE_OUTPUT_DIR", str(tmp_path / "outputs"))
    assert colab.use_drive() == tmp_path / "outputs" == outputs_dir()
    assert "not on Colab" in capsys.readouterr().out

    monkeypatch.delenv("COURSE_OUTPUT_DIR")
    assert colab.use_drive("MyDrive/elsewhere") == REPO_ROOT / "outputs"
    assert "COURSE_OUTPUT_DIR" not in os.environ


def test_use_drive_on_a_simulated_colab_mounts_and_redirects_outputs(monkeypatch, tmp_path, capsys):
    from helpers import colab
    from helpers.paths import outputs_dir, run_dir

    mounted: list[str] = []

    def mount(where: str) -> None:
        mounted.append(where)
        (Path(where) / "MyDrive").mkdir(parents=True)

    google = types.ModuleType("google")
    google_colab = types.ModuleType("google.colab")
    google_colab.drive = types.SimpleNamespace(mount=mount)
    google.colab = google_colab
    monkeypatch.setitem(sys.modules, "google", google)
    monkeypatch.setitem(sys.modules, "google.colab", google_colab)
    monkeypatch.setattr(colab, "DRIVE_MOUNT_POINT", tmp_path / "drive")
    monkeypatch.delenv("COURSE_OUTPUT_DIR", raising=False)

    target = colab.use_drive()
    assert mounted == [str(tmp_path / "drive")]
    assert target == tmp_path / "drive" / "MyDrive" / "dpo-course" / "outputs" and target.is_dir()
    assert outputs_dir() == target and run_dir("t4", "main") == target / "runs" / "t4-main"

    # a later session: Drive already mounted, the run of notebook 04 is found again
    (target / "runs" / "t4-main").mkdir(parents=True)
    assert colab.use_drive() == target and len(mounted) == 1
    assert "t4-main" in capsys.readouterr().out

    with pytest.raises(ValueError, match="inside your Drive"):
        colab.use_drive("../etc")
