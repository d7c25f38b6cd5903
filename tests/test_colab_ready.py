"""Every notebook opens and installs on Colab the way CONTRIBUTING.md says, and helpers.colab works off Colab.

Checked for each notebook in notebooks/ (and solutions/ when it exists): the title cell's Colab badge points at the
notebook itself, the notebook asks Colab for a GPU runtime, the install cell is ``helpers.course.INSTALL_CELL``
(which clones ``helpers.course.REPO_URL`` and installs only on Colab) and runs twice without harm in a shell made to
look like a Colab runtime, and a ``parameters`` cell exists. requirements-colab.txt must never (re)install torch:
Colab's CUDA build has to stay. On a (faked) Colab the notebooks put their runs on Google Drive unless told not to.
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
def test_install_cell_is_the_courses_and_runs_only_on_colab(path: Path):
    cell = _cells(path)[1]
    assert cell["cell_type"] == "code", f"{path.name}: the second cell must be the Colab-only install (code)"
    assert _source(cell) == course.INSTALL_CELL, f"{path.name}: run `python scripts/nbtools.py stamp {path.name}`"
    lines = course.INSTALL_CELL.splitlines()
    guard = lines.index(GUARD)
    shell = [(i, line) for i, line in enumerate(lines) if line.lstrip().startswith("!")]
    assert shell and all(i > guard and line.startswith("    ") for i, line in shell), "shell lines outside the guard"
    assert f'COURSE_URL = "{course.REPO_URL}"' in lines[guard + 1]
    assert not any(TORCH_PACKAGES.search(line) for _, line in shell), "the install cell names torch"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_opens_a_gpu_runtime_on_colab(path: Path):
    metadata = json.loads(path.read_text(encoding="utf-8"))["metadata"]
    assert metadata.get("accelerator") == "GPU", f"{path.name}: Colab would open a CPU runtime"
    assert metadata.get("colab", {}).get("gpuType") == "T4", f"{path.name}: Colab's free GPU is a T4"


def _shell_script(cell: str, url: str, course_dir: Path) -> str:
    """The install cell's shell lines as IPython runs them, ``{COURSE_URL}`` and ``{COURSE_DIR}`` expanded."""
    lines = [line.strip()[1:] for line in cell.splitlines() if line.strip().startswith("!")]
    return "set -e\n" + "\n".join(
        line.replace("{COURSE_URL}", shlex.quote(url)).replace("{COURSE_DIR}", shlex.quote(str(course_dir)))
        for line in lines
    )


def test_install_cell_run_twice_clones_once_and_installs_once(tmp_path):
    """The cell's shell lines, run twice in a shell that looks like a Colab runtime (pip recorded, not run): the
    second run neither clones again (no 'already exists' failure) nor calls pip."""
    import subprocess

    origin = tmp_path / "origin.git"  # the course's committed history, served from disk instead of GitHub
    subprocess.run(["git", "clone", "-q", "--bare", str(REPO_ROOT), str(origin)], check=True)
    course_dir = tmp_path / "content" / course.REPO_DIRNAME
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    pip_log = tmp_path / "pip.log"
    fake_python = bin_dir / "python3"
    fake_python.write_text(
        "#!/usr/bin/env bash\n"
        f'if [[ "$1" == "-m" && "$2" == "pip" ]]; then echo "$*" >> {shlex.quote(str(pip_log))}; exit 0; fi\n'
        f'exec {shlex.quote(sys.executable)} "$@"\n'
    )
    fake_python.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "COLAB_RELEASE_TAG": "test",
           "PYTHONPATH": str(course_dir)}  # what `pip install -e` would make importable
    script = _shell_script(course.INSTALL_CELL, str(origin), course_dir)
    runs = [subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=300)
            for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stdout + run.stderr
    assert (course_dir / "helpers" / "course.py").is_file()
    installs = pip_log.read_text().splitlines()
    assert len(installs) == 2 and "requirements-colab.txt" in installs[0], installs  # both in the first run
    assert "up to date" in runs[1].stdout, runs[1].stdout


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


def _fake_colab(monkeypatch, tmp_path) -> list[str]:
    """A ``google.colab`` module with a Drive that mounts into ``tmp_path``. The training libraries are imported
    first: with a fake ``google`` package in ``sys.modules``, their own imports of Google's packages would fail."""
    import helpers.training  # noqa: F401
    from helpers import colab

    mounted: list[str] = []

    def mount(where: str) -> None:
        mounted.append(where)
        (Path(where) / "MyDrive").mkdir(parents=True, exist_ok=True)

    google = types.ModuleType("google")
    google_colab = types.ModuleType("google.colab")
    google_colab.drive = types.SimpleNamespace(mount=mount)
    google.colab = google_colab
    monkeypatch.setitem(sys.modules, "google", google)
    monkeypatch.setitem(sys.modules, "google.colab", google_colab)
    monkeypatch.setattr(colab, "DRIVE_MOUNT_POINT", tmp_path / "drive")
    monkeypatch.delenv("COURSE_OUTPUT_DIR", raising=False)
    return mounted


def test_use_drive_on_a_simulated_colab_mounts_and_redirects_outputs(monkeypatch, tmp_path, capsys):
    from helpers import colab
    from helpers.paths import outputs_dir, run_dir

    mounted = _fake_colab(monkeypatch, tmp_path)
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


@pytest.mark.parametrize("use_drive", [True, False])
def test_notebooks_start_on_google_drive_on_colab_unless_told_not_to(monkeypatch, tmp_path, use_drive):
    from helpers import notebook
    from helpers.paths import outputs_dir

    mounted = _fake_colab(monkeypatch, tmp_path)
    notebook.start("tiny", use_drive=use_drive)
    if use_drive:
        assert mounted and outputs_dir() == tmp_path / "drive" / "MyDrive" / "dpo-course" / "outputs"
    else:
        assert not mounted and outputs_dir() == REPO_ROOT / "outputs"


def test_off_colab_start_leaves_the_outputs_where_they_are(monkeypatch, capsys):
    from helpers import notebook
    from helpers.paths import outputs_dir

    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    monkeypatch.delenv("COURSE_OUTPUT_DIR", raising=False)
    notebook.start("tiny", use_drive=True)
    assert outputs_dir() == REPO_ROOT / "outputs"
    assert "Drive" not in capsys.readouterr().out
