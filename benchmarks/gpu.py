"""The recipe's DPO on one GPU at its real scale, nothing downloaded: a Mistral-7B-shaped model (OpenHermes-2.5's
config as published, random weights) built directly on the GPU in 4-bit NF4 and trained with the ``full`` profile
by notebook 04's ``DPOTrainer`` (``benchmarks._common.dpo_trainer``, prepared by helpers.training.prepare_trainer):
LoRA r=16 on the seven projections, paged AdamW, gradient checkpointing, bf16 (fp16 on a T4), beta 0.1.

``step``: the course's configuration (the reference is the policy with its adapter switched off), the profile's
batch (4 pairs x 4 accumulated = 16 pairs per optimizer step) at its max_length (1536 tokens per sequence).
Prints seconds per step, pairs per second against the seed's anchor (200 steps x 16 pairs in about an hour on one
A100 = 0.89 pairs/s), peak GPU memory (torch.cuda.max_memory_allocated) and model-FLOPs utilisation (MFU; the
formula is :func:`step_flops`, checked against PyTorch's FLOP counter in tests/test_gpu.py).

``reference``: the DPO reference model three ways, each in a fresh process, with the same model and data:
(a) ``separate_ref``, a second NF4 copy passed as ``ref_model`` (the seed's first version); (b) ``peft_ref``,
``ref_model=None``, the adapter switched off (what the course does); (c) ``peft_precompute``, (b) +
``precompute_ref_log_probs=True``. Targets: (b) <= 0.6 x the peak memory of (a); (c) >= 1.2 x the speed of (b).
By default 512-token sequences and one micro-batch (4 pairs) per optimizer step, so that all three fit a few
minutes: accumulating micro-batches changes neither a micro-batch's memory nor the ratios.

    python -m benchmarks.gpu step                           # 10 steps of 16 pairs x 1536 tokens
    python -m benchmarks.gpu step --max-train-seconds 90    # stop after the step that crosses 90 s of training
    python -m benchmarks.gpu reference                      # (a), (b), (c): 1 warm-up + 2 timed steps each
    python -m benchmarks.gpu step --test-mode               # CPU: the same code at a tiny shape (a check)

Run from the repository root. Needs a CUDA GPU: without one it exits with status 2 and says so before building
anything. ``--test-mode`` runs the same code on CPU with a tiny Mistral shape (:data:`TEST_SHAPE`), 2 pairs of
64-token sequences per step, 1 warm-up + 1 timed step: a check of the code path for the tests and the test mode of
scripts/gpu_acceptance.sh, not a measurement. Writes results/gpu_step.json or results/gpu_reference.json
(``--json FILE`` to write elsewhere; test mode writes only to ``--json``).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import bitsandbytes as bnb
import torch
from torch import nn
from transformers import MistralConfig, MistralForCausalLM, TrainerCallback
from transformers.utils.quantization_config import QuantizationMethod

from benchmarks import _common as C
from helpers.models import keep_nf4_trainable
from helpers.notebook import quiet_libraries
from helpers.profiles import Profile, get_profile
from helpers.runs import display_path, write_json

ANCHOR_PAIRS_PER_SECOND = 200 * 16 / 3600  # the seed's run: 200 steps x 16 pairs in about an hour on one A100
MEMORY_TARGET, SPEED_TARGET = 0.6, 1.2  # (b) peak / (a) peak; (c) steps per second / (b)
TEST_SHAPE = {  # test mode: Mistral-7B's structure (GQA 2:1 here, 3.5 x MLP) at a width a CPU trains in a second
    "hidden_size": 128,
    "intermediate_size": 448,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
TEST_SEQ_LEN, TEST_PAIRS_PER_MICRO_BATCH = 64, 2
REFERENCE_SEQ_LEN = 512
# Dense tensor-core peak (TFLOP/s) in the precision training uses: bf16, or fp16 on cards without bf16 (T4, V100).
# Matched against torch.cuda.get_device_name() in this order: the more specific names first ("L40S" before "L4").
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200", 989.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 125.0),
    ("T4", 65.0),  # fp16
    ("V100", 125.0),  # fp16
)
NO_CUDA_MESSAGE = (
    "benchmarks.gpu needs a CUDA GPU and this machine has none (torch.cuda.is_available() is False): it builds a "
    "Mistral-7B-shaped model in 4-bit on the GPU. On CPU, `python -m benchmarks.reference_model` measures the same "
    "comparison on a small model, and `--test-mode` checks this script's code path at a tiny shape."
)
TEST_MODE_WITH_CUDA_MESSAGE = (
    "--test-mode runs on the CPU, but this process sees a CUDA GPU (the profile would pick GPU precision and "
    "placement): hide it with CUDA_VISIBLE_DEVICES= for the test mode, or drop --test-mode to measure."
)
LABELS = {"separate_ref": "(a) separate ref_model", "peft_ref": "(b) adapter off (ref_model=None)",
          "peft_precompute": "(c) (b) + precompute_ref_log_probs"}


# --------------------------------------------------------------------------------------------- model and FLOPs


def mistral_7b_config(tokenizer, *, test_mode: bool = False) -> MistralConfig:
    """OpenHermes-2.5-Mistral-7B's config (Mistral-7B's shape, 32,002-token vocabulary, benchmarks._common) with
    ``tokenizer``'s special ids; ``test_mode``: the same config at :data:`TEST_SHAPE`'s width.

    The tokenizer is the tiny model's (ids below 2,048, all valid ids of the 32,002-token vocabulary).
    """
    config = C.mistral_config(**(TEST_SHAPE if test_mode else {}), bos_token_id=None,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"the tokenizer's {len(tokenizer)} tokens do not fit the {config.vocab_size}-token vocabulary")
    return config


def matmul_parameters(config: MistralConfig) -> dict[str, int]:
    """The weights that take part in matmuls, counted on the meta device (no memory).

    ``layers``: every linear layer of the decoder layers; ``down_proj``: the last projection of each layer (the
    part of ``layers`` that gradient checkpointing does not recompute, see :func:`step_flops`); ``head``: the output
    head. The input embedding is a lookup and does no matmul.
    """
    model = C.meta_model(config)
    head = model.get_output_embeddings()
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]
    return {
        "layers": sum(m.weight.numel() for _, m in linears),
        "down_proj": sum(m.weight.numel() for name, m in linears if name.endswith("mlp.down_proj")),
        "head": head.weight.numel(),
    }


def step_flops(config: MistralConfig, seq_len: int, tokens: int, *, reference_forward: bool = True,
               checkpointing: bool = True) -> dict[str, float]:
    """Matmul FLOPs of one LoRA-DPO optimizer step on a frozen base: ``tokens`` tokens (chosen + rejected sequences
    of ``seq_len`` tokens each, summed over the accumulated micro-batches).

    Per token, with N_l the decoder layers' matmul weights, N_h the output head's, n layers of width d, L = seq_len:

    - forward: 2 N_l + 2 N_h, plus 4 n L d for attention (QK^T and AV over all L keys: causal masking is not
      discounted, as in PaLM's MFU);
    - the policy's backward on a frozen base: gradients with respect to activations only, 2 N_l + 2 N_h (the weight
      gradients of an ordinary backward are never computed), plus 8 n L d (each attention matmul has two inputs
      to differentiate);
    - the reference forward, one more forward, unless its log-probs were precomputed (``reference_forward=False``).

    ``model`` = policy forward + backward (+ reference forward): the FLOPs MFU counts. ``hardware`` adds what
    gradient checkpointing recomputes in the backward: each decoder layer's forward once more except its last
    projection (down_proj), which PyTorch's non-reentrant checkpointing does not redo (it stops as soon as the
    tensors the backward needs exist). LoRA's own matmuls (r=16: about 0.6% of Mistral-7B's layer weights) are
    left out, so both figures are slight under-counts.
    """
    n = matmul_parameters(config)
    attention = config.num_hidden_layers * seq_len * config.hidden_size
    forward = 2 * n["layers"] + 2 * n["head"] + 4 * attention
    backward = 2 * n["layers"] + 2 * n["head"] + 8 * attention
    model = forward + backward + (forward if reference_forward else 0)
    recompute = 2 * (n["layers"] - n["down_proj"]) + 4 * attention if checkpointing else 0
    return {
        "matmul_parameters": n["layers"] + n["head"],
        "forward_flops_per_token": float(forward),
        "model": float(model * tokens),
        "hardware": float((model + recompute) * tokens),
    }


def peak_tflops(device_name: str, override: float | None = None) -> float | None:
    """The card's dense peak TFLOP/s for training (:data:`PEAK_TFLOPS`), ``override`` when given, else None."""
    if override:
        return override
    for fragment, value in PEAK_TFLOPS:
        if fragment.lower() in device_name.lower():
            return value
    return None


