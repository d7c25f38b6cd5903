"""scripts/gpu_check.py: refuses to run without CUDA (the GPU check itself never runs in the CPU suite), and its
logic - the model shape, the exact-length random pairs, the FLOPs formula, the trainer path - is sound.

The last test runs that logic on the CPU with a small Mistral and short pairs (one optimizer step), through the
same ``run_check`` the command calls on a GPU, so a GPU session only has to measure, not debug.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys

import pytest

from helpers.paths import REPO_ROOT

SCRIPT = REPO_ROOT / "scripts" / "gpu_check.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = _load_script()


@pytest.mark.parametrize("flags", [[], ["--tiny-shape"]], ids=["7b", "tiny-shape"])
def test_without_cuda_it_exits_non_zero_with_a_clear_message(flags):
    import torch

    if torch.cuda.is_available():  # pragma: no cover - the CPU suite
        pytest.skip("this machine has a CUDA GPU: the check would really run")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *flags], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "needs a CUDA GPU" in proc.stderr and "--profile tiny" in proc.stderr, proc.stderr
    assert "[gpu-check]" not in proc.stdout  # refused before anything was built


def test_the_7b_config_is_mistral_7b():
    config = gpu_check.mistral_config()
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (4096, 14336, 32)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (32, 8, 32000)
    total, compute = gpu_check.compute_parameters(config)  # on the meta device: no memory
    assert total == 7_241_732_096  # Mistral-7B-v0.1's parameter count
    assert total - compute == 32000 * 4096  # only the embedding lookup is left out of the matmuls


def test_peak_flops_table():
    assert gpu_check.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu_check.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_check.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert gpu_check.peak_flops("NVIDIA H200") == 989e12
    assert gpu_check.peak_flops("NVIDIA L4") == 121e12 and gpu_check.peak_flops("NVIDIA L40S") == 362e12
    assert gpu_check.peak_flops("Tesla T4") == 65e12
    assert gpu_check.peak_flops("Some Future GPU") is None


def test_step_flops_formula():
    n, t = 7.1e9, 16 * 2 * 1536
    flops = gpu_check.step_flops(n, t)
    assert flops["model"] == pytest.approx(6 * n * t) and flops["hardware"] == pytest.approx(8 * n * t)
    # the card's anchor (0.9 pairs/s on an A100) would be ~37% MFU by this count
    mfu = flops["model"] / (16 / gpu_check.ANCHOR_PAIRS_PER_S) / 312e12
    assert 0.2 < mfu < 0.6


def test_random_pairs_have_exact_lengths():
    from helpers.tiny_model import build_tokenizer

    tokenizer = build_tokenizer()
    data = gpu_check.random_pairs(tokenizer, 3, prompt_tokens=1024, answer_tokens=512)
    assert data.column_names == ["prompt", "chosen", "rejected"] and len(data) == 3
    for row in data:
        prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        both = tokenizer(row["prompt"] + row["chosen"], add_special_tokens=False)["input_ids"]
        assert len(prompt) == 1024 and len(both) == 1536 and both[:1024] == prompt
        assert max(both) < 32000 and row["chosen"] != row["rejected"]
        assert row["prompt"].startswith("<|im_start|>user\n") and row["chosen"].endswith("<|im_end|>")


def test_the_check_logic_runs_on_cpu_with_a_small_model(tmp_path, capsys):
    """run_check end to end on CPU: random checkpoint -> load_model in 4-bit -> make_trainer(full) -> 1 step."""
    results = gpu_check.run_check(
        steps=1,
        tiny_shape=True,
        prompt_tokens=40,
        answer_tokens=16,
        workdir=tmp_path,
        require_cuda=False,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
    )
    assert results["shape"] == "tiny" and results["layers_in_4bit"] == 7 * 2
    assert results["tokens_per_sequence"] == 56 and results["tokens_per_step"] == 2 * 2 * 56
    assert results["gradient_checkpointing"] and results["optim"] == "adamw_torch"  # paged AdamW needs CUDA
    assert len(results["step_seconds"]) == 1 and results["seconds_per_step"] > 0
    assert results["losses"] and all(math.isfinite(x) for x in results["losses"])
    assert results["mfu"] is None and results["peak_memory_allocated_gib"] is None
    assert not list(tmp_path.iterdir()), "the random model folder must be deleted"
    text = gpu_check.report(results)
    assert "seconds per optimizer step" in text and "pairs per second" in text and "6*N*T" in text
