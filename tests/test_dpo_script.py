"""scripts/dpo.py, the headless run of notebooks 04-06: what it writes is checked against independent computations.

The tiny run (2 steps, lm-eval on 8 documents) runs once as a subprocess; the adapter it saved is loaded with PEFT,
the merged model compared with base + adapter, and its held-out accuracies recounted with the textbook
log-likelihood (conftest's ``naive_answer_logprob``). The GPU profiles run on their offline stand-ins (4-bit NF4,
gradient checkpointing, hub ids; ``COURSE_STANDINS=1``). The refusals and the precision switch run in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from helpers.data import prepare_data
from helpers.merging import probe_inputs
from helpers.models import largest_difference, logits_of
from helpers.profiles import PROFILES, REPO_ROOT, fit_to_machine
from scripts import dpo

SCRIPT = REPO_ROOT / "scripts" / "dpo.py"
TIMEOUT_S = 840  # under pytest-timeout's 900
LM_EVAL_LIMIT = 8


def _run(out: Path, *args: str, **extra_env: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in {"COURSE_PROFILE", "COURSE_OUTPUT_DIR", "COURSE_STANDINS"}}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(REPO_ROOT), CUDA_VISIBLE_DEVICES="", **extra_env)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--max-steps", "2", "--output-dir", str(out), *args],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """The run folder of ``scripts/dpo.py --profile tiny --max-steps 2 --lm-eval-limit 8``."""
    out = tmp_path_factory.mktemp("tiny")
    _run(out, "--profile", "tiny", "--lm-eval-limit", str(LM_EVAL_LIMIT))
    return out / "runs" / "tiny-main"


@pytest.fixture(scope="module")
def base_and_adapter(tiny_run, tiny_model_path, tokenizer):
    """Logits on the merge probes: the base, the base with the saved adapter (PEFT), and the saved merged model."""
    probes = probe_inputs(tokenizer)
    base = logits_of(AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32), probes)
    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    adapted = logits_of(PeftModel.from_pretrained(fresh, str(tiny_run / "adapter")), probes)
    merged = logits_of(AutoModelForCausalLM.from_pretrained(tiny_run / "merged", dtype=torch.float32), probes)
    return base, adapted, merged


def test_the_saved_adapter_loads_in_peft_and_changes_the_model(base_and_adapter):
    base, adapted, _ = base_and_adapter
    assert 1e-4 < largest_difference(base, adapted) < 10.0, "two DPO steps must move the logits, and not explode"


def test_the_merged_model_is_the_base_plus_the_adapter(base_and_adapter):
    base, adapted, merged = base_and_adapter
    assert largest_difference(adapted, merged) < 1e-4  # fp32 rounding of W + BA, far below the change itself
    assert largest_difference(adapted, merged) < largest_difference(base, adapted) / 10


def _recounted_accuracy(model, tokenizer, pairs, naive) -> float:
    """The share of pairs whose chosen answer has the higher summed log-likelihood, counted the textbook way."""
    wins = [naive(model, tokenizer, p["prompt"], p["chosen"]) > naive(model, tokenizer, p["prompt"], p["rejected"])
            for p in pairs]
    return sum(wins) / len(wins)


def test_the_results_hold_what_an_independent_count_finds(tiny_run, profile, tokenizer, tiny_model_path,
                                                        naive_answer_logprob):
    results = json.loads((tiny_run / "eval_results.json").read_text())
    heldout = list(prepare_data(profile, tokenizer).heldout)
    assert results["profile"] == "tiny" and results["heldout_pairs"] == len(heldout) and results["standins"] is None
    models = {"base": AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval(),
              "dpo": AutoModelForCausalLM.from_pretrained(tiny_run / "merged", dtype=torch.float32).eval()}
    for name, model in models.items():
        expected = _recounted_accuracy(model, tokenizer, heldout, naive_answer_logprob)
        # fp32 batched scoring against float64 one by one: at most a near-tie may flip
        assert results["models"][name]["accuracy_sum"] == pytest.approx(expected, abs=1.01 / len(heldout)), name
        assert 0.0 <= results["models"][name]["well_formed"] <= 1.0
        # lm-eval's course task on its first 8 documents: the same preference, counted by lm-eval's own code
        first = _recounted_accuracy(model, tokenizer, heldout[:LM_EVAL_LIMIT], naive_answer_logprob)
        assert results["lm_eval"]["course_preferences"][name] == pytest.approx(first, abs=1.01 / LM_EVAL_LIMIT), name
    assert results["merge_max_logit_diff"] < 1e-4


def test_the_run_folder_is_what_the_notebooks_read(tiny_run, profile):
    saved = json.loads((tiny_run / "adapter" / "course_profile.json").read_text())
    assert saved["name"] == "tiny" and saved["dpo"]["max_steps"] == 2  # the profile that really trained
    assert saved["dpo"]["logging_steps"] == 2 and saved["lora"] == profile.lora
    history = json.loads((tiny_run / "history.json").read_text())
    assert [row["step"] for row in history] == [2.0]  # a run shorter than the profile's logging_steps still logs
    assert json.loads((tiny_run / "run_info.json").read_text())["steps"] == 2


@pytest.fixture(scope="module", params=["t4", "full"])
def standin_run(request, tmp_path_factory) -> dict:
    """A GPU profile through the whole script on its offline stand-in: its output and run folder."""
    out = tmp_path_factory.mktemp(f"standin-{request.param}")
    proc = _run(out, "--profile", request.param, "--lm-eval-limit", str(LM_EVAL_LIMIT), COURSE_STANDINS="1")
    return {"name": request.param, "stdout": proc.stdout, "run": out / "runs" / f"{request.param}-main"}


def test_a_gpu_profile_runs_through_on_its_standin_and_says_so(standin_run):
    assert standin_run["stdout"].startswith("OFFLINE STAND-INS")
    run = standin_run["run"]
    saved = json.loads((run / "adapter" / "course_profile.json").read_text())
    assert saved["bnb"]["load_in_4bit"] and saved["dpo"]["gradient_checkpointing"]  # the recipe's QLoRA path
    with safe_open(run / "adapter" / "adapter_model.safetensors", framework="pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    assert {t.dtype for t in tensors.values()} == {torch.float32}  # TRL made them bf16; a CPU trains in fp32
    assert sum(t.norm().item() for k, t in tensors.items() if "lora_B" in k) > 0, "lora_B starts at 0: it must move"
    results = json.loads((run / "eval_results.json").read_text())
    assert "OFFLINE STAND-INS" in results["standins"]  # the results file says what they are, too
    assert 0 < results["heldout_pairs"] <= PROFILES[standin_run["name"]].heldout_pairs
    assert list(results["lm_eval"]) == ["course_preferences"]  # the card's suite needs the hub
    assert results["merge_max_logit_diff"] < 1e-3


# --- in-process: refusals and the precision switch ----------------------------------------------------------------


def _main(monkeypatch, tmp_path, *argv: str) -> int:
    monkeypatch.setenv("COURSE_OUTPUT_DIR", str(tmp_path))  # main() points it at --output-dir; restored after
    return dpo.main(dpo.make_parser().parse_args(["--output-dir", str(tmp_path), *argv]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="what a machine without CUDA refuses")
@pytest.mark.parametrize(("argv", "message"), [
    (["--profile", "full"], "needs a CUDA GPU"),
    (["--profile", "tiny", "--precision", "fp16"], "needs a CUDA GPU"),
    (["--profile", "tiny", "--run-id", "a/b"], "run_id"),
])
def test_what_cannot_run_is_refused_before_anything_is_written(argv, message, monkeypatch, tmp_path):
    with pytest.raises(SystemExit, match=message):
        _main(monkeypatch, tmp_path, *argv)
    assert not any(tmp_path.iterdir())


def test_an_unknown_profile_is_refused_naming_the_known_ones(capsys):
    with pytest.raises(SystemExit):
        dpo.make_parser().parse_args(["--profile", "huge"])
    said = capsys.readouterr().err
    assert "huge" in said and all(name in said for name in PROFILES), said


def test_fp16_on_an_ampere_gpu_trains_as_a_t4_does(monkeypatch):
    """``--precision fp16`` on an A100 must give what get_profile gives a real T4 (profiles.fit_to_machine):
    the path whose GradScaler needs fp32 adapter weights, tested where the GPU has bf16 too."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dpo, "native_bf16", lambda: True)
    on_a100 = dpo.with_precision(fit_to_machine(PROFILES["t4"], cuda=True, bf16=True), "fp16")
    on_t4 = fit_to_machine(PROFILES["t4"], cuda=True, bf16=False)
    assert (on_a100.dpo["fp16"], on_a100.dpo["bf16"]) == (on_t4.dpo["fp16"], on_t4.dpo["bf16"]) == (True, False)
    assert on_a100.dtype == on_t4.dtype == "float16"
    assert on_a100.bnb["bnb_4bit_compute_dtype"] == on_t4.bnb["bnb_4bit_compute_dtype"] == "float16"
    monkeypatch.setattr(dpo, "native_bf16", lambda: False)  # a T4 asked for bf16
    with pytest.raises(SystemExit, match="bf16"):
        dpo.with_precision(on_t4, "bf16")


def test_under_fsdp_the_4bit_values_are_stored_in_the_models_dtype(monkeypatch):
    """FSDP shards floating-point tensors of one dtype only: PEFT's FSDP-QLoRA recipe stores the packed NF4 values in
    the model's dtype (bnb_4bit_quant_storage); outside FSDP bitsandbytes' own uint8 stays."""
    seen = {}
    monkeypatch.setattr(dpo.AutoModelForCausalLM, "from_pretrained", lambda *a, **kw: seen.update(kw))
    full = fit_to_machine(PROFILES["full"], cuda=True, bf16=True)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    dpo.load_model(full, four_bit=True)
    assert seen["quantization_config"].bnb_4bit_quant_storage == torch.bfloat16 == getattr(torch, seen["dtype"])
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    dpo.load_model(full, four_bit=True)
    assert seen["quantization_config"].bnb_4bit_quant_storage == torch.uint8
