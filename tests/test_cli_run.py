"""``python -m helpers run``: the whole pipeline headless (train, merge, evaluate), as a subprocess.

The tiny run takes 10 DPO steps and a 16-example lm-eval (about a minute on 2 free CPU cores, several when the
machine is shared); the refusals take a second.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers.paths import REPO_ROOT
from helpers.profiles import PROFILE_NAMES

RUN_TIMEOUT_S = 840  # under pytest-timeout's 900


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"COURSE_PROFILE", "COURSE_OUTPUT_DIR", "COURSE_TRACE_DIR"}}
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=str(REPO_ROOT),
    )
    return env


def _helpers(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "helpers", *args],
        cwd=REPO_ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _is_share(value) -> bool:
    return isinstance(value, int | float) and 0.0 <= value <= 1.0


def test_run_tiny_writes_the_results_file_with_its_schema(tiny_model_path, tmp_path):
    out = tmp_path / "out"
    proc = _helpers(
        "run", "--profile", "tiny", "--max-steps", "10", "--output-dir", str(out), "--lm-eval-limit", "16",
        timeout=RUN_TIMEOUT_S,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    run = out / "runs" / "tiny-main"
    run_results, copy = run / "eval_results.json", out / "eval_results.json"
    assert run_results.is_file() and copy.is_file()
    assert json.loads(copy.read_text()) == json.loads(run_results.read_text())
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "merged" / "config.json").is_file()
    assert len(json.loads((run / "history.json").read_text())) == 2  # logged at steps 5 and 10

    results = json.loads(run_results.read_text())
    assert results["profile"] == "tiny"
    acc = results["heldout_preference_accuracy"]
    assert _is_share(acc["base"]) and _is_share(acc["dpo"])
    assert acc["by_kind"] and all(_is_share(v["base"]) and _is_share(v["dpo"]) for v in acc["by_kind"].values())
    assert _is_share(results["well_formed"]["base"]) and _is_share(results["well_formed"]["dpo"])
    assert results["lm_eval"], "lm_eval block is empty"
    for task, scores in results["lm_eval"].items():
        assert _is_share(scores["base"]) and _is_share(scores["dpo"]), f"lm_eval[{task!r}] = {scores}"
    assert "side_by_side" in results and "targets_met" in results
    assert "[3/3] evaluating" in proc.stdout


def test_run_refuses_an_unknown_profile_naming_the_valid_ones(tmp_path):
    proc = _helpers("run", "--profile", "huge", "--output-dir", str(tmp_path))
    assert proc.returncode != 0
    assert "huge" in proc.stderr and all(name in proc.stderr for name in PROFILE_NAMES), proc.stderr
    assert not any(tmp_path.iterdir()), "nothing may be written when the profile is refused"


def test_run_full_on_a_cpu_machine_says_it_needs_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():  # pragma: no cover - the CPU suite
        import pytest

        pytest.skip("this machine has a CUDA GPU")
    proc = _helpers("run", "--profile", "full", "--output-dir", str(tmp_path))
    assert proc.returncode != 0
    assert "needs a CUDA GPU" in proc.stderr and "tiny" in proc.stderr, proc.stderr
    assert not any(tmp_path.iterdir())


def test_run_refuses_a_bad_run_id(tmp_path):
    proc = _helpers("run", "--profile", "tiny", "--run-id", "a/b", "--output-dir", str(tmp_path))
    assert proc.returncode != 0 and "run_id" in proc.stderr