def build_nf4_mistral(config: MistralConfig, *, device: str | torch.device, dtype: torch.dtype, seed: int = 0,
                      std: float = 0.02) -> MistralForCausalLM:
    """A MistralForCausalLM with random weights made directly on ``device``, its decoder linear layers in NF4.

    Built on the meta device, then each decoder ``nn.Linear`` becomes a bitsandbytes ``Linear4bit`` (NF4, double
    quantisation, as the profiles' BitsAndBytesConfig) whose random weight is drawn on the device in ``dtype`` and
    quantised there at once, one layer at a time, so the full-precision model never exists (7B in bf16 would be
    14.5 GB; writing it out and loading it with from_pretrained would cost minutes of disk I/O, and
    that loading path is what the acceptance run's pipeline step checks). Embeddings, norms and lm_head are made
    in ``dtype``, as ``from_pretrained(..., quantization_config=...)`` leaves them. Flagged as transformers flags a
    bitsandbytes 4-bit model (``is_loaded_in_4bit``, ``quantization_method``), so PEFT wraps the layers with its
    4-bit LoRA, TRL casts the adapter to bf16, and the Trainer does not move the model: exactly as with a model
    from load_model. bitsandbytes' CPU packing is left at its default: callers that train on CPU forbid it.
    """
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = MistralForCausalLM(config)
    head = model.get_output_embeddings()
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, nn.Linear) or child is head:
                continue
            layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False, compute_dtype=dtype,
                                      compress_statistics=True, quant_type="nf4", device="meta")
            weight = torch.empty(child.out_features, child.in_features, device=device, dtype=dtype)
            weight.normal_(0.0, std)
            # bitsandbytes' own pattern: a Params4bit with the layer's settings, quantised by .to(device)
            layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, **layer.weight.__dict__).to(device)
            del weight
            setattr(module, child_name, layer)
    for name, module in model.named_modules():
        for pname, param in list(module.named_parameters(recurse=False)):
            if not param.is_meta:
                continue
            value = torch.empty(param.shape, device=device, dtype=dtype)
            if "norm" in name or "norm" in type(module).__name__.lower():
                value.fill_(1.0)
            else:
                value.normal_(0.0, std)
            module._parameters[pname] = nn.Parameter(value, requires_grad=param.requires_grad)
    with torch.device(device):  # the rotary inv_freq buffers are computed, not loaded: make them again, for real
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"tensors left on the meta device: {leftover[:5]}")
    model.is_loaded_in_4bit = True  # what transformers' bitsandbytes quantizer sets on a 4-bit model
    model.quantization_method = QuantizationMethod.BITS_AND_BYTES
    if torch.device(device).type == "cuda":  # as load_model's device_map={"": current device}
        model.hf_device_map = {"": torch.cuda.current_device()}
    model.eval()  # as from_pretrained returns it
    return model


