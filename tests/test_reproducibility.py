"""The tiny run is reproducible: two runs with the same seed give the same loss curve and the same
held-out evaluation, bit for bit; and each run's folder is named by profile and run id and holds the
resolved profile and safetensors weights only.

The two runs train in parallel subprocesses (tests/_train_worker.py), one CPU thread each.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _train_worker import finish, start_worker, training_profile

MAX_STEPS = 10
RUN_IDS = ("repro-a", "repro-b")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("repro")
    args = ["--max-steps", str(MAX_STEPS), "--save-steps", str(MAX_STEPS)]
    logs = {run_id: root / f"{run_id}.log" for run_id in RUN_IDS}
    processes = {
        run_id: start_worker("train", "--run-id", run_id, *args, output_dir=root, log=logs[run_id])
        for run_id in RUN_IDS
    }
    try:
        for run_id, process in processes.items():
            finish(process, logs[run_id])
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    return {"root": root, **{run_id: root / "runs" / f"tiny-{run_id}" for run_id in RUN_IDS}}


def history(run: Path) -> list[dict[str, float]]:
    return json.loads((run / "history.json").read_text())


def test_run_folders_are_named_by_profile_and_run_id(runs: dict[str, Path], monkeypatch) -> None:
    from helpers.paths import run_dir

    monkeypatch.setenv("COURSE_OUTPUT_DIR", str(runs["root"]))
    for run_id in RUN_IDS:
        assert run_dir("tiny", run_id) == runs[run_id]
        assert (runs[run_id] / "adapter" / "adapter_model.safetensors").is_file()


def test_same_seed_gives_the_same_loss_curve_bitwise(runs: dict[str, Path]) -> None:
    a, b = (history(runs[run_id]) for run_id in RUN_IDS)
    assert [row["step"] for row in a] == list(range(1, MAX_STEPS + 1))
    assert [row["loss"] for row in a] == [row["loss"] for row in b]
    assert a == b  # every logged metric: rewards, margins, log-probs, grad norms


def test_same_seed_gives_bit_identical_adapters(runs: dict[str, Path]) -> None:
    from safetensors.torch import load_file

    a, b = (load_file(runs[run_id] / "adapter" / "adapter_model.safetensors") for run_id in RUN_IDS)
    assert a.keys() == b.keys()
    assert all(a[name].equal(b[name]) for name in a)


def test_same_seed_gives_the_same_heldout_evaluation(runs: dict[str, Path], tiny_model_path: Path) -> None:
    from peft import PeftModel

    from helpers.chatml import format_dataset
    from helpers.data import load_preference_data
    from helpers.evaluation import preference_accuracy, score_pairs
    from helpers.loading import load_model, load_tokenizer

    profile = training_profile(MAX_STEPS, MAX_STEPS)
    tokenizer = load_tokenizer(profile, str(tiny_model_path))
    heldout = format_dataset(load_preference_data(profile)["heldout"], tokenizer, split="heldout")
    scores, accuracy = [], []
    for run_id in RUN_IDS:
        base = load_model(profile, four_bit=False, source=str(tiny_model_path))
        model = PeftModel.from_pretrained(base, str(runs[run_id] / "adapter"))
        scores.append(score_pairs(model, tokenizer, heldout, batch_size=64))
        accuracy.append(preference_accuracy(scores[-1]))
    first, second = scores
    for name in ("chosen_sum", "rejected_sum", "chosen_tokens", "rejected_tokens"):
        assert getattr(first, name).equal(getattr(second, name)), name
    assert accuracy[0] == accuracy[1]


def test_run_holds_the_resolved_profile_and_safetensors_only(runs: dict[str, Path]) -> None:
    expected = training_profile(MAX_STEPS, MAX_STEPS).to_dict()
    for run_id in RUN_IDS:
        adapter = runs[run_id] / "adapter"
        assert json.loads((adapter / "course_profile.json").read_text()) == expected
        weights = [p.name for p in adapter.iterdir() if p.suffix in {".safetensors", ".bin", ".pt", ".pth", ".pkl"}]
        assert weights == ["adapter_model.safetensors"], weights
