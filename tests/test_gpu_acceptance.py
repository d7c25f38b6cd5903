"""scripts/gpu_acceptance.sh (benchmarks.gpu_acceptance): it refuses to run without CUDA, plans the steps the machine
can run inside its budget, keeps going after a failing step and says so, writes its JSON whatever happens, reads
what each step wrote, and - in its test mode - runs all its steps end to end on the CPU at tiny sizes.
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
from helpers.profiles import REPO_ROOT, get_profile

SCRIPT = REPO_ROOT / "scripts" / "gpu_acceptance.sh"
H200 = {"name": "NVIDIA H200", "memory_gib": 139.8, "capability": "9.0", "native_bf16": True, "count": 1}
T4 = {"name": "Tesla T4", "memory_gib": 14.6, "capability": "7.5", "native_bf16": False, "count": 1}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {acc.TEST_MODE_ENV_VAR, "COURSE_OUTPUT_DIR"}}
    env.update(CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable, **extra)
    return env


def _step(steps, name):
    return next(s for s in steps if s.name == name)


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


def test_the_shares_divide_the_budget_and_what_is_kept_for_the_steps_fits_it(tmp_path):
    assert sum(acc.SHARES.values()) == pytest.approx(1.0) and acc.BUDGET_SECONDS <= 300  # about 5 minutes
    steps = acc.plan(test_mode=False, workdir=tmp_path, gpu=H200, lm_eval=False)
    assert sum(s.reserve_s for s in steps) == pytest.approx(acc.RESERVED * acc.BUDGET_SECONDS)
    assert all(s.reserve_s <= s.timeout_s for s in steps)
    step = _step(steps, "dpo_step_7b")  # the 7B step stops training by time, well inside its own limit
    assert float(step.argv[step.argv.index("--max-train-seconds") + 1]) < step.timeout_s / 2
    reference = _step(steps, "reference_7b")  # three processes, each stopped inside the step's limit
    assert 3 * float(reference.argv[reference.argv.index("--mode-timeout") + 1]) < reference.timeout_s


def test_plan_on_an_h200_runs_the_script_offline_on_the_real_width_standin(tmp_path):
    steps = acc.plan(test_mode=False, workdir=tmp_path, gpu=H200, lm_eval=False)
    assert [s.name for s in steps] == list(acc.STEP_NAMES) and not any(s.skip for s in steps)
    for precision in ("fp16", "bf16"):
        step = _step(steps, f"pipeline_{precision}")
        assert step.argv[1:4] == ["scripts/dpo.py", "--profile", "t4"]
        assert step.argv[step.argv.index("--precision") + 1] == precision
        assert step.env == {"COURSE_STANDINS": "real"}  # Qwen2.5-0.5B's real width, random weights
        env = acc.step_environment(step, test_mode=False)
        assert env["HF_HUB_OFFLINE"] == env["HF_DATASETS_OFFLINE"] == env["TRANSFORMERS_OFFLINE"] == "1"
        assert env["PYTHONPATH"].split(os.pathsep)[0] == str(REPO_ROOT)
    fp16 = _step(steps, "pipeline_fp16")
    assert fp16.expect_eval and fp16.argv[fp16.argv.index("--lm-eval-limit") + 1] == "0" and "lm_eval" in fp16.note
    assert "--no-merge" in _step(steps, "pipeline_bf16").argv  # merging and scoring run once, in fp16
    with_lm_eval = _step(acc.plan(test_mode=False, workdir=tmp_path, gpu=H200, lm_eval=True), "pipeline_fp16")
    assert with_lm_eval.argv[with_lm_eval.argv.index("--lm-eval-limit") + 1] == str(acc.PIPELINE_LM_EVAL_LIMIT)
    dpo = _step(steps, "dpo_step_7b").argv
    assert dpo[1:4] == ["-m", "benchmarks.gpu", "step"] and "--seq-len" not in dpo  # the profile's 1536 tokens


def test_plan_on_a_t4_skips_bf16_and_shortens_the_7b_sequences(tmp_path):
    steps = acc.plan(test_mode=False, workdir=tmp_path, gpu=T4, lm_eval=False)
    assert {s.name: bool(s.skip) for s in steps} == {"pipeline_fp16": False, "pipeline_bf16": True,
                                                     "dpo_step_7b": False, "reference_7b": False}
    assert "no native bf16" in _step(steps, "pipeline_bf16").skip
    dpo = _step(steps, "dpo_step_7b").argv
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
    seen = []
    records = acc.run_steps(steps, test_mode=True, log_dir=tmp_path / "logs", budget=None,
                            on_record=lambda r: seen.append([x["status"] for x in r]))
    assert [r["status"] for r in records] == ["failed", "timed out", "skipped", "passed"]
    assert seen[0] == ["failed"] and len(seen) == 4  # told after every step: the JSON is rewritten each time
    assert records[0]["exit_status"] == 3 and "boom" in records[0]["log_tail"]
    assert records[1]["seconds"] < 30  # stopped at its 3 s limit, not after the 120 s sleep
    with pytest.raises(ProcessLookupError):  # and its process is gone
        os.kill(int(pid_file.read_text()), 0)
    assert records[2]["reason"] == "no such card here" and "exit_status" not in records[2]
    err = capsys.readouterr().err
    assert "FAILED: fails exited with status 3" in err and "boom" in err and "TIMED OUT: hangs" in err


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


def test_the_json_is_written_when_steps_fail(tmp_path, monkeypatch):
    failing = [acc.Step("pipeline_fp16", "exits 1", _python("raise SystemExit(1)"), 60)]
    monkeypatch.setattr(acc, "plan", lambda **kwargs: failing)
    out = tmp_path / "acceptance.json"
    assert acc.main(["--test-mode", "--json", str(out)]) == 1
    report = json.loads(out.read_text())
    assert not report["all_passed"] and report["steps"][0]["status"] == "failed"
    monkeypatch.setattr(acc, "plan", lambda **kwargs: (_ for _ in ()).throw(RuntimeError("no plan")))
    assert acc.main(["--test-mode", "--json", str(out)]) == 1  # even a run that stops before any step
    assert json.loads(out.read_text())["error"] == "RuntimeError: no plan"


def test_pipeline_figures_read_what_the_script_writes(tmp_path):
    run = tmp_path / "runs" / "t4-fp16"
    (run / "adapter").mkdir(parents=True)
    (run / "merged").mkdir()
    save_file({"a": torch.zeros(2, dtype=torch.float32), "b": torch.zeros(2, dtype=torch.bfloat16)},
              str(run / "adapter" / "adapter_model.safetensors"))
    (run / "adapter" / "course_profile.json").write_text(json.dumps({"dpo": {"fp16": True, "bf16": False}}))
    (run / "merged" / "config.json").write_text("{}")
    (run / "history.json").write_text(json.dumps([{"step": 1, "loss": 0.69}, {"step": 2, "loss": 0.68}]))
    figures, problem = acc.pipeline_figures(tmp_path, "fp16", expect_eval=True)
    assert problem == "exited 0 but wrote no eval_results.json"
    assert figures["adapter_dtypes"] == ["BF16", "F32"] and figures["losses"] == [0.69, 0.68]
    assert figures["precision"] == "fp16" and figures["merged"]
    models = {"base": {"accuracy": 0.45, "well_formed": 0.0}, "dpo": {"accuracy": 0.5, "well_formed": 0.1}}
    (run / "eval_results.json").write_text(json.dumps({"heldout_pairs": 149, "models": models,
                                                       "merge_max_logit_diff": 0.01}))
    figures, problem = acc.pipeline_figures(tmp_path, "fp16", expect_eval=True)
    assert problem is None and figures["models"] == models and figures["heldout_pairs"] == 149
    assert "held-out acc 0.45 -> 0.50" in acc.summary_line("pipeline_fp16", figures)


def _lora_parameters(r: int) -> int:
    """LoRA's trainable parameters on the seven projections of a TEST_SHAPE model, counted by hand."""
    s = gpu.TEST_SHAPE
    hidden, inter = s["hidden_size"], s["intermediate_size"]
    kv = hidden // s["num_attention_heads"] * s["num_key_value_heads"]
    per_layer = sum(r * (i + o) for i, o in [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden),
                                             (hidden, inter), (hidden, inter), (inter, hidden)])
    return s["num_hidden_layers"] * per_layer


