"""Nothing lost when a run is killed: saves are atomic, and training resumes from its last checkpoint
to the same result as a run that was never interrupted.

The runs happen in subprocesses (tests/_train_worker.py) so they can be killed with SIGKILL, the way a
Colab session or an out-of-memory killer ends them: no exception handler, no cleanup.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from _train_worker import complete_json, finish, kill, start_worker, wait_for

MAX_STEPS, SAVE_STEPS, KILL_AFTER = 12, 4, 8


def file_hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def losses(run: Path) -> list[tuple[int, float]]:
    return [(int(row["step"]), row["loss"]) for row in json.loads((run / "history.json").read_text())]


# --- atomic save -------------------------------------------------------------------------------------


def test_save_killed_midway_leaves_the_previous_model_intact(tmp_path: Path, tiny_model_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from helpers.saving import save_atomically

    target = tmp_path / "runs" / "tiny-main" / "merged"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    save_atomically(lambda folder: model.save_pretrained(folder, safe_serialization=True), target)
    before = file_hashes(target)

    marker = tmp_path / "half-written"
    log = tmp_path / "save.log"
    process = start_worker("save-slowly", target, marker, output_dir=tmp_path, log=log)
    wait_for(marker, process, log)
    half_written = Path(marker.read_text())
    assert (half_written / "model.safetensors").read_bytes() == b"half of a new model"
    kill(process)

    assert file_hashes(target) == before, "the previous model was changed by a save that never finished"
    reloaded = AutoModelForCausalLM.from_pretrained(target, use_safetensors=True)
    for (name, a), b in zip(model.state_dict().items(), reloaded.state_dict().values()):
        assert a.equal(b), name
    # what the killed save left is a hidden temporary folder beside the target, never the target itself
    assert half_written.parent == target.parent and half_written.name.startswith(".merged.tmp-")


# --- resuming a killed training run ------------------------------------------------------------------


def test_checkpoint_interval_comes_from_the_profile_or_an_override(tmp_path: Path) -> None:
    from helpers.profiles import get_profile
    from helpers.training import dpo_config

    tiny = get_profile("tiny")
    assert dpo_config(tiny, tmp_path).save_steps == tiny.training.save_steps
    assert dpo_config(tiny.replace("training", save_steps=7), tmp_path).save_steps == 7
    config = dpo_config(tiny, tmp_path, save_steps=4)
    assert (config.save_steps, config.save_strategy) == (4, "steps")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An uninterrupted run and a run killed after checkpoint 8 (in parallel, one thread each), then its resume."""
    root = tmp_path_factory.mktemp("resume")
    steps = ["--max-steps", str(MAX_STEPS), "--save-steps", str(SAVE_STEPS)]
    whole, cut = root / "runs" / "tiny-whole", root / "runs" / "tiny-cut"
    logs = {name: root / f"{name}.log" for name in ("whole", "cut", "resumed")}
    uninterrupted = start_worker("train", whole, *steps, output_dir=root, log=logs["whole"])
    interrupted = start_worker("train", cut, *steps, output_dir=root, log=logs["cut"])
    try:
        # trainer_state.json is the last file a checkpoint writes: once it is whole, checkpoint 8 is complete
        state = cut / "checkpoints" / f"checkpoint-{KILL_AFTER}" / "trainer_state.json"
        wait_for(state, interrupted, logs["cut"], ready=complete_json)
        kill(interrupted)
        killed = {"adapter": (cut / "adapter").exists(), "history": (cut / "history.json").exists()}
        (root / "killed_state.json").write_text(json.dumps(killed))
        finish(uninterrupted, logs["whole"])
    finally:
        for process in (uninterrupted, interrupted):
            if process.poll() is None:
                process.kill()
                process.wait()
    resumed = start_worker("train", cut, *steps, "--resume", output_dir=root, log=logs["resumed"])
    finish(resumed, logs["resumed"])
    return {"whole": whole, "cut": cut, "root": root}


def test_checkpoints_are_written_every_save_steps(runs: dict[str, Path]) -> None:
    checkpoints = sorted(p.name for p in (runs["whole"] / "checkpoints").glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-12", "checkpoint-8"]  # every 4 steps; save_total_limit keeps the last two
    state = json.loads((runs["whole"] / "checkpoints" / "checkpoint-8" / "trainer_state.json").read_text())
    assert state["global_step"] == 8 and state["save_steps"] == SAVE_STEPS


def test_killed_run_had_saved_nothing_but_checkpoints(runs: dict[str, Path]) -> None:
    killed = json.loads((runs["root"] / "killed_state.json").read_text())
    assert killed == {"adapter": False, "history": False}, "the run was not interrupted before its end"


def test_resumed_run_ends_with_the_uninterrupted_loss(runs: dict[str, Path]) -> None:
    whole, resumed = losses(runs["whole"]), losses(runs["cut"])
    assert [step for step, _ in whole] == list(range(1, MAX_STEPS + 1))
    assert [step for step, _ in resumed] == list(range(1, MAX_STEPS + 1))  # steps 1-8 come from the checkpoint
    assert resumed[-1][1] == pytest.approx(whole[-1][1], abs=1e-6)
    for (step, a), (_, b) in zip(whole, resumed):
        assert b == pytest.approx(a, abs=1e-6), f"step {step}"


def test_resumed_adapter_equals_the_uninterrupted_one(runs: dict[str, Path]) -> None:
    from safetensors.torch import load_file

    whole = load_file(runs["whole"] / "adapter" / "adapter_model.safetensors")
    resumed = load_file(runs["cut"] / "adapter" / "adapter_model.safetensors")
    assert whole.keys() == resumed.keys()
    for name in whole:
        assert (whole[name] - resumed[name]).abs().max().item() <= 1e-6, name
