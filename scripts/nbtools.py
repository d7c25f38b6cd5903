"""Notebook maintenance: execute a notebook in place (tiny profile, offline), strip noisy metadata, and stamp the
cells every notebook shares (the Colab install cell, the Drive parameter, the start call, Colab's GPU metadata).

    python scripts/nbtools.py execute notebooks/01_chatml_formatting.ipynb [...]
    python scripts/nbtools.py strip notebooks/*.ipynb
    python scripts/nbtools.py stamp notebooks/*.ipynb solutions/*.ipynb
    python scripts/nbtools.py course OUT_DIR notebooks/*.ipynb      # the course command's runner (2 at a time)
    python scripts/nbtools.py costs                                 # docs/costs.csv -> README and notebook headers
    python scripts/nbtools.py standin full notebooks/08_beyond_dpo.ipynb [NAME=VALUE ...]
        # a copy run on the offline stand-in of a GPU profile (t4 or full) with the notebook's short-run parameters
        # (its metadata "course": {"short_run": {...}}) and NAME=VALUE added; written to outputs/standins/<profile>/
"""

from __future__ import annotations

import copy
import csv
import os
import re
import sys
import time
import tomllib
from pathlib import Path
from string import Template

import nbformat
from nbclient import NotebookClient

from helpers.profiles import REPO_ROOT

# The environment of every offline run (CI, the course command, the tests' notebook runs, the benchmarks).
OFFLINE_ENV = {"COURSE_PROFILE": "tiny", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONHASHSEED": "0"}
NOTEBOOK_ENV = {**OFFLINE_ENV, "MPLBACKEND": "module://matplotlib_inline.backend_inline"}
COLAB_METADATA = {"colab": {"provenance": [], "gpuType": "T4"}, "accelerator": "GPU"}
USE_DRIVE_LINE = "USE_DRIVE = True  # on Colab: keep run folders on Google Drive, so a later runtime finds them"
COLAB_BADGE = "[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
BADGE_LINK = re.compile(re.escape(COLAB_BADGE) + r"\([^)]*\)")


PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def course_repository(pyproject: Path = PYPROJECT) -> str:
    """The course's GitHub repository, ``owner/name``: the one setting (pyproject.toml, ``[tool.course]
    repository``) that the badges and the install cell's clone URL are written from; a fork changes only it."""
    with pyproject.open("rb") as f:
        return tomllib.load(f)["tool"]["course"]["repository"]


REPOSITORY = course_repository()
REPO_URL = f"https://github.com/{REPOSITORY}"
NOTEBOOK_COLAB_URL = f"https://colab.research.google.com/github/{REPOSITORY}/blob/main/notebooks/{{name}}"
# Cell 1 of every notebook. Plain Python, not `!` lines: a failing `!` command never stops the notebook.
INSTALL_CELL = Template("""\
# Colab only: fetch the course and install its pinned libraries (Colab's own torch is kept). Run it again and it
# skips what is done; it stops with a message when a step fails or when the runtime must be restarted.
import importlib.metadata
import os
import subprocess
import sys

if "google.colab" in sys.modules:
    COURSE_URL = "$url"
    COURSE_DIR = "/content/$folder"
    # no prompt for a user name (a missing repository fails at once); pip runs in this kernel's own Python
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "PYTHON": sys.executable}

    def run(*command: str) -> int:  # shows the command's output here, as it comes
        with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as p:
            for line in p.stdout:
                print(line, end="")
        return p.returncode

    if not os.path.isdir(f"{COURSE_DIR}/.git") and run("git", "clone", "-q", "--depth=1", COURSE_URL, COURSE_DIR):
        raise RuntimeError(f"Could not clone {COURSE_URL}: check that it opens in a browser (a private or renamed "
                           "repository cannot be cloned), fix COURSE_URL if needed, and run this cell again.")
    if run("bash", f"{COURSE_DIR}/scripts/setup_env.sh"):
        raise RuntimeError("Installing the course failed (its error is above). Run this cell again; if it fails "
                           "again: Runtime -> Disconnect and delete runtime, then run the notebook from the top.")
    # a library imported before this cell keeps its old version in memory until the session restarts
    installed = {name: importlib.metadata.version(name) for name in
                 ("transformers", "tokenizers", "trl", "peft", "datasets", "accelerate", "huggingface_hub", "pyarrow")}
    stale = [f"{name} {sys.modules[name].__version__} (installed now: {version})"
             for name, version in installed.items() if name in sys.modules and sys.modules[name].__version__ != version]
    if stale:
        raise RuntimeError(f"Imported before the install, at another version: {', '.join(stale)}. Runtime -> "
                           "Restart session, then run the notebook from the top (this cell skips the install).")
    if COURSE_DIR not in sys.path:
        sys.path.insert(0, COURSE_DIR)""").substitute(url=REPO_URL, folder=REPOSITORY.split("/")[1])


def colab_url(path: Path) -> str:
    """The Colab link of a notebook in notebooks/ or solutions/ (its badge's target)."""
    return NOTEBOOK_COLAB_URL.format(name=path.name).replace("/notebooks/", f"/{path.parent.name}/")


def _collapse_progress(text: str) -> str:
    """Keep what a terminal would show: for each line, only the text after its last carriage return."""
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))


