"""helpers.runs: run folders named so that one run is never taken for another, saves that a crash cannot
half-write, and the checkpoint a resumed run starts from."""

from __future__ import annotations

import json

import pytest

from helpers.runs import display_path, latest_checkpoint, read_json, run_dir, save_atomically, write_json


@pytest.mark.parametrize("bad", ["", "a/b", "a\\b", "my run", ".hidden"])
def test_run_ids_that_are_not_plain_names_are_refused(bad):
    with pytest.raises(ValueError, match="run_id must be a plain name"):
        run_dir("tiny", bad)


def test_a_run_folder_is_named_by_profile_and_run_id(monkeypatch, tmp_path):
    monkeypatch.setenv("COURSE_OUTPUT_DIR", str(tmp_path))
    assert run_dir("t4", "lr-sweep-2") == tmp_path / "runs" / "t4-lr-sweep-2"


def test_a_save_that_fails_leaves_the_old_folder_and_no_debris(tmp_path):
    target = tmp_path / "adapter"
    save_atomically(lambda folder: (folder / "weights").write_text("old"), target)

    def crash(folder):
        (folder / "weights").write_text("half")
        raise KeyboardInterrupt  # the runtime was cut half-way

    with pytest.raises(KeyboardInterrupt):
        save_atomically(crash, target)
    assert (target / "weights").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_a_save_replaces_only_when_asked_and_comes_back_after_a_crash_between_the_renames(tmp_path):
    target = tmp_path / "merged"
    save_atomically(lambda folder: (folder / "config.json").write_text("1"), target)
    with pytest.raises(FileExistsError, match="already holds"):
        save_atomically(lambda folder: (folder / "config.json").write_text("2"), target, overwrite=False)
    assert (target / "config.json").read_text() == "1"
    target.replace(tmp_path / ".merged.old")  # killed after moving the old one aside, before the new one came in
    save_atomically(lambda folder: (folder / "config.json").write_text("3"), target)
    assert (target / "config.json").read_text() == "3" and not (tmp_path / ".merged.old").exists()


def test_json_round_trip_and_a_missing_file_named_without_this_machines_folders(tmp_path):
    path = write_json(tmp_path / "a" / "results.json", {"accuracy": 0.5, "rows": [1, 2]})
    assert read_json(path) == json.loads(path.read_text()) == {"accuracy": 0.5, "rows": [1, 2]}
    assert [p.name for p in path.parent.iterdir()] == ["results.json"], "no temporary file left behind"
    with pytest.raises(FileNotFoundError, match="run the notebook that writes it"):
        read_json(tmp_path / "missing.json")


def test_display_path_is_relative_inside_the_repository():
    from helpers.profiles import REPO_ROOT

    assert display_path(REPO_ROOT / "outputs" / "runs") == "outputs/runs"


def test_resuming_skips_a_checkpoint_that_was_being_written(tmp_path):
    for step, complete in ((50, True), (100, True), (150, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "trainer_state.json").write_text(f'{{"global_step": {step}}}' if complete else '{"global_')
    (tmp_path / "checkpoint-final").mkdir()
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-100"
    assert latest_checkpoint(tmp_path / "nothing") is None
