"""Every notebook opens and installs on Colab: its badge, its GPU runtime, and the install cell (cell 1).

The install cell (``scripts/nbtools.py`` ``INSTALL_CELL``) is run here as a Colab kernel runs it: by a Python with
a ``google.colab`` module loaded, with a fake ``/content`` (a temporary folder), a fake ``git`` on the PATH and a
fake ``pip`` module (``python -m pip`` finds it first on PYTHONPATH) that record how they were called. Checked: a
failing clone, a failing pip install and a library imported before the install each stop the cell with a message
that says what to do; a second run does nothing; pip runs in the kernel's own Python. The course's repository is one
setting (pyproject.toml ``[tool.course] repository``): changed in a temporary copy, every badge and the clone URL
follow. ``scripts/colab_stack.sh`` (Colab's image rebuilt: Python 3.13, torch 2.11) runs here only when its
environment is already built: it downloads several GB.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from helpers.profiles import REPO_ROOT
from scripts import nbtools

NOTEBOOKS = sorted(p for folder in ("notebooks", "solutions") for p in (REPO_ROOT / folder).glob("*.ipynb"))
TORCH_PACKAGES = re.compile(r"^\s*(torch|torchvision|torchaudio)\s*($|[=<>!~;\[ ])", re.IGNORECASE)
STALE_LIBRARIES = ("transformers", "tokenizers", "trl", "peft", "datasets", "accelerate", "huggingface_hub", "pyarrow")


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def _source(cell: dict) -> str:
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else source


def _ids(paths: list[Path]) -> list[str]:
    return [f"{p.parent.name}/{p.name}" for p in paths]


def _badges(text: str) -> list[str]:
    return re.findall(r"\(https://colab\.research\.google\.com/github/[^)]*\)", text)


# --- what `scripts/nbtools.py stamp` writes into every notebook --------------------------------------------------


def test_there_are_notebooks_to_check():
    assert NOTEBOOKS, "no notebooks found in notebooks/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_title_cell_has_one_colab_badge_for_this_notebook(path: Path):
    first = _cells(path)[0]
    assert first["cell_type"] == "markdown", f"{path.name}: the first cell must be the markdown title cell"
    expected = f"https://colab.research.google.com/github/{nbtools.REPOSITORY}/blob/main/{path.parent.name}/{path.name}"
    assert _badges(_source(first)) == [f"({expected})"], f"run `python scripts/nbtools.py stamp {path.name}`"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_install_cell_is_the_courses(path: Path):
    cell = _cells(path)[1]
    assert cell["cell_type"] == "code", f"{path.name}: the second cell must be the Colab install cell (code)"
    assert _source(cell) == nbtools.INSTALL_CELL, f"{path.name}: run `python scripts/nbtools.py stamp {path.name}`"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_opens_a_gpu_runtime_on_colab(path: Path):
    metadata = json.loads(path.read_text(encoding="utf-8"))["metadata"]
    assert metadata.get("accelerator") == "GPU", f"{path.name}: Colab would open a CPU runtime"
    assert metadata.get("colab", {}).get("gpuType") == "T4", f"{path.name}: Colab's free GPU is a T4"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_a_parameters_cell_exists(path: Path):
    tagged = [c for c in _cells(path) if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: exactly one code cell tagged `parameters` expected, found {len(tagged)}"
    assert "PROFILE = None" in _source(tagged[0]), f"{path.name}: the parameters cell must set PROFILE = None"


def test_install_cell_is_plain_python_that_compiles():
    """No `!` lines (IPython runs them and never raises when they fail), nothing outside the Colab guard."""
    compile(nbtools.INSTALL_CELL, "install cell", "exec")  # a `!` line would be a SyntaxError here
    body = nbtools.INSTALL_CELL.split('if "google.colab" in sys.modules:\n', 1)[1]
    assert all(not line or line.startswith("    ") for line in body.splitlines()), "a line outside the guard"
    assert not TORCH_PACKAGES.search(nbtools.INSTALL_CELL.replace("Colab's own torch", ""))


# --- the pins ------------------------------------------------------------------------------------------------------


def _requirement_lines(path: Path) -> list[str]:
    return [line for raw in path.read_text(encoding="utf-8").splitlines() if (line := raw.split("#", 1)[0].strip())]


def _pins() -> dict[str, Requirement]:
    lines = _requirement_lines(REPO_ROOT / "requirements.txt")
    return {(r := Requirement(line)).name.lower().replace("_", "-"): r for line in lines}


def test_colab_requirements_never_reinstall_torch():
    lines = _requirement_lines(REPO_ROOT / "requirements-colab.txt")
    assert not [line for line in lines if TORCH_PACKAGES.match(line)], "requirements-colab.txt must not name torch"
    for line in lines:  # its constraint files must not pin torch either: pip would replace Colab's CUDA build
        if line.startswith(("-c", "--constraint", "-r", "--requirement")):
            included = REPO_ROOT / line.split(maxsplit=1)[1].strip()
            assert not [x for x in _requirement_lines(included) if TORCH_PACKAGES.match(x)], included.name


def test_huggingface_hub_pin_fits_transformers_and_colabs_packages():
    """transformers' own metadata sets the floor; Colab's gradio, gradio_client and diffusers declare <2.0."""
    hub = _pins()["huggingface-hub"]
    (pinned,) = [Version(s.version) for s in hub.specifier if s.operator == "=="]
    assert pinned < Version("2.0"), "Colab's gradio/gradio_client/diffusers declare huggingface-hub<2.0"
    needs = [Requirement(r) for r in importlib.metadata.requires("transformers") if r.startswith("huggingface-hub")]
    assert needs and all(pinned in r.specifier for r in needs if r.marker is None), needs
    assert "huggingface-hub" in _requirement_lines(REPO_ROOT / "requirements-colab.txt")


def test_torch_floor_in_setup_env_is_transformers_own():
    """transformers switches torch off below the version its is_torch_available() names; setup_env.sh stops there."""
    from transformers.utils import import_utils

    source = inspect.getsource(import_utils.is_torch_available)
    floors = set(re.findall(r'version\.parse\("(\d+\.\d+)(?:\.0)?"\)', source))
    assert len(floors) == 1, floors
    (floor,) = floors
    major, minor = floor.split(".")
    setup = (REPO_ROOT / "scripts" / "setup_env.sh").read_text()
    assert f"< ({major}, {minor})" in setup and f"torch {floor}" in (REPO_ROOT / "requirements-colab.txt").read_text()


# --- the install cell, run in a shell made to look like Colab ------------------------------------------------------

FAKE_GIT = """#!/usr/bin/env bash
# A `git` for the tests: records its call; `clone` copies $FAKE_ORIGIN, or fails like a missing repository.
echo "GIT_TERMINAL_PROMPT=${GIT_TERMINAL_PROMPT:-unset} $*" >> "$FAKE_LOG"
if [[ "${GIT_TERMINAL_PROMPT:-}" != 0 ]]; then sleep 600; fi  # real git would wait for a user name here
if [[ -n "${FAKE_GIT_FAILS:-}" ]]; then
  echo "fatal: could not read Username for 'https://github.com': terminal prompts disabled" >&2; exit 128