# --------------------------------------------------------------------------------------------- one DPO run


class TrainingBudget(TrainerCallback):
    """Stops training after the first optimizer step that ends more than ``seconds`` after training began."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.stopped_after_step: int | None = None
        self._t0 = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        over = self.seconds is not None and time.perf_counter() - self._t0 >= self.seconds
        if over and state.global_step < state.max_steps:
            control.should_training_stop = True
            self.stopped_after_step = state.global_step


def run_profile(*, test_mode: bool, seq_len: int, steps: int, accumulation: int | None) -> Profile:
    """The ``full`` profile as these runs train it: ``steps`` optimizer steps, max_length ``seq_len``, nothing saved.

    The recipe's LR warm-up is dropped (it changes no step's cost). ``accumulation``: micro-batches per optimizer
    step (None: the profile's 4; test mode 1). Test mode: :data:`TEST_PAIRS_PER_MICRO_BATCH` pairs per micro-batch;
    on a CPU the profile itself trains in fp32 with plain AdamW (helpers.profiles.fit_to_machine).
    """
    changes: dict[str, Any] = {"max_steps": steps, "warmup_steps": 0, "save_strategy": "no", "logging_steps": 1,
                               "max_length": seq_len, "disable_tqdm": True}
    if test_mode:
        changes.update(per_device_train_batch_size=TEST_PAIRS_PER_MICRO_BATCH, gradient_accumulation_steps=1)
    if accumulation is not None:
        changes["gradient_accumulation_steps"] = accumulation
    return get_profile("full", allow_cpu=test_mode).with_changes("dpo", **changes)


def run_dpo(mode: str = "peft_ref", *, test_mode: bool = False, seq_len: int | None = None, steps: int = 10,
            warmup: int = 1, accumulation: int | None = None, max_train_seconds: float | None = None,
            peak_tflops_override: float | None = None) -> dict[str, Any]:
    """One DPO configuration in this process: build the model(s), train ``warmup + steps`` steps, measure.

    ``mode``: a key of ``benchmarks._common.REFERENCE_MODES``. ``seq_len``: tokens per sequence (default: the
    profile's max_length, 1536; test mode 64). ``max_train_seconds``: stop after the step that crosses this much
    training time (the steps done are reported). Without ``test_mode`` it needs CUDA; with it, the CPU.
    Returns the figures (seconds per step = median of the steps after the warm-up).
    """
    if mode not in C.REFERENCE_MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(C.REFERENCE_MODES)}")
    cuda = torch.cuda.is_available()
    if test_mode and cuda:
        raise RuntimeError(TEST_MODE_WITH_CUDA_MESSAGE)
    if not test_mode and not cuda:
        raise RuntimeError(NO_CUDA_MESSAGE)
    started = time.perf_counter()
    seq_len = seq_len or (TEST_SEQ_LEN if test_mode else get_profile("full", allow_cpu=True).dpo["max_length"])
    profile = run_profile(test_mode=test_mode, seq_len=seq_len, steps=warmup + steps, accumulation=accumulation)
    dtype = getattr(torch, profile.dtype)
    tokenizer = C.bench_tokenizer()
    config = mistral_7b_config(tokenizer, test_mode=test_mode)
    t = profile.dpo
    pairs_per_step = t["per_device_train_batch_size"] * t["gradient_accumulation_steps"]
    dataset = C.synthetic_pairs(tokenizer, pairs_per_step * (warmup + steps), seq_len)
    out: dict[str, Any] = {
        "mode": mode, "test_mode": test_mode, "device": torch.cuda.get_device_name() if cuda else "cpu",
        "parameters": sum(p.numel() for p in C.meta_model(config).parameters()), "seq_len": seq_len,
        "pairs_per_step": pairs_per_step,
        "per_device_train_batch_size": t["per_device_train_batch_size"],
        "gradient_accumulation_steps": t["gradient_accumulation_steps"], "compute_dtype": str(dtype),
    }

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = build_nf4_mistral(config, device="cuda" if cuda else "cpu", dtype=dtype)
    ref_model = build_nf4_mistral(config, device="cuda" if cuda else "cpu", dtype=dtype) if mode == "separate_ref" \
        else None
    for m in (model, ref_model):  # on a CPU, before (c)'s eval-mode precompute pass: see keep_nf4_trainable
        if m is not None:
            keep_nf4_trainable(m)
    if cuda:
        torch.cuda.synchronize()
        out["allocated_after_build_gib"] = torch.cuda.memory_allocated() / 2**30
    out["build_seconds"] = round(time.perf_counter() - t0, 1)
    out["layers_in_4bit"] = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    out["attn_implementation"] = getattr(model.config, "_attn_implementation", None)

    profile = profile.with_changes("dpo", precompute_ref_log_probs=mode == "peft_precompute")
    output_dir = C.temp_folder("bench-gpu-dpo-")
    timer, budget = C.step_timer(sync_cuda=cuda), TrainingBudget(max_train_seconds)
    try:
        t0 = time.perf_counter()
        trainer = C.dpo_trainer(profile, model, tokenizer, dataset, output_dir, ref_model=ref_model)
        if cuda:
            torch.cuda.synchronize()
        out["trainer_setup_seconds"] = round(time.perf_counter() - t0, 1)  # (c): includes the precompute pass
        args = trainer.args
        out["precision"] = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
        out["optim"] = str(getattr(args.optim, "value", args.optim))
        out["gradient_checkpointing"] = bool(args.gradient_checkpointing)
        out["ref_model_is_separate"] = trainer.ref_model is not None
        out["adapter_dtypes"] = sorted({str(p.dtype) for p in trainer.model.parameters() if p.requires_grad})
        out["trainable_parameters"] = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        out["sequences_fill_seq_len"] = _fill(trainer.train_dataset, seq_len)
        trainer.add_callback(timer)
        trainer.add_callback(budget)
        if cuda:
            out["peak_setup_gib"] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
        C.reset_peak_rss()
        t0 = time.perf_counter()
        trainer.train()
        out["train_seconds"] = round(time.perf_counter() - t0, 1)
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)
    if cuda:
        out["peak_train_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    else:
        out["peak_rss_train_mib"] = C.peak_rss_mib()
        out["policy_packed_nf4_layers"] = C.packed_nf4_layers(trainer.model)  # > 0: the backward pass was wrong
    out["steps_requested"] = warmup + steps
    out["steps_done"] = len(timer.seconds)
    out["stopped_by_time_budget"] = budget.stopped_after_step is not None
    out["max_train_seconds"] = max_train_seconds
    out["warmup_steps"] = warmup
    out["step_seconds_all"] = [round(s, 3) for s in timer.seconds]
    out["seconds_per_step"] = timer.seconds_per_step(warmup)
    out["pairs_per_second"] = pairs_per_step / out["seconds_per_step"]
    out["vs_anchor"] = out["pairs_per_second"] / ANCHOR_PAIRS_PER_SECOND
    out["tokens_per_step"] = pairs_per_step * 2 * seq_len
    out["losses"] = [float(e["loss"]) for e in trainer.state.log_history if "loss" in e]
    out["losses_finite"] = bool(out["losses"]) and all(math.isfinite(x) for x in out["losses"])
    flops = step_flops(config, seq_len, out["tokens_per_step"], reference_forward=mode != "peft_precompute",
                       checkpointing=out["gradient_checkpointing"])
    out["flops"] = flops
    out["achieved_tflops"] = flops["model"] / out["seconds_per_step"] / 1e12
    peak = peak_tflops(out["device"], peak_tflops_override) if cuda else None
    out["peak_tflops"] = peak
    out["mfu"] = out["achieved_tflops"] / peak if peak else None
    out["hfu"] = flops["hardware"] / out["seconds_per_step"] / 1e12 / peak if peak else None
    out["wall_seconds"] = round(time.perf_counter() - started, 1)
    return out


def _fill(dataset, seq_len: int) -> bool | None:
    """Whether every tokenized chosen and rejected sequence is at least ``seq_len`` tokens long before the collator
    truncates it to ``seq_len`` (so that a step really has the tokens the FLOPs count); None when TRL's columns are
    not the expected ``prompt_ids`` / ``chosen_ids`` / ``rejected_ids``."""
    if not {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(dataset.column_names):
        return None
    return all(len(row["prompt_ids"]) + min(len(row["chosen_ids"]), len(row["rejected_ids"])) >= seq_len
               for row in dataset)


def measure_step(*, test_mode: bool = False, seq_len: int | None = None, steps: int = 10, warmup: int = 1,
                 accumulation: int | None = None, max_train_seconds: float | None = None,
                 peak_tflops_override: float | None = None) -> dict[str, Any]:
    """The recipe's DPO step as the course trains it (reference = adapter off): :func:`run_dpo` in ``peft_ref``."""
    return run_dpo("peft_ref", test_mode=test_mode, seq_len=seq_len, steps=steps, warmup=warmup,
                   accumulation=accumulation, max_train_seconds=max_train_seconds,
                   peak_tflops_override=peak_tflops_override)


def step_report(r: dict[str, Any]) -> str:
    """The figures of one run as the lines the ``step`` command prints."""
    lines = [
        f"device: {r['device']}  (Mistral-7B shape{' (TEST MODE: tiny width)' if r['test_mode'] else ''}, "
        f"{r['parameters'] / 1e9:.2f} B parameters, {r['layers_in_4bit']} linear layers in 4-bit NF4; "
        f"{r['precision']}, {r['optim']}, gradient checkpointing {'on' if r['gradient_checkpointing'] else 'off'})",
        f"batch: {r['pairs_per_step']} pairs per optimizer step ({r['per_device_train_batch_size']} x "
        f"{r['gradient_accumulation_steps']} accumulated), {r['seq_len']} tokens per sequence, "
        f"{r['tokens_per_step']:,} tokens per step (chosen + rejected)",
        f"seconds per optimizer step: {r['seconds_per_step']:.2f}  (median after {r['warmup_steps']} warm-up; all "
        f"{r['steps_done']} steps: {r['step_seconds_all']}"
        + ("; stopped by the time budget" if r["stopped_by_time_budget"] else "") + ")",
        f"pairs per second: {r['pairs_per_second']:.2f}  ({r['vs_anchor']:.1f} x the seed's anchor of "
        f"{ANCHOR_PAIRS_PER_SECOND:.2f} on one A100; 200 steps would take {200 * r['seconds_per_step'] / 60:.0f} min)",
    ]
    if "peak_train_gib" in r:
        lines.append(f"GPU memory: {r['allocated_after_build_gib']:.1f} GiB after building, peak "
                     f"{r['peak_train_gib']:.1f} GiB allocated / {r['peak_reserved_gib']:.1f} GiB reserved while "
                     "training")
    else:
        lines.append(f"peak RSS while training: {r['peak_rss_train_mib']:.0f} MiB (CPU)")
    if r.get("sequences_fill_seq_len") is False:
        lines.append(f"WARNING: some pairs are shorter than {r['seq_len']} tokens: fewer tokens per step than counted")
    lines.append(f"model FLOPs per step: {r['flops']['model']:.3g} (policy forward + backward for activation "
                 "gradients + reference forward, attention included; see benchmarks.gpu.step_flops)")
    if r["mfu"] is not None:
        lines.append(f"MFU: {r['mfu']:.1%} of {r['peak_tflops']:.0f} TFLOP/s ({r['achieved_tflops']:.0f} achieved); "
                     f"HFU, counting checkpointing's recomputation: {r['hfu']:.1%}")
    else:
        lines.append("MFU: " + ("not on a CPU" if r["test_mode"] else "unknown card, pass --peak-tflops"))
    lines.append(f"losses: {[round(x, 4) for x in r['losses']]}  (random weights: only finiteness means anything)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- the reference three ways


def worker(job: dict[str, Any]) -> dict[str, Any]:
    """``python -m benchmarks.gpu --worker JSON``: one :func:`run_dpo` configuration in this fresh process."""
    C.prepare_worker_process(threads=job.pop("threads", None))
    return run_dpo(**job)


def compare_reference(*, test_mode: bool = False, modes: Sequence[str] = tuple(C.REFERENCE_MODES),
                      seq_len: int | None = None, steps: int = 2, warmup: int = 1, accumulation: int | None = 1,
                      max_train_seconds: float | None = None, mode_timeout: float = 900,
                      peak_tflops_override: float | None = None) -> dict[str, Any]:
    """The reference model three ways (``modes``), each a :func:`run_dpo` in a fresh process; returns the results
    per mode, the table rows, the verdicts on the two targets and plain statements of them.

    ``seq_len`` defaults to :data:`REFERENCE_SEQ_LEN` (test mode 64); ``mode_timeout``: seconds before one mode's
    process is stopped (recorded as an error; the other modes still run).
    """
    seq_len = seq_len or (TEST_SEQ_LEN if test_mode else REFERENCE_SEQ_LEN)
    results: dict[str, dict[str, Any]] = {}
    for mode in modes:
        job = {"mode": mode, "test_mode": test_mode, "seq_len": seq_len, "steps": steps, "warmup": warmup,
               "accumulation": accumulation, "max_train_seconds": max_train_seconds,
               "peak_tflops_override": peak_tflops_override, "threads": 2 if test_mode else (os.cpu_count() or 1)}
        print(f"running {mode}: {C.REFERENCE_MODES[mode]} ...", flush=True)
        r = C.run_worker("benchmarks.gpu", job, timeout=mode_timeout,
                         omp_wait_policy=C.DEFAULT_OMP_WAIT_POLICY if test_mode else None)
        results[mode] = r
        if "error" in r:
            print(f"  FAILED: {r['error']}\n{r['log_tail']}", flush=True)
        else:
            print(f"  {r['seconds_per_step']:.2f} s/step, {r['pairs_per_second']:.2f} pairs/s, peak "
                  f"{_memory(r)}, losses {[round(x, 4) for x in r['losses']]}", flush=True)
    rows, statements, verdict = summarise_reference(results)
    return {"seq_len": seq_len, "results": results, "rows": rows, "statements": statements, "verdict": verdict}


def _memory(r: dict[str, Any]) -> str:
    return f"{r['peak_train_gib']:.1f} GiB" if "peak_train_gib" in r else f"{r['peak_rss_train_mib']:.0f} MiB RSS"


REFERENCE_COLUMNS = [
    ("label", "configuration"),
    ("seconds_per_step", "s/step"),
    ("pairs_per_second", "pairs/s"),
    ("speed_vs_a", "speed vs (a)"),
    ("mfu", "MFU"),
    ("peak", "peak memory (GiB; MiB RSS on CPU)"),
    ("peak_vs_a", "peak vs (a)"),
    ("setup_seconds", "build + set-up (s)"),
]


def summarise_reference(results: dict[str, dict[str, Any]]) -> tuple[list[dict], list[str], dict]:
    """Table rows (ratios against (a)), plain statements and the verdicts on the two targets."""
    ok = {mode: r for mode, r in results.items() if "error" not in r}
    base = ok.get("separate_ref")
    rows = []
    for mode, r in ok.items():
        peak = r.get("peak_train_gib", r.get("peak_rss_train_mib"))
        row = {"mode": mode, "label": LABELS[mode], "seconds_per_step": r["seconds_per_step"],
               "pairs_per_second": r["pairs_per_second"], "mfu": r["mfu"], "peak": peak,
               "setup_seconds": r["build_seconds"] + r["trainer_setup_seconds"]}
        if base:
            base_peak = base.get("peak_train_gib", base.get("peak_rss_train_mib"))
            row["speed_vs_a"] = base["seconds_per_step"] / r["seconds_per_step"]
            row["peak_vs_a"] = peak / base_peak if peak and base_peak else None
        rows.append(row)
    by = {row["mode"]: row for row in rows}
    statements, verdict = [], {}
    if by.get("peft_ref", {}).get("peak_vs_a") is not None:
        ratio = by["peft_ref"]["peak_vs_a"]
        verdict["memory_b_vs_a"] = {"ratio": ratio, "target": f"<= {MEMORY_TARGET}", "met": ratio <= MEMORY_TARGET}
        statements.append(f"memory: (b) peaks at {ratio:.2f} x (a) - target <= {MEMORY_TARGET}: "
                          + ("MET" if ratio <= MEMORY_TARGET else "NOT MET"))
    if "peft_ref" in ok and "peft_precompute" in ok:
        speed = ok["peft_ref"]["seconds_per_step"] / ok["peft_precompute"]["seconds_per_step"]
        verdict["speed_c_vs_b"] = {"ratio": speed, "target": f">= {SPEED_TARGET}", "met": speed >= SPEED_TARGET}
        statements.append(f"speed: (c) runs {speed:.2f} x the steps per second of (b) - target >= {SPEED_TARGET}: "
                          + ("MET" if speed >= SPEED_TARGET else "NOT MET")
                          + f"; its precompute pass took {ok['peft_precompute']['trainer_setup_seconds']:.0f} s "
                          "before training (one reference forward per pair of the dataset)")
    for mode, r in results.items():
        if "error" in r:
            statements.append(f"{LABELS[mode]}: FAILED ({r['error']})")
    return rows, statements, verdict


# --------------------------------------------------------------------------------------------- command line


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """The command line: ``step`` or ``reference``, and their options."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    step = commands.add_parser("step", help="the recipe's DPO step: s/step, pairs/s, peak memory, MFU")
    step.add_argument("--steps", type=int, default=None, help="timed optimizer steps after the warm-up (10; test 1)")
    step.add_argument("--accumulation", type=int, default=None,
                      help="micro-batches per step (the profile's 4; test mode 1)")
    reference = commands.add_parser("reference", help="the reference model three ways, each in a fresh process")
    reference.add_argument("--steps", type=int, default=None,
                           help="timed optimizer steps after the warm-up (2; test mode 1)")
    reference.add_argument("--accumulation", type=int, default=1, help="micro-batches per step (1: 4 pairs)")
    reference.add_argument("--modes", default=",".join(C.REFERENCE_MODES), help="comma-separated, of: %(default)s")
    reference.add_argument("--mode-timeout", type=float, default=900, help="seconds before one mode is stopped")
    for sub in (step, reference):
        sub.add_argument("--seq-len", type=int, default=None,
                         help=f"tokens per sequence (step: the profile's 1536; reference: {REFERENCE_SEQ_LEN})")
        sub.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps (1)")
        sub.add_argument("--max-train-seconds", type=float, default=None,
                         help="stop training after the step that crosses this many seconds")
        sub.add_argument("--peak-tflops", type=float, default=None, help="the card's dense peak, if not in the table")
        sub.add_argument("--json", metavar="FILE", default=None,
                         help="write the figures here (default: benchmarks/results/gpu_COMMAND.json; test mode: none)")
        sub.add_argument("--test-mode", action="store_true",
                         help="CPU, tiny shape, short steps: checks the code path (not a measurement)")
    return parser.parse_args(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``step`` or ``reference``; 0 when it measured (finite losses), 1 when a run failed, 2 without CUDA."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if not args.test_mode and not torch.cuda.is_available():
        print(f"error: {NO_CUDA_MESSAGE}", file=sys.stderr)
        return 2
    if args.test_mode and torch.cuda.is_available():
        print(f"error: {TEST_MODE_WITH_CUDA_MESSAGE}", file=sys.stderr)
        return 2
    quiet_libraries()
    if args.test_mode:
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    started, load_start = time.perf_counter(), C.loadavg()
    name = f"gpu_{args.command}"
    if args.command == "step":
        steps = args.steps or (1 if args.test_mode else 10)
        figures = measure_step(test_mode=args.test_mode, seq_len=args.seq_len, steps=steps, warmup=args.warmup,
                               accumulation=args.accumulation, max_train_seconds=args.max_train_seconds,
                               peak_tflops_override=args.peak_tflops)
        print(step_report(figures))
        ok = figures["losses_finite"]
        if not ok:
            print("FAILED: a logged loss is not finite (or none was logged)", file=sys.stderr)
    else:
        figures = compare_reference(test_mode=args.test_mode, modes=args.modes.split(","), seq_len=args.seq_len,
                                    steps=args.steps or (1 if args.test_mode else 2), warmup=args.warmup,
                                    accumulation=args.accumulation,
                                    max_train_seconds=args.max_train_seconds, mode_timeout=args.mode_timeout,
                                    peak_tflops_override=args.peak_tflops)
        print()
        print(C.format_table(figures["rows"], REFERENCE_COLUMNS))
        for line in figures["statements"]:
            print("- " + line)
        ok = all("error" not in r and r["losses_finite"] for r in figures["results"].values())
    if args.test_mode:
        print("(test mode: the code path on CPU at a tiny shape - not a measurement)")
    payload = {**C.run_header("gpu", argv, load_start, started),
               "test_mode": args.test_mode, "ok": ok, "anchor_pairs_per_second": ANCHOR_PAIRS_PER_SECOND,
               "figures": figures}
    path = Path(args.json) if args.json else None if args.test_mode else C.RESULTS_DIR / f"{name}.json"
    if path is not None:
        write_json(path, payload)
        print(f"wrote {display_path(path)} in {payload['wall_seconds']:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    if not C.worker_entry(sys.argv[1:], worker):
        sys.exit(main())
