"""scripts/gpu_acceptance.sh (benchmarks.gpu_acceptance): it refuses to run without CUDA, plans the steps the machine
can run, keeps going after a failing step and says so, reads what each step wrote, and - in its test mode - runs
all its steps end to end on the CPU at tiny sizes (50 s on 2 quiet cores, 2 minutes on a busy machine).
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from benchmarks import gpu
from benchmarks import gpu_acceptance as acc
from helpers.paths import REPO_ROOT
from helpers.profiles import get_profile

SCRIPT = REPO_ROOT / "scripts" / "gpu_acceptance.sh"
H100 = {"name": "NVIDIA H100 80GB HBM3", "memory_gib": 79.1, "capability": "9.0", "native_bf16": True, "count": 1}
T4 = {"name": "Tesla T4", "memory_gib": 14.6, "capability": "7.5", "native_bf16": False, "count": 1}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {acc.TEST_MODE_ENV_VAR, "COURSE_OUTPUT_DIR"}}
    env.update(CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable, **extra)
    return env


def test_without_cuda_it_refuses_names_the_test_mode_and_writes_nothing(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run([str(SCRIPT), "--json", str(out)], cwd=tmp_path, env=_env(), capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "needs a CUDA GPU" in proc.stderr and f"{acc.TEST_MODE_ENV_VAR}=1" in proc.stderr, proc.stderr
    assert not out.exists()


def test_test_mode_switch_values():
    assert acc.test_mode_requested("1") and acc.test_mode_requested(" TRUE ") and acc.test_mode_requested("yes")
    assert not acc.test_mode_requested("") and not acc.test_mode_requested("0") and not acc.test_mode_requested("off")
    with pytest.raises(ValueError, match="GPU_ACCEPTANCE_TEST_MODE"):
        acc.test_mode_requested("maybe")


def _argv(steps, name):
    return next(s for s in steps if s.name == name).argv


def test_plan_on_an_h100_runs_all_four_steps_within_the_budget(tmp_path):
    steps = acc.plan(test_mode=False, workdir=tmp_path, gpu=H100)
    assert [s.name for s in steps] == list(acc.STEP_NAMES) and not any(s.skip for s in steps)
    assert sum(s.reserve_s for s in steps) <= acc.BUDGET_SECONDS  # what is kept for each step fits the 8 minutes
    assert all(s.timeout_s >= s.reserve_s for s in steps)
    for precision in ("fp16", "bf16"):
        step = next(s for s in steps if s.name == f"pipeline_{precision}")
        assert step.argv[1:6] == ["-m", "helpers", "run", "--profile", "t4"]
        assert step.argv[step.argv.index("--precision") + 1] == precision
        assert "--no-eval" not in step.argv and step.expect_eval
        # the real-width stand-in comes from the environment: `--standins` would switch it to the tiny width
        assert step.env == {"COURSE_STANDINS": "real"} and "--standins" not in step.argv
    dpo = _argv(steps, "dpo_step_7b")
    assert dpo[1:4] == ["-m", "benchmarks.gpu", "step"] and "--seq-len" not in dpo  # the profile's 1536 tokens
    dpo_limit = next(s for s in steps if s.name == "dpo_step_7b").timeout_s
    assert float(dpo[dpo.index("--max-train-seconds") + 1]) < dpo_limit  # training stops by time inside the limit
    assert _argv(steps, "reference_7b")[1:4] == ["-m", "benchmarks.gpu", "reference"]


def test_plan_on_a_t4_skips_bf16_and_shortens_the_7b_sequences(tmp_path):
    steps = acc.plan(test_mode=False, workdir=tmp_path, gpu=T4)
    skipped = {s.name: s.skip for s in steps if s.skip}
    assert list(skipped) == ["pipeline_bf16"] and "no native bf16" in skipped["pipeline_bf16"]
    dpo = _argv(steps, "dpo_step_7b")
    assert dpo[dpo.index("--seq-len") + 1] == "512"


def test_plan_in_test_mode_runs_on_cpu_sizes(tmp_path):
    steps = acc.plan(test_mode=True, workdir=tmp_path, gpu=None)
    fp16 = steps[0]
    assert fp16.argv[fp16.argv.index("--precision") + 1] == "fp32" and "--no-eval" in fp16.argv
    assert fp16.env == {"COURSE_STANDINS": "1"} and not fp16.expect_eval
    assert steps[1].skip and all("--test-mode" in s.argv for s in steps[2:])
    env = acc.step_environment(fp16, test_mode=True)
    assert env["CUDA_VISIBLE_DEVICES"] == "" and env["HF_HUB_OFFLINE"] == "1" and env["COURSE_STANDINS"] == "1"
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        acc.plan(test_mode=False, workdir=tmp_path, gpu=None)


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_failing_step_is_reported_and_the_next_steps_still_run(tmp_path, capsys):
    pid_file = tmp_path / "sleeper.pid"
    steps = [
        acc.Step("fails", "exits 3", _python("import sys; print('boom', file=sys.stderr); sys.exit(3)"), 60),
        acc.Step("hangs", "runs past its limit", _python(
            f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"), 3),
        acc.Step("skipped", "not for this machine", _python("print(1)"), 60, skip="no such card here"),
        acc.Step("passes", "exits 0", _python("print('fine')"), 60),
    ]
    records = acc.run_steps(steps, test_mode=True, log_dir=tmp_path / "logs", budget=None)
    assert [r["status"] for r in records] == ["failed", "timed out", "skipped", "passed"]
    assert records[0]["exit_status"] == 3 and "boom" in records[0]["log_tail"]
    assert records[1]["seconds"] < 30  # stopped at its 3 s limit, not after the 120 s sleep
    with pytest.raises(ProcessLookupError):  # and its process is gone
        os.kill(int(pid_file.read_text()), 0)
    assert records[2]["reason"] == "no such card here" and "exit_status" not in records[2]
    err = capsys.readouterr().err
    assert "FAILED: fails exited with status 3" in err and "boom" in err and "TIMED OUT: hangs" in err
    table = acc.summary_table(records)
    assert all(name in table for name in ("fails", "hangs", "skipped", "passes"))


def test_a_step_cannot_take_the_time_kept_for_the_steps_after_it(tmp_path, monkeypatch):
    monkeypatch.setattr(acc, "MIN_STEP_SECONDS", 1.0)
    steps = [acc.Step("greedy", "would sleep a minute", _python("import time; time.sleep(60)"), 60),
             acc.Step("after", "needs 8 s kept for it", _python("print(1)"), 60, reserve_s=8.0)]
    records = acc.run_steps(steps, test_mode=True, log_dir=tmp_path, budget=12.0)
    assert [r["status"] for r in records] == ["timed out", "passed"]
    assert records[0]["timeout_s"] == 4 and records[0]["seconds"] < 15  # 12 s budget - 8 s kept for "after"


def test_a_step_is_not_started_when_the_budget_is_spent(tmp_path):
    steps = [acc.Step("late", "would run", _python("print(1)"), 60)]
    records = acc.run_steps(steps, test_mode=True, log_dir=tmp_path, budget=acc.MIN_STEP_SECONDS - 1)
    assert records[0]["status"] == "not run" and "budget" in records[0]["reason"]


def test_pipeline_figures_read_what_the_pipeline_writes(tmp_path):
    run = tmp_path / "runs" / "t4-fp16"
    (run / "adapter").mkdir(parents=True)
    (run / "merged").mkdir()
    save_file({"a": torch.zeros(2, dtype=torch.float32), "b": torch.zeros(2, dtype=torch.bfloat16)},
              str(run / "adapter" / "adapter_model.safetensors"))
    (run / "adapter" / "course_profile.json").write_text(json.dumps({"training": {"precision": "fp16"}}))
    (run / "merged" / "config.json").write_text("{}")
    (run / "history.json").write_text(json.dumps([{"step": 1, "loss": 0.69}, {"step": 2, "loss": 0.68}]))
    figures, problem = acc.pipeline_figures(tmp_path, "fp16", expect_eval=True)
    assert problem == "exited 0 but wrote no eval_results.json"
    assert figures["adapter_dtypes"] == ["BF16", "F32"] and figures["losses"] == [0.69, 0.68]
    assert figures["precision"] == "fp16" and figures["merged"]
    results = {"heldout_preference_accuracy": {"base": 0.45, "dpo": 0.5, "metric": "per_token"},
               "well_formed": {"base": 0.0, "dpo": 0.1}, "lm_eval": {"course": {"base": 0.2, "dpo": 0.3}},
               "n_heldout": 200}
    (run / "eval_results.json").write_text(json.dumps(results))
    figures, problem = acc.pipeline_figures(tmp_path, "fp16", expect_eval=True)
    assert problem is None and figures["heldout_preference_accuracy"] == {"base": 0.45, "dpo": 0.5}
    assert figures["well_formed"] == {"base": 0.0, "dpo": 0.1} and figures["n_heldout"] == 200


def _lora_parameters(r: int) -> int:
    """LoRA's trainable parameters on the seven projections of a TEST_SHAPE model, counted by hand."""
    s = gpu.TEST_SHAPE
    hidden, inter = s["hidden_size"], s["intermediate_size"]
    kv = hidden // s["num_attention_heads"] * s["num_key_value_heads"]
    per_layer = sum(r * (i + o) for i, o in [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden),
                                             (hidden, inter), (hidden, inter), (inter, hidden)])
    return s["num_hidden_layers"] * per_layer


