"""The GPU profiles' code paths, run on this CPU on the offline stand-ins of their hub model and data.

``python -m helpers run --profile t4|full --standins`` trains a few steps in 4-bit NF4 with gradient checkpointing,
merges and evaluates (held-out pairs, generation health on hub rows, lm-eval through the hub id), as a learner's GPU
run would, on a Qwen2 / Mistral of the real structure at tiny width (helpers/standins.py). Also here: the adapter's
dtype under fp16 (a T4), and bitsandbytes' CPU repacking that would silently drop the gradient through 4-bit weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from trl import DPOTrainer

from helpers import training
from helpers.chatml import format_dataset
from helpers.data import load_local_split
from helpers.loading import forbid_cpu_nf4_packing, load_model, packed_nf4_layers
from helpers.lora import lora_config
from helpers.paths import REPO_ROOT
from helpers.standins import ORCA_ID, STANDINS_ENV_VAR

RUN_TIMEOUT_S = 840  # under pytest-timeout's 900
STEPS = 2


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in {"COURSE_PROFILE", "COURSE_OUTPUT_DIR", "COURSE_TRACE_DIR", "HF_HOME", "HF_HUB_CACHE",
                        "HF_DATASETS_CACHE", STANDINS_ENV_VAR}}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(REPO_ROOT), CUDA_VISIBLE_DEVICES="", **extra)
    return env


@pytest.fixture(scope="module", params=["t4", "full"])
def standin_run(request, tmp_path_factory) -> dict:
    """One headless run of a GPU profile on the stand-ins: its output, results, run folder and saved profile."""
    out = tmp_path_factory.mktemp(f"standin-{request.param}")
    proc = subprocess.run(
        [sys.executable, "-m", "helpers", "run", "--profile", request.param, "--standins", "--max-steps", str(STEPS),
         "--output-dir", str(out), "--run-id", "ci"],
        cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    run = out / "runs" / f"{request.param}-ci"
    return {
        "name": request.param,
        "stdout": proc.stdout,
        "run": run,
        "results": json.loads((run / "eval_results.json").read_text()),
        "profile": json.loads((run / "adapter" / "course_profile.json").read_text()),
    }


def test_a_run_on_standins_says_so_first_and_in_its_results(standin_run) -> None:
    first = standin_run["stdout"].splitlines()[0]
    assert first.startswith("OFFLINE STAND-INS") and "NOT the real model" in first, first
    assert "NOT the real model" in standin_run["results"]["standins"]


def test_the_gpu_profile_kept_its_recipe_on_the_cpu(standin_run) -> None:
    saved = standin_run["profile"]
    assert saved["name"] == standin_run["name"]
    assert saved["quantization"]["load_in_4bit"] is True and saved["training"]["gradient_checkpointing"] is True
    assert saved["training"]["max_steps"] == STEPS
    cpu = {k for k in saved["differences"] if k.startswith("cpu.")}
    assert {"cpu.training.precision", "cpu.training.optim", "cpu.model.name"} <= cpu
    for line in ("note: training.precision:", "note: training.optim:"):
        assert line in standin_run["stdout"], f"the run must say what the CPU changes ({line!r})"


def test_the_adapter_learned_through_the_4bit_base_and_is_stored_in_fp32(standin_run) -> None:
    with safe_open(standin_run["run"] / "adapter" / "adapter_model.safetensors", framework="pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    assert tensors and {t.dtype for t in tensors.values()} == {torch.float32}  # TRL made them bf16; the course fp32
    b_norm = sum(t.float().norm().item() for k, t in tensors.items() if "lora_B" in k)
    assert b_norm > 0.0, "lora_B starts at zero: after two steps it must have moved"


def test_the_evaluation_judged_hub_rows_and_ran_lm_eval_through_the_hub_id(standin_run) -> None:
    results = standin_run["results"]
    acc = results["heldout_preference_accuracy"]
    assert set(acc["by_kind"]) == {ORCA_ID}, "hub rows carry the data set's id as their kind"
    assert set(results["follows_rule"]["by_kind"]) == {ORCA_ID}
    assert 0 < results["n_heldout"] <= 200
    for value in (acc["base"], acc["dpo"], results["well_formed"]["base"], results["follows_rule"]["dpo"]):
        assert 0.0 <= value <= 1.0
    assert list(results["lm_eval"]) == ["course_preferences"]  # the suite's data cannot be fetched offline
    assert set(results["answer_words"]) >= {ORCA_ID, "all"}
    assert (standin_run["run"] / "merged" / "config.json").is_file()


LM_EVAL_SNIPPET = """
import json, sys
from helpers.standins import activate_standins, snapshot_dir, QWEN_ID
home = activate_standins()
from helpers.evaluation import run_lm_eval
by_id = run_lm_eval(QWEN_ID, ["course_preferences"], limit=16, device="cpu")
by_path = run_lm_eval(snapshot_dir(home, QWEN_ID), ["course_preferences"], limit=16, device="cpu")
print(json.dumps({"by_id": by_id, "by_path": by_path}))
"""


def test_lm_eval_takes_the_base_by_its_hub_id() -> None:
    """The base of a GPU profile is a hub id, not a folder: lm-eval resolves it (offline, from the cache) to the same
    model, so the id and the snapshot folder it stands for score the same."""
    proc = subprocess.run([sys.executable, "-c", LM_EVAL_SNIPPET], cwd=REPO_ROOT, env=_env(COURSE_STANDINS="1"),
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["by_id"]["course_preferences"]["acc"] == found["by_path"]["course_preferences"]["acc"]
    assert 0.0 <= found["by_id"]["course_preferences"]["acc"] <= 1.0


# --- the adapter's dtype: TRL 1.16 makes it bf16 on a 4-bit model; fp16 needs it in fp32 -------------------------


@pytest.fixture(scope="module")
def few_pairs(tokenizer):
    return format_dataset(load_local_split("train").select(range(8)), tokenizer, split="train")


def _qlora_trainer(profile, tiny_model_path, tokenizer, pairs, tmp_path) -> DPOTrainer:
    return DPOTrainer(
        model=load_model(profile, four_bit=True, source=str(tiny_model_path)),
        ref_model=None,
        args=training.dpo_config(profile, tmp_path, max_steps=1, save_strategy="no", report_to="none"),
        train_dataset=training.pairs_only(pairs),
        processing_class=tokenizer,
        peft_config=lora_config(profile),
    )


def _trainable_dtypes(trainer) -> set[torch.dtype]:
    return {p.dtype for p in trainer.model.parameters() if p.requires_grad}


@pytest.mark.parametrize(("precision", "expected"), [("fp16", torch.float32), ("bf16", torch.bfloat16),
                                                     ("fp32", torch.float32)])
def test_the_adapter_dtype_follows_the_training_precision(precision, expected, profile, tiny_model_path, tokenizer,
                                                          few_pairs, tmp_path, monkeypatch) -> None:
    trainer = _qlora_trainer(profile, tiny_model_path, tokenizer, few_pairs, tmp_path)
    assert _trainable_dtypes(trainer) == {torch.bfloat16}, "TRL 1.16 casts a 4-bit model's adapter to bf16"
    monkeypatch.setattr(training, "training_precision", lambda requested="auto": precision)  # a T4 / an A100
    training.prepare_trainer(trainer, profile, progress=False)
    assert _trainable_dtypes(trainer) == {expected}


# --- bitsandbytes' CPU repacking of NF4 weights --------------------------------------------------------------------


def _lora_gradients(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The LoRA gradients of one language-modelling step, with a non-zero B so that A's gradients exist too."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    wrapped = get_peft_model(model, LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "up_proj", "down_proj"]))
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02)
    wrapped.train()
    wrapped(input_ids=ids, labels=ids).loss.backward()
    # a gradient that never arrived (None) counts as zero: that is what the optimizer would then apply
    return {n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
            for n, p in wrapped.named_parameters() if p.requires_grad}


def _eval_forward(model, ids: torch.Tensor) -> None:
    """What an evaluation, a generation or TRL's reference pass does first: eval mode, no gradient."""
    model.eval()
    with torch.no_grad():
        model(input_ids=ids[:, :8])