def test_test_mode_runs_every_step_end_to_end_on_cpu(tmp_path):
    """The script itself, in test mode, as the tests run it: every step's code path, with its figures in one JSON."""
    out = tmp_path / "acceptance.json"
    env = _env(**{acc.TEST_MODE_ENV_VAR: "1"})
    proc = subprocess.run([str(SCRIPT), "--json", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=840)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    report = json.loads(out.read_text())
    assert report["test_mode"] and report["all_passed"] and report["gpu"] is None
    assert report["libraries"]["trl"] == importlib.metadata.version("trl")
    steps = {s["name"]: s for s in report["steps"]}
    assert {n: s["status"] for n, s in steps.items()} == {
        "pipeline_fp16": "passed", "pipeline_bf16": "skipped", "dpo_step_7b": "passed", "reference_7b": "passed"}

    pipeline = steps["pipeline_fp16"]["figures"]
    assert pipeline["precision"] == "fp32" and pipeline["merged"]
    assert pipeline["adapter_dtypes"] == ["F32"]  # TRL's bf16 cast undone for fp32 training (prepare_trainer)
    assert pipeline["losses"] and all(math.isfinite(x) for x in pipeline["losses"])

    step = steps["dpo_step_7b"]["figures"]
    assert step["layers_in_4bit"] == 7 * gpu.TEST_SHAPE["num_hidden_layers"]
    assert step["trainable_parameters"] == _lora_parameters(get_profile("full", allow_cpu=True).lora["r"])
    assert step["tokens_per_step"] == gpu.TEST_PAIRS_PER_MICRO_BATCH * 2 * gpu.TEST_SEQ_LEN
    assert step["steps_done"] == 2 and step["gradient_checkpointing"] and step["optim"] == "adamw_torch"
    assert step["sequences_fill_seq_len"]  # every sequence really has the tokens the FLOPs count
    assert step["policy_packed_nf4_layers"] == 0  # the CPU packing guard held
    assert step["losses_finite"] and step["mfu"] is None

    reference = steps["reference_7b"]["figures"]["results"]
    assert set(reference) == {"separate_ref", "peft_ref", "peft_precompute"}
    assert all("error" not in m and m["losses_finite"] for m in reference.values())
    assert [reference[m]["ref_model_is_separate"] for m in ("separate_ref", "peft_ref", "peft_precompute")] == [
        True, False, False]
    table = proc.stdout[proc.stdout.index("| step |"):]  # the short table at the end
    assert all(f"| {name} |" in table for name in acc.STEP_NAMES)