def _tidy_outputs(outputs: list) -> list:
    """Merge consecutive stream outputs, collapse progress-bar redraws, shorten tracebacks to their last line."""
    tidy: list = []
    for output in outputs:
        kind = output.get("output_type")
        if kind == "stream" and tidy and tidy[-1].get("output_type") == "stream" and tidy[-1]["name"] == output["name"]:
            tidy[-1]["text"] += output["text"]
            continue
        if kind == "error":
            output["traceback"] = [f"{output['ename']}: {output['evalue']}"]
        tidy.append(output)
    for output in tidy:
        if output.get("output_type") == "stream":
            output["text"] = _collapse_progress(output["text"])
            output.pop("metadata", None)
    return tidy


def strip(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Drop execution timings and widget state; keep outputs, tags and a stable kernelspec."""
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
        **{key: nb.metadata[key] for key in (*COLAB_METADATA, "course") if key in nb.metadata},
    }
    for index, cell in enumerate(nb.cells):
        keep = {k: v for k, v in cell.metadata.items() if k in {"tags"}}
        cell.metadata = keep
        cell.id = f"cell-{index:02d}"
        if cell.cell_type == "code":
            cell.outputs = _tidy_outputs(cell.outputs)
    return nb


def stamp(nb: nbformat.NotebookNode, path: Path) -> nbformat.NotebookNode:
    """Write the shared cells of the notebook at ``path``: its Colab badge (cell 0, pointing at the notebook
    itself), the install cell (cell 1), ``USE_DRIVE`` in the parameters cell, the start call that passes it, and the
    metadata that opens a GPU runtime on Colab. Running it twice changes nothing more."""
    nb.metadata.update(COLAB_METADATA)
    badge = f"{COLAB_BADGE}({colab_url(path)})"
    title = nb.cells[0].source
    if BADGE_LINK.search(title):
        nb.cells[0].source = BADGE_LINK.sub(lambda _match: badge, title)
    else:  # under the title line
        first, _, rest = title.partition("\n")
        nb.cells[0].source = f"{first}\n\n{badge}\n{rest}"
    nb.cells[1].source = INSTALL_CELL
    for cell in nb.cells:
        if "parameters" in cell.metadata.get("tags", []):
            lines = [line for line in cell.source.splitlines() if not line.startswith("USE_DRIVE =")]
            at = next(i for i, line in enumerate(lines) if line.startswith("PROFILE =")) + 1
            cell.source = "\n".join([*lines[:at], USE_DRIVE_LINE, *lines[at:]])
    return nb


def execute(path: Path, timeout: int = 1200) -> float:
    """Run the notebook top to bottom in its own folder and write it back with outputs; returns seconds."""
    os.environ.update(NOTEBOOK_ENV)
    nb = nbformat.read(path, as_version=4)
    started = time.perf_counter()
    resources = {"metadata": {"path": str(path.parent)}}
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources=resources).execute()
    seconds = time.perf_counter() - started
    nbformat.write(strip(nb), path)
    return seconds


def with_parameters(nb: nbformat.NotebookNode, parameters: dict[str, object]) -> nbformat.NotebookNode:
    """A copy with a cell after the ``parameters`` cell that sets ``parameters`` (as papermill injects them)."""
    nb = copy.deepcopy(nb)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    lines = [f"{name} = {value!r}" for name, value in parameters.items()]
    cell = nbformat.v4.new_code_cell("# injected parameters\n" + "\n".join(lines))
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(at + 1, cell)
    return nb


def execute_copy(path: Path, out_path: Path, *, parameters: dict[str, object] | None = None,
                 env: dict[str, str] | None = None, timeout: int = 1200) -> float:
    """Run a copy of the notebook (with ``parameters`` injected, its kernel started with ``env`` added to this
    environment) in the notebook's own folder and write it, executed, to ``out_path``; returns seconds.

    The notebook in the repository is not touched: this is how a profile other than tiny (the GPU profiles on
    their offline stand-ins) runs the notebooks' cells in the tests. A cell that fails raises
    ``nbclient.exceptions.CellExecutionError``, except the exercise checks tagged ``raises-exception``.
    """
    nb = with_parameters(nbformat.read(path, as_version=4), parameters or {})
    started = time.perf_counter()
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    try:
        # the kernel gets its own environment: this process's is never changed, so that runs side by side
        # (benchmarks/seeds.py runs two seeds at a time in threads) cannot see each other's settings
        client.execute(env={**os.environ, **(env or {})})
    finally:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(strip(nb), out_path)
    return time.perf_counter() - started


# What a notebook reads from the run folder that another one writes: it starts only after those have finished.
NEEDS = {
    "05_merging": ("04_dpo_training",),  # the adapter
    "06_evaluation": ("05_merging",),  # the merged model
    "09_export_gguf": ("05_merging",),  # the merged model
    "10_on_policy_dpo": ("04_dpo_training",),  # the off-policy run it compares with
}


def lanes(notebooks: list[Path]) -> tuple[list[Path], list[Path]]:
    """Split notebooks into two lanes that can run side by side: the ones linked through run folders (NEEDS) in
    course order, and the rest. Each lane is a list to run in order (nbval in CI)."""
    linked = {name for name, needs in NEEDS.items() for name in (name, *needs)}
    return ([p for p in notebooks if p.stem in linked], [p for p in notebooks if p.stem not in linked])


def run_course(notebooks: list[Path], out_dir: Path, *, jobs: int = 2, timeout: int = 1200) -> dict[str, float]:
    """Execute the notebooks (executed copies in ``out_dir``), ``jobs`` at a time, each after the notebooks it
    needs (:data:`NEEDS`); returns the seconds each took. Every kernel uses one torch thread (helpers.notebook), so
    two notebooks at a time use both cores of a 2-core machine. The first failure stops the run; the rest is
    cancelled, and its log is in ``out_dir``."""
    import subprocess

    names = [p.stem for p in notebooks]

    def downstream(name: str) -> int:  # how many notebooks wait, directly or not, for this one: start those first
        direct = [other for other, needs in NEEDS.items() if name in needs and other in names]
        return len(direct) + sum(downstream(other) for other in direct)

    waiting = sorted(notebooks, key=lambda p: (-downstream(p.stem), p.stem))
    running, seconds = {}, {}
    while waiting or running:
        ready = [p for p in waiting if all(n in seconds or n not in names for n in NEEDS.get(p.stem, ()))]
        while ready and len(running) < jobs:
            path = ready.pop(0)
            waiting.remove(path)
            log = (out_dir / f"{path.stem}.log").open("w")
            command = [sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute",
                       f"--ExecutePreprocessor.timeout={timeout}", "--ExecutePreprocessor.kernel_name=python3",
                       "--output-dir", str(out_dir), str(path)]
            running[path.stem] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), time.perf_counter())
        time.sleep(0.2)
        for name, (proc, started) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            if proc.returncode != 0:
                for other, _ in running.values():
                    other.kill()
                tail = (out_dir / f"{name}.log").read_text().splitlines()[-40:]
                raise RuntimeError(f"{name} failed (log: {out_dir / name}.log):\n" + "\n".join(tail))
            seconds[name] = time.perf_counter() - started
            print(f"[course] {name + '.ipynb':40} ok  {seconds[name]:4.0f} s", flush=True)
    return seconds


COSTS_FILE = REPO_ROOT / "docs" / "costs.csv"
COST_PARAGRAPH = re.compile(r"\*\*Cost(\*\*[:.( ]|[:.]\*\*).*?(?=\n\n|\Z)", re.S)  # **Cost** (...): / **Cost**:
README_BLOCKS = ("notebooks", "colab")  # README sections written from the cost table, between marker comments


def read_costs(path: Path = COSTS_FILE) -> dict[str, dict[str, str]]:
    """The course's one table of costs, by notebook name (columns: cpu_seconds, t4, a100, memory)."""
    with path.open(encoding="utf-8", newline="") as f:
        return {row["notebook"]: row for row in csv.DictReader(f)}


def cost_line(row: dict[str, str]) -> str:
    """A notebook's **Cost** paragraph, written from its row of docs/costs.csv."""
    return (f"**Cost** ([docs/costs.csv](../docs/costs.csv)): CPU, `tiny` profile: {row['cpu_seconds']} s "
            f"(measured, one notebook at a time on 2 cores) · free Colab T4, `t4` profile: {row['t4']} · one A100, "
            f"`full` profile: {row['a100']}. {row['memory']}")


def readme_block(name: str, costs: dict[str, dict[str, str]], titles: dict[str, tuple[str, str]]) -> str:
    """The README table ``name`` (``notebooks`` or ``colab``) from the cost table and the notebooks' titles."""
    if name == "notebooks":
        lines = ["| # | notebook | what you learn | CPU (tiny, measured) |", "| --- | --- | --- | --- |"]
        for nb, row in costs.items():
            title, learn = titles[nb]
            badge = f"{COLAB_BADGE}({NOTEBOOK_COLAB_URL.format(name=nb + '.ipynb')})"
            lines.append(f"| {nb[:2]} | [{title}](notebooks/{nb}.ipynb) {badge} | {learn} | {row['cpu_seconds']} s |")
        return "\n".join(lines)
    lines = ["| notebook | free Colab T4 (`t4`) | one A100 (`full`) |", "| --- | --- | --- |"]
    lines += [f"| {nb[:2]} {titles[nb][0]} | {row['t4']} | {row['a100']} |" for nb, row in costs.items()]
    return "\n".join(lines)


def stamp_costs(readme: Path = REPO_ROOT / "README.md") -> None:
    """Write every notebook's **Cost** paragraph and the README's two cost tables from docs/costs.csv."""
    costs = read_costs()
    titles = {}
    for name, row in costs.items():
        path = REPO_ROOT / "notebooks" / f"{name}.ipynb"
        nb = nbformat.read(path, as_version=4)
        title = nb.cells[0].source.splitlines()[0].split("·", 1)[1].strip()
        titles[name] = (title, row["learn"])
        if not COST_PARAGRAPH.search(nb.cells[0].source):
            raise ValueError(f"{path.name}: its title cell has no **Cost** paragraph to replace")
        line = cost_line(row)
        nb.cells[0].source = COST_PARAGRAPH.sub(lambda _match, line=line: line, nb.cells[0].source, count=1)
        nbformat.write(nb, path)
    text = readme.read_text(encoding="utf-8")
    for block in README_BLOCKS:
        start, end = f"<!-- costs:{block} -->", f"<!-- /costs:{block} -->"
        before, rest = text.split(start, 1)
        _, after = rest.split(end, 1)
        text = f"{before}{start}\n{readme_block(block, costs, titles)}\n{end}{after}"
    readme.write_text(text, encoding="utf-8")


def short_run(path: Path) -> dict[str, object]:
    """The parameters that make a notebook a short run through its code path (its metadata's course.short_run)."""
    return dict(nbformat.read(path, as_version=4).metadata.get("course", {}).get("short_run", {}))


def run_on_standin(path: Path, profile: str, out_dir: Path, extra: dict[str, object] | None = None,
                   timeout: int = 1200) -> float:
    """Execute a copy of the notebook on the offline stand-in of ``profile`` with its short-run parameters (and
    ``extra``), outputs and run folders under ``out_dir``; returns seconds. Raises on the first failing cell."""
    env = {**NOTEBOOK_ENV, "COURSE_PROFILE": profile, "COURSE_STANDINS": "1", "COURSE_OUTPUT_DIR": str(out_dir),
           "MPLBACKEND": "Agg", "TQDM_DISABLE": "1"}
    return execute_copy(path, out_dir / "executed" / path.name, parameters={**short_run(path), **(extra or {})},
                        env=env, timeout=timeout)


def main(argv: list[str]) -> int:
    """Command line entry point."""
    if argv[:1] == ["costs"]:
        stamp_costs()
        return 0
    if argv[:1] == ["lanes"]:  # two lines: the notebooks of each lane, each followed by its solutions
        for lane in lanes(sorted(Path("notebooks").glob("[0-9][0-9]_*.ipynb"))):
            solutions = [Path("solutions") / f"{p.stem}_solutions.ipynb" for p in lane]
            print(" ".join(str(p) for p in [*lane, *(s for s in solutions if s.exists())]))
        return 0
    if argv[:1] == ["standin"] and len(argv) >= 3:
        import ast

        extra = {k: ast.literal_eval(v) for k, v in (a.split("=", 1) for a in argv[3:])}
        path = Path(argv[2])
        seconds = run_on_standin(path, argv[1], REPO_ROOT / "outputs" / "standins" / argv[1], extra)
        print(f"{path.name} on the {argv[1]} stand-in: ok in {seconds:.0f} s")
        return 0
    if len(argv) < 2 or argv[0] not in {"execute", "strip", "stamp", "course"}:
        print(__doc__)
        return 2
    if argv[0] == "course":
        out_dir = Path(argv[1])
        out_dir.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        try:
            seconds = run_course([Path(p) for p in argv[2:]], out_dir, jobs=int(os.environ.get("COURSE_JOBS", "2")))
        except RuntimeError as exc:
            print(f"[course] FAILED: {exc}", file=sys.stderr)
            return 1
        print(f"[course] {len(seconds)} notebooks in {time.perf_counter() - started:.0f} s "
              f"(each alone: {sum(seconds.values()):.0f} s in total)")
        return 0
    for name in argv[1:]:
        path = Path(name)
        if argv[0] == "execute":
            print(f"{path.name}: {execute(path):.1f} s")
        elif argv[0] == "stamp":
            nbformat.write(strip(stamp(nbformat.read(path, as_version=4), path)), path)
        else:
            nbformat.write(strip(nbformat.read(path, as_version=4)), path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