def test_test_mode_runs_every_step_end_to_end_on_cpu(tmp_path):
    """The script itself, in test mode, as CI runs it: every step's code path, with its figures in one JSON."""
    out = tmp_path / "acceptance.json"
    env = _env(**{acc.TEST_MODE_ENV_VAR: "1", "COURSE_CACHE_DIR": str(tmp_path / "cache")})
    proc = subprocess.run([str(SCRIPT), "--json", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=840)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    report = json.loads(out.read_text())
    assert report["test_mode"] and report["all_passed"] and report["gpu"] is None
    assert report["libraries"]["torch"] == importlib.metadata.version("torch")
    assert report["libraries"]["trl"] == importlib.metadata.version("trl")
    steps = {s["name"]: s for s in report["steps"]}
    assert list(steps) == list(acc.STEP_NAMES)
    assert {n: s["status"] for n, s in steps.items()} == {
        "pipeline_fp16": "passed", "pipeline_bf16": "skipped", "dpo_step_7b": "passed", "reference_7b": "passed"}

    pipeline = steps["pipeline_fp16"]["figures"]
    assert pipeline["precision"] == "fp32" and pipeline["merged"]
    assert pipeline["adapter_dtypes"] == ["F32"]  # TRL's bf16 cast undone for fp32 training (prepare_trainer)
    assert pipeline["losses"] and all(math.isfinite(x) for x in pipeline["losses"])

    step = steps["dpo_step_7b"]["figures"]
    r = get_profile("full", check_hardware=False).lora.r
    assert step["layers_in_4bit"] == 7 * gpu.TEST_SHAPE["num_hidden_layers"]
    assert step["trainable_parameters"] == _lora_parameters(r)
    assert step["tokens_per_step"] == gpu.TEST_PAIRS_PER_MICRO_BATCH * 2 * gpu.TEST_SEQ_LEN
    assert step["steps_done"] == 2 and step["gradient_checkpointing"] and step["optim"] == "adamw_torch"
    assert step["sequences_fill_seq_len"]  # every sequence really has the tokens the FLOPs count
    assert step["policy_packed_nf4_layers"] == 0  # the CPU packing guard held
    assert step["losses_finite"] and step["seconds_per_step"] > 0 and step["mfu"] is None

    reference = steps["reference_7b"]["figures"]["results"]
    assert set(reference) == {"separate_ref", "peft_ref", "peft_precompute"}
    assert all("error" not in m and m["losses_finite"] for m in reference.values())
    assert [reference[m]["ref_model_is_separate"] for m in ("separate_ref", "peft_ref", "peft_precompute")] == [
        True, False, False]
    assert all(m["policy_packed_nf4_layers"] == 0 for m in reference.values())
    table = proc.stdout[proc.stdout.index("| step |"):]  # the short table at the end
    assert all(f"| {name} |" in table for name in acc.STEP_NAMES)
