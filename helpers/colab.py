"""Google Colab: keep the run folders on Google Drive, so a session that ends does not take the work with it.

A Colab runtime forgets its disk when it stops. With the outputs on Drive a learner can train in notebook 04,
close the tab, and come back later (a new runtime) to merge and evaluate in 05 and 06::

    from helpers.colab import use_drive
    use_drive()            # before helpers.notebook.start(...)

Off Colab nothing changes: the usual ``outputs/`` folder (or ``$COURSE_OUTPUT_DIR``) is returned, with a note.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DRIVE_MOUNT_POINT = Path("/content/drive")
DEFAULT_DRIVE_FOLDER = "MyDrive/dpo-course"
OUTPUT_ENV_VAR = "COURSE_OUTPUT_DIR"  # read by helpers.paths.outputs_dir


def on_colab() -> bool:
    """True inside a Google Colab runtime (its ``google.colab`` module is loaded there, and only there)."""
    return "google.colab" in sys.modules


def _mount_drive(mount_point: Path) -> None:
    """Mount Google Drive at ``mount_point`` (Colab asks the learner to allow it once per session)."""
    from google.colab import drive  # type: ignore[import-not-found]

    drive.mount(str(mount_point))


def use_drive(folder: str = DEFAULT_DRIVE_FOLDER) -> Path:
    """On Colab: mount Google Drive and send every run's outputs to ``/content/drive/<folder>/outputs``.

    Sets ``$COURSE_OUTPUT_DIR`` (what :func:`helpers.paths.outputs_dir` reads), so adapters, merged models,
    plots and results of ``outputs/runs/<profile>-<run_id>/`` survive the runtime; a later session that calls
    ``use_drive()`` with the same ``folder`` finds them again. ``folder`` is relative to the Drive mount
    (``MyDrive/...`` is your own Drive). Returns the outputs folder.

    Off Colab: changes nothing and returns the usual outputs folder, printing a note.
    """
    from helpers.paths import outputs_dir

    if not on_colab():
        current = outputs_dir()
        print(f"not on Colab: Google Drive is not used; outputs stay in {current}")
        return current
    relative = Path(folder)
    if relative.is_absolute() or ".." in relative.parts:
        raise ValueError(f"folder must be a path inside your Drive such as {DEFAULT_DRIVE_FOLDER!r}, not {folder!r}")
    if not (DRIVE_MOUNT_POINT / "MyDrive").is_dir():
        _mount_drive(DRIVE_MOUNT_POINT)
    target = DRIVE_MOUNT_POINT / relative / "outputs"
    target.mkdir(parents=True, exist_ok=True)
    os.environ[OUTPUT_ENV_VAR] = str(target)
    found = sorted(p.name for p in (target / "runs").glob("*") if p.is_dir())
    print(f"outputs on Google Drive: {target}" + (f" (runs found: {', '.join(found)})" if found else ""))
    return target
