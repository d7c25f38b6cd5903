"""Saving without losing anything: atomic folder and file writes, and finding the checkpoint to resume from.

A crash (or a killed Colab runtime) in the middle of a save must never leave a half-written model or results file
where a complete one was: every save here writes to a temporary name next to the target and renames it into place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def save_atomically(save_fn: Callable[[Path], Any], target: str | Path, *, overwrite: bool = True) -> Path:
    """Call ``save_fn(tmp_folder)`` then rename the folder to ``target``: a crash leaves the old one intact."""
    target = Path(target)
    old = target.with_name(f".{target.name}.old")
    if not target.exists() and old.exists():  # a crash between the two renames below: the old one comes back
        old.replace(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already holds a saved model; pass overwrite=True to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        save_fn(tmp)
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


def write_text_atomically(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename (folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json_atomically(path: str | Path, payload: Any, *, indent: int | None = 2) -> Path:
    """``payload`` as JSON at ``path``, written atomically (see :func:`write_text_atomically`)."""
    return write_text_atomically(path, json.dumps(payload, indent=indent, default=str) + "\n")


def latest_complete_checkpoint(folder: str | Path) -> Path | None:
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
