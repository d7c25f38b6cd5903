"""benchmarks.gpu, the GPU measurement script: it refuses to run without CUDA before building anything, its model is
Mistral-7B's published size, its FLOPs formula agrees with PyTorch's own FLOP counter on a real forward and backward,
and its card table gives the published dense peaks. Its training code runs on the CPU at a tiny shape in the
acceptance script's test mode (tests/test_gpu_acceptance.py).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM

from benchmarks import _common as C
from benchmarks import gpu
from helpers.profiles import REPO_ROOT

MISTRAL_7B_PUBLISHED = 7_241_732_096  # Mistral-7B-v0.1's parameter count (its GGUF general.parameter_count)


@pytest.mark.parametrize("command", ["step", "reference"])
def test_without_cuda_it_exits_2_with_a_clear_message_before_building_anything(command):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}  # no GPU visible, even on a GPU machine
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu", command], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "needs a CUDA GPU" in proc.stderr and "--test-mode" in proc.stderr, proc.stderr
    assert "device:" not in proc.stdout and "running" not in proc.stdout  # refused before any model was built


def test_the_7b_model_has_the_published_parameter_count():
    """OpenHermes-2.5 = Mistral-7B-v0.1's published 7,241,732,096 parameters + 2 new token rows in the embedding and
    in the untied head; the matmul weights the FLOPs formula counts + the embedding + the RMSNorms must add up to it."""
    config = gpu.mistral_7b_config(C.bench_tokenizer())
    expected = MISTRAL_7B_PUBLISHED + 2 * 2 * 4096
    assert sum(p.numel() for p in C.meta_model(config).parameters()) == expected  # meta device: no memory
    weights = gpu.matmul_parameters(config)
    norms = (2 * 32 + 1) * 4096  # two RMSNorms per layer and the final one
    assert weights["layers"] + weights["head"] + 32002 * 4096 + norms == expected
    assert weights["down_proj"] == 32 * 14336 * 4096


def _small_mistral():
    """A Mistral-shaped model small enough to count on a CPU, with eager attention: its QK^T and AV are matmuls that
    FlopCounterMode sees (PyTorch's CPU SDPA kernel is not in the counter's table; the GPU kernels are)."""
    config = C.mistral_config(vocab_size=1000, hidden_size=128, intermediate_size=448, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, sliding_window=None)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    model.requires_grad_(False)  # the frozen base of LoRA training
    model.train()
    return config, model


def _counted_step_flops(model, seq_len: int, reference_forward: bool) -> int:
    """FLOPs PyTorch counts for one DPO micro-batch of one pair (a chosen and a rejected sequence): the policy's
    forward and backward, and the reference forward without gradients.

    The inputs require a gradient, as LoRA's adapters make every layer's input need one (PEFT's
    enable_input_require_grads does the same): the backward computes activation gradients all the way down and no
    weight gradient, as on a frozen base.
    """
    ids = torch.randint(0, model.config.vocab_size, (2, seq_len), generator=torch.Generator().manual_seed(1))
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    with FlopCounterMode(display=False) as counter:
        logits = model(inputs_embeds=embeds).logits
        logits.float().logsumexp(-1).sum().backward()  # a scalar of the logits; no matmul of its own
        if reference_forward:
            with torch.no_grad():
                model(inputs_embeds=embeds.detach())
    return counter.get_total_flops()


@pytest.mark.parametrize("reference_forward", [True, False], ids=["reference-forward", "precomputed-reference"])
def test_model_flops_match_pytorchs_flop_counter(reference_forward):
    """The model FLOPs (what MFU divides by) against torch.utils.flop_counter on the real computation.

    Every term of the formula is covered: 2N per token for the linear layers and the head, attention's 4nLd forward
    and 8nLd backward, a frozen base's backward (activation gradients only), and the reference forward (or none, when
    precomputed). Both count matmuls only, so they should agree to the FLOP; the tolerance of 0.1% is far below the
    smallest term tested (attention, 5.7% of a forward at this shape), so a missing term cannot hide.
    """
    config, model = _small_mistral()
    seq_len = 64
    counted = _counted_step_flops(model, seq_len, reference_forward)
    expected = gpu.step_flops(config, seq_len, tokens=2 * seq_len, reference_forward=reference_forward,
                              checkpointing=False)
    assert counted == pytest.approx(expected["model"], rel=1e-3)
    assert expected["model"] == expected["hardware"]  # nothing recomputed without checkpointing


def test_hardware_flops_add_what_checkpointing_recomputes():
    """With activation checkpointing enabled as the Trainer enables it (non-reentrant), the counter also sees the
    recomputed forward of every decoder layer except its last projection (down_proj: torch stops recomputing once
    the tensors the backward needs exist). The formula's hardware FLOPs must match that, to 0.1% as above; the
    down_proj term it subtracts is 20% of the recomputation here, far above the tolerance."""
    config, model = _small_mistral()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    seq_len = 64
    counted = _counted_step_flops(model, seq_len, reference_forward=True)
    expected = gpu.step_flops(config, seq_len, tokens=2 * seq_len, reference_forward=True, checkpointing=True)
    assert counted == pytest.approx(expected["hardware"], rel=1e-3)
    assert expected["hardware"] > expected["model"]


def test_peak_table_gives_the_published_dense_peaks():
    assert gpu.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu.peak_tflops("NVIDIA H200") == 989.0
    assert gpu.peak_tflops("NVIDIA L4") == 121.0 and gpu.peak_tflops("NVIDIA L40S") == 362.0
    assert gpu.peak_tflops("Tesla T4") == 65.0
    assert gpu.peak_tflops("Some Future GPU") is None
    assert gpu.peak_tflops("Some Future GPU", override=2250.0) == 2250.0