def _worst_relative_difference(a: dict, b: dict) -> float:
    return max(((a[n] - g).abs().max() / g.abs().max().clamp_min(1e-12)).item() for n, g in b.items())


def test_the_cpu_nf4_guard_keeps_the_gradient_through_4bit_weights(profile, tiny_model_path) -> None:
    from bitsandbytes.functional import has_avx512bf16

    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(3))
    reference = _lora_gradients(load_model(profile, four_bit=True, source=str(tiny_model_path)), ids)

    guarded = load_model(profile, four_bit=True, source=str(tiny_model_path))  # load_model forbids the repacking
    _eval_forward(guarded, ids)
    assert packed_nf4_layers(guarded) == 0
    assert _worst_relative_difference(_lora_gradients(guarded, ids), reference) < 1e-5

    unguarded = load_model(profile, four_bit=True, source=str(tiny_model_path))
    layers = forbid_cpu_nf4_packing(unguarded)
    for module in unguarded.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = bool(has_avx512bf16())  # bitsandbytes' own default
    _eval_forward(unguarded, ids)
    if has_avx512bf16():  # the repacking exists only on such CPUs: there it must show, and hurt
        assert packed_nf4_layers(unguarded) == layers > 0
        assert _worst_relative_difference(_lora_gradients(unguarded, ids), reference) > 1e-3
    else:
        assert packed_nf4_layers(unguarded) == 0


def test_the_standin_data_set_loads_under_its_hub_id(tmp_path: Path) -> None:
    """load_dataset("Intel/orca_dpo_pairs") resolves offline to the stand-in: the course's loader on the t4 profile
    validates it, drops and counts the awkward rows, and splits off the profile's 200 held-out pairs."""
    snippet = (
        "import json, warnings\n"
        "from helpers.standins import activate_standins\n"
        "activate_standins()\n"
        "from helpers.data import load_preference_data\n"
        "from helpers.profiles import get_profile\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    warnings.simplefilter('always')\n"
        "    splits = load_preference_data(get_profile('t4'))\n"
        "print(json.dumps({'train': len(splits['train']), 'heldout': len(splits['heldout']),\n"
        "                  'columns': splits['train'].column_names, 'warnings': [str(w.message) for w in seen]}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", snippet], cwd=REPO_ROOT, env=_env(COURSE_STANDINS="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["heldout"] == 200 and found["train"] > 200
    assert found["columns"] == ["system", "question", "chosen", "rejected", "kind"]
    said = " ".join(found["warnings"])
    assert "identical to the rejected one" in said and "repeat an earlier row" in said and "made the ChatML" in said