fi
dest="${@: -1}"; mkdir -p "$dest/.git"; cp -r "$FAKE_ORIGIN"/. "$dest"
"""
FAKE_PIP = """import json, os, sys
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write("PIP " + json.dumps({"python": sys.executable, "args": sys.argv[1:]}) + "\\n")
sys.exit(int(os.environ.get("FAKE_PIP_EXIT", "0")))
"""
KERNEL = """import sys, types
sys.modules["google.colab"] = types.ModuleType("google.colab")  # as in a Colab kernel
exec(sys.argv[2])  # what the learner ran before
namespace = {}
for _ in range(int(sys.argv[3])):
    exec(compile(open(sys.argv[1]).read(), "install cell", "exec"), namespace)
print("CELL DONE")
"""


class FakeColab:
    """A temporary /content, a course repository to clone, and the fakes; ``run`` runs the cell in a new kernel."""

    def __init__(self, tmp: Path):
        self.tmp, self.log = tmp, tmp / "calls.log"
        origin = tmp / "origin"  # what the clone brings: the files the install reads, from this working tree
        for name in ("requirements.txt", "requirements-colab.txt", "pyproject.toml", "scripts/setup_env.sh",
                     "helpers/__init__.py"):
            (origin / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO_ROOT / name, origin / name)
        (tmp / "bin").mkdir()
        (tmp / "bin" / "git").write_text(FAKE_GIT)
        (tmp / "bin" / "git").chmod(0o755)
        (tmp / "fakes" / "pip").mkdir(parents=True)
        (tmp / "fakes" / "pip" / "__init__.py").write_text("")
        (tmp / "fakes" / "pip" / "__main__.py").write_text(FAKE_PIP)
        self.course_dir = tmp / "content" / nbtools.REPOSITORY.split("/")[1]
        cell = nbtools.INSTALL_CELL
        assert cell.count('"/content/') == 1, "the install cell names /content once, in COURSE_DIR"
        (tmp / "cell.py").write_text(cell.replace('"/content/', f'"{tmp}/content/'))

    def run(self, before: str = "", runs: int = 1, **fakes: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "PATH": f"{self.tmp / 'bin'}:{os.environ['PATH']}", "FAKE_LOG": str(self.log),
               "FAKE_ORIGIN": str(self.tmp / "origin"), "COLAB_RELEASE_TAG": "test", **fakes,
               # the fake pip first; the course folder stands for what `pip install -e .` makes importable
               "PYTHONPATH": f"{self.tmp / 'fakes'}:{self.course_dir}"}
        env.pop("GIT_TERMINAL_PROMPT", None)
        return subprocess.run([sys.executable, "-c", KERNEL, str(self.tmp / "cell.py"), before, str(runs)],
                              env=env, capture_output=True, text=True, timeout=120)

    def calls(self) -> tuple[list[str], list[dict]]:
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return ([x for x in lines if x.startswith("GIT_")],
                [json.loads(x[4:]) for x in lines if x.startswith("PIP ")])


@pytest.fixture
def colab(tmp_path) -> FakeColab:
    return FakeColab(tmp_path)


def test_install_cell_clones_once_installs_once_and_a_second_run_does_nothing(colab):
    done = colab.run(runs=2)
    assert done.returncode == 0 and "CELL DONE" in done.stdout, done.stdout + done.stderr
    git, pip = colab.calls()
    assert len(git) == 1 and git[0].startswith("GIT_TERMINAL_PROMPT=0 clone"), git
    assert nbtools.REPO_URL in git[0] and str(colab.course_dir) in git[0]
    assert len(pip) == 2, pip  # requirements-colab.txt, then the course itself (-e .), in the first run only
    assert "requirements-colab.txt" in pip[0]["args"] and pip[1]["args"][-2:] == ["-e", "."]
    # the kernel's own interpreter, not a python3 found on the PATH
    assert {Path(p["python"]) for p in pip} == {Path(sys.executable)}
    assert done.stdout.count("[setup] up to date") == 1, done.stdout  # the second run: nothing to do

    again = colab.run()  # a later run in a new kernel (the runtime kept its disk)
    assert again.returncode == 0 and len(colab.calls()[1]) == 2 and len(colab.calls()[0]) == 1, again.stdout


def test_a_failing_clone_stops_the_cell_with_what_to_do(colab):
    done = colab.run(FAKE_GIT_FAILS="1")
    assert done.returncode != 0 and "CELL DONE" not in done.stdout
    assert f"RuntimeError: Could not clone {nbtools.REPO_URL}" in done.stderr, done.stderr
    assert "opens in a browser" in done.stderr and "terminal prompts disabled" in done.stdout
    assert colab.calls()[1] == [], "pip ran after a failed clone"


def test_a_failing_pip_stops_the_cell_and_the_next_run_tries_again(colab):
    done = colab.run(FAKE_PIP_EXIT="1")
    assert done.returncode != 0 and "RuntimeError: Installing the course failed" in done.stderr, done.stderr
    assert "run this cell again" in done.stderr.lower()
    assert len(colab.calls()[1]) == 1  # stopped at the first pip call
    fixed = colab.run()
    assert fixed.returncode == 0 and len(colab.calls()[1]) == 3, fixed.stdout + fixed.stderr


@pytest.mark.parametrize("name", STALE_LIBRARIES)
def test_a_library_imported_before_the_install_asks_for_a_restart(colab, name):
    installed = importlib.metadata.version(name)
    before = f"sys.modules[{name!r}] = types.SimpleNamespace(__version__='0.0.1')  # Colab's older one, imported"
    done = colab.run(before=before)
    assert done.returncode != 0 and "Runtime -> Restart session" in done.stderr, done.stderr
    assert f"{name} 0.0.1 (installed now: {installed})" in done.stderr
    # the same library imported at the installed version is fine
    current = colab.run(before=f"sys.modules[{name!r}] = types.SimpleNamespace(__version__={installed!r})")
    assert current.returncode == 0, current.stderr


def test_off_colab_the_cell_does_nothing(colab):
    script = f"exec(open({str(colab.tmp / 'cell.py')!r}).read()); print('CELL DONE')"
    env = {**os.environ, "PATH": f"{colab.tmp / 'bin'}:{os.environ['PATH']}", "FAKE_LOG": str(colab.log)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "CELL DONE" in done.stdout and colab.calls() == ([], [])


# --- the course's repository, one setting ---------------------------------------------------------------------------


def test_a_fork_changes_one_setting_and_every_badge_and_the_clone_url_follow(tmp_path):
    fork = "workshop-org/dpo-workshop"
    setting = (REPO_ROOT / "pyproject.toml").read_text()
    assert tomllib.loads(setting)["tool"]["course"]["repository"] == nbtools.REPOSITORY
    (tmp_path / "pyproject.toml").write_text(setting.replace(f'"{nbtools.REPOSITORY}"', f'"{fork}"'))
    (tmp_path / "scripts").mkdir()
    for name in ("__init__.py", "nbtools.py"):  # the copy, not this checkout's, is `scripts.nbtools` there
        shutil.copy(REPO_ROOT / "scripts" / name, tmp_path / "scripts" / name)
    copies = []
    for path in NOTEBOOKS:
        (tmp_path / path.parent.name).mkdir(exist_ok=True)
        copies.append(shutil.copy(path, tmp_path / path.parent.name / path.name))
    nb0 = json.loads(Path(copies[0]).read_text())  # a title cell without a badge gets one under its title
    nb0["cells"][0]["source"] = "# 00 · a title\n\nText."
    Path(copies[0]).write_text(json.dumps(nb0))

    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    stamp = [sys.executable, "scripts/nbtools.py", "stamp", *(str(Path(c).relative_to(tmp_path)) for c in copies)]
    subprocess.run(stamp, cwd=tmp_path, env=env, check=True, capture_output=True, timeout=300)
    stamped = {c: Path(c).read_bytes() for c in copies}
    subprocess.run(stamp, cwd=tmp_path, env=env, check=True, capture_output=True, timeout=300)
    assert stamped == {c: Path(c).read_bytes() for c in copies}, "stamping twice changed something"

    for copy in map(Path, copies):
        cells = _cells(copy)
        url = f"https://colab.research.google.com/github/{fork}/blob/main/{copy.parent.name}/{copy.name}"
        assert _badges(_source(cells[0])) == [f"({url})"], copy.name
        install = _source(cells[1])
        assert f'COURSE_URL = "https://github.com/{fork}"' in install and '"/content/dpo-workshop"' in install
        assert nbtools.REPOSITORY not in _source(cells[0]) + install, copy.name
    assert _source(_cells(Path(copies[0]))[0]).startswith("# 00 · a title\n\n[![Open In Colab]")

    readme = ("import json, sys; from scripts import nbtools; costs = nbtools.read_costs(); "
              "print(nbtools.readme_block('notebooks', costs, {n: (n, '') for n in costs}))")
    table = subprocess.run([sys.executable, "-c", readme], cwd=tmp_path, env={**env, "PYTHONPATH": f"{tmp_path}:"
                           f"{REPO_ROOT}"}, check=True, capture_output=True, text=True, timeout=120).stdout
    badges = _badges(table)
    assert badges and all(f"/github/{fork}/blob/main/notebooks/" in b for b in badges), table


# --- Colab's image, rebuilt (scripts/colab_stack.sh) ---------------------------------------------------------------


@pytest.mark.timeout(3600)
def test_the_course_installs_and_runs_on_colabs_stack():
    """Python 3.13, torch 2.11 and Colab's preinstalled versions; the install cell; every notebook on tiny; 04-06
    on the t4 stand-in. Only where the image is built: it downloads several GB (a CUDA torch)."""
    script = ["bash", str(REPO_ROOT / "scripts" / "colab_stack.sh")]
    built = subprocess.run([*script, "built"], capture_output=True, text=True)
    if built.returncode != 0:
        pytest.skip("Colab's simulated image is not built (several GB to download): "
                    "bash scripts/colab_stack.sh build, then this test runs it")
    for step in ("install", "run"):
        done = subprocess.run([*script, step], capture_output=True, text=True, timeout=3000)
        assert done.returncode == 0, f"colab_stack.sh {step} failed:\n{done.stdout[-6000:]}\n{done.stderr[-3000:]}"
    result = (REPO_ROOT / ".cache" / "colab-sim" / "result.md").read_text()
    assert "FAIL" not in result and "python 3.13" in result, result
