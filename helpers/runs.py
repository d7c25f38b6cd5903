"""Run folders, and saving without losing anything.

Each run lives in ``outputs/runs/<profile>-<run_id>/``: notebook 04 writes its adapter and log there, 05 its merged
model, 06 its results; later notebooks find them by the same name. A crash (or a Colab runtime that is cut) in the
middle of a save must never leave a half-written model or results file where a complete one was: every save here
writes to a temporary name beside the target and renames it into place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from helpers.profiles import REPO_ROOT


def outputs_dir() -> Path:
    """Where runs go: $COURSE_OUTPUT_DIR (Google Drive on Colab, see helpers.notebook), else outputs/ in the repo."""
    return Path(os.environ.get("COURSE_OUTPUT_DIR", REPO_ROOT / "outputs"))


def run_dir(profile_name: str, run_id: str = "main") -> Path:
    """The folder of one run, ``outputs/runs/<profile>-<run_id>``: named so one run is never taken for another's."""
    if not run_id or any(c in run_id for c in "/\\ ") or run_id.startswith("."):
        raise ValueError(f"run_id must be a plain name without spaces or slashes, not {run_id!r}")
    return outputs_dir() / "runs" / f"{profile_name}-{run_id}"


def display_path(path: str | Path) -> str:
    """``path`` relative to the repository when inside it: short, and free of this machine's folders."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def save_atomically(save: Callable[[Path], Any], target: str | Path, *, overwrite: bool = True) -> Path:
    """Call ``save(tmp_folder)``, then rename the folder to ``target``: a crash leaves any old ``target`` intact."""
    target = Path(target)
    old = target.with_name(f".{target.name}.old")
    if not target.exists() and old.exists():  # a crash between the two renames below: the old one comes back
        old.replace(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{display_path(target)} already holds a saved model; pass overwrite=True to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        save(tmp)
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            target.replace(old)
            tmp.replace(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.replace(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def write_json(path: str | Path, payload: Any) -> Path:
    """``payload`` as JSON at ``path``, through a temporary file in the same folder and a rename (folders made)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n", encoding="utf-8")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_json(path: str | Path) -> Any:
    """What :func:`write_json` wrote, with a message naming the notebook to run when the file is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{display_path(path)} not found: run the notebook that writes it first")
    return json.loads(path.read_text(encoding="utf-8"))


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The newest ``checkpoint-N`` whose ``trainer_state.json`` (the last file a checkpoint writes) parses.

    A run killed while writing a checkpoint leaves a half-written folder; resuming from it would fail.
    """
    found = [p for p in Path(folder).glob("checkpoint-*") if p.name.rsplit("-", 1)[-1].isdigit()]
    for path in sorted(found, key=lambda p: int(p.name.rsplit("-", 1)[-1]), reverse=True):
        try:
            json.loads((path / "trainer_state.json").read_text())
            return path
        except (OSError, ValueError):
            continue
    return None
