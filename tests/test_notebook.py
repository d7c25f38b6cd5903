"""helpers.notebook: the start-up every notebook runs (the profile, the seed, Google Drive on Colab) and the
exercises' self-check."""

from __future__ import annotations

import importlib.machinery
import random
import sys
import types
from pathlib import Path

import pytest
import torch

from helpers import notebook
from helpers.profiles import REPO_ROOT
from helpers.runs import outputs_dir, run_dir


def fake_colab(monkeypatch, tmp_path) -> list[str]:
    """A ``google.colab`` module whose Drive mounts into ``tmp_path`` (the HF libraries are imported first: with a
    fake ``google`` package in ``sys.modules`` their own imports of Google's packages would fail)."""
    import transformers  # noqa: F401
    import trl  # noqa: F401

    mounted: list[str] = []

    def mount(where: str) -> None:
        mounted.append(where)
        (Path(where) / "MyDrive").mkdir(parents=True, exist_ok=True)

    google, colab = types.ModuleType("google"), types.ModuleType("google.colab")
    google.__spec__ = importlib.machinery.ModuleSpec("google", None)  # libraries probe for Colab with find_spec
    colab.__spec__ = importlib.machinery.ModuleSpec("google.colab", None)
    colab.drive = types.SimpleNamespace(mount=mount)
    google.colab = colab
    monkeypatch.setitem(sys.modules, "google", google)
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.setattr(notebook, "DRIVE", tmp_path / "drive")
    monkeypatch.delenv("COURSE_OUTPUT_DIR", raising=False)
    return mounted


def test_on_colab_the_runs_go_to_google_drive_and_a_later_session_finds_them(monkeypatch, tmp_path, capsys):
    mounted = fake_colab(monkeypatch, tmp_path)
    target = notebook.use_drive()
    assert mounted == [str(tmp_path / "drive")]
    assert target == tmp_path / "drive" / "MyDrive" / "dpo-course" / "outputs" and target.is_dir()
    assert outputs_dir() == target and run_dir("t4", "main") == target / "runs" / "t4-main"
    (target / "runs" / "t4-main").mkdir(parents=True)
    assert notebook.use_drive() == target and len(mounted) == 1, "a mounted Drive is not mounted again"
    assert "t4-main" in capsys.readouterr().out
    with pytest.raises(ValueError, match="inside your Drive"):
        notebook.use_drive("../etc")


@pytest.mark.parametrize("use_drive", [True, False])
def test_start_uses_drive_on_colab_unless_told_not_to(monkeypatch, tmp_path, use_drive):
    mounted = fake_colab(monkeypatch, tmp_path)
    notebook.start("tiny", use_drive_on_colab=use_drive)
    assert bool(mounted) == use_drive
    expected = tmp_path / "drive" / "MyDrive" / "dpo-course" / "outputs" if use_drive else REPO_ROOT / "outputs"
    assert outputs_dir() == expected


def test_off_colab_start_leaves_the_outputs_where_they_are(monkeypatch, capsys):
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    monkeypatch.delenv("COURSE_OUTPUT_DIR", raising=False)
    notebook.start("tiny")
    assert outputs_dir() == REPO_ROOT / "outputs" and "Drive" not in capsys.readouterr().out


def test_start_seeds_everything_and_hands_the_seed_to_the_trainers(capsys):
    profile = notebook.start("tiny", seed=7)
    drawn = (random.random(), torch.rand(1).item())
    notebook.start("tiny", seed=7)
    assert (random.random(), torch.rand(1).item()) == drawn, "the same seed must give the same draws"
    assert profile.dpo["seed"] == profile.dpo["data_seed"] == 7
    assert capsys.readouterr().out.splitlines()[0].startswith("profile: tiny (asked for explicitly)")


def test_check_tells_right_from_wrong(capsys):
    notebook.check("sum", 3, 3)
    notebook.check("ratio", 0.3334, 1 / 3, tol=1e-3)
    assert capsys.readouterr().out.splitlines() == ["sum: exact ✓", "ratio: approximately right ✓ (off by 6.7e-05)"]
    with pytest.raises(AssertionError, match="not answered yet"):
        notebook.check("sum", None, 3)
    with pytest.raises(AssertionError, match="is not right. hint"):
        notebook.check("sum", 4, 3, hint="hint")
    with pytest.raises(AssertionError):
        notebook.check("flag", True, 1.0)  # a bool is not a number here: True == 1.0 would pass by accident


def test_versions_name_every_course_library():
    found = notebook.versions()
    assert set(found) == {"python", *notebook.LIBRARIES} and found["torch"].startswith(torch.__version__[:4])
