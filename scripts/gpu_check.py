"""GPU check: a few DPO steps of the real recipe's shape on this GPU, with random weights, nothing downloaded.

    python scripts/gpu_check.py                 # Mistral-7B shape, 3 optimizer steps of 16 pairs x 1536 tokens
    python scripts/gpu_check.py --tiny-shape    # a small Mistral: checks the logic in seconds (CUDA too)

What runs is the course's own code with the ``full`` profile: ``helpers.loading.load_model`` (4-bit NF4, double
quantisation, compute dtype by hardware), ``helpers.training.make_trainer`` (the recipe's LoRA, paged_adamw_32bit,
gradient checkpointing, 4 pairs x 4 accumulated, bf16/fp16 by hardware, reference = adapter off). Only the weights
(random) and the pairs (random tokens of the recipe's lengths: prompt 1024 + answer 512 = 1536) are stand-ins.

How the 7B model is made without a download and without ever holding it in fp32: its config is Mistral-7B's
(hidden 4096, intermediate 14336, 32 layers, 32 heads, 8 KV heads, vocab 32000); random bf16 weights are drawn on
the GPU one tensor at a time and written as safetensors shards (one decoder layer each, ~0.45 GB of CPU RAM at a
time, 14.5 GB of disk in a temporary folder, deleted at the end); then ``load_model`` loads that folder exactly as
it loads OpenHermes-2.5, quantising each layer to NF4 as it arrives on the GPU. This costs a minute of disk I/O
but checks the real loading path, not a hand-made stand-in for it.

The tokenizer is the tiny model's (helpers.tiny_model.build_tokenizer, a few seconds, ChatML template, pad != eos):
its ids (< 2,048) are valid ids of a 32,000-token vocabulary, and each pair is made of words that are one token
each, so the lengths come out exact. Training a 32,000-token BPE would take minutes and change nothing measured.

Printed: seconds per optimizer step, pairs per second (against the card's anchor, about 0.9 pairs/s: 200 steps x
16 pairs in about an hour on an A100), peak GPU memory, and a FLOPs utilisation estimate (formula printed).
Without a CUDA GPU it exits with status 2 and says so; it never runs in the CPU test suite.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

ANCHOR_PAIRS_PER_S = 200 * 16 / 3600  # the card's run: 200 steps x 16 pairs in about an hour on one A100
NO_CUDA_MESSAGE = (
    "gpu_check needs a CUDA GPU and this machine has none (torch.cuda.is_available() is False). "
    "It measures the real recipe's speed and memory on a GPU; on CPU use the tiny profile instead: "
    "python -m helpers run --profile tiny"
)

# Dense peak tensor FLOP/s in the precision training uses (bf16; fp16 for cards without native bf16).
# Matched against torch.cuda.get_device_name() in this order (the more specific names first).
PEAK_FLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H200", 989e12),
    ("H100", 989e12),  # SXM
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("T4", 65e12),  # fp16
    ("V100", 125e12),  # fp16
]

MISTRAL_7B_SHAPE = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8
)
TINY_SHAPE = dict(
    hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2
)


def peak_flops(device_name: str) -> float | None:
    """The card's dense peak FLOP/s for training (bf16, or fp16 where it has no bf16), None when not in the table."""
    for key, value in PEAK_FLOPS:
        if key.lower() in device_name.lower():
            return value
    return None


def mistral_config(*, tiny_shape: bool = False, tokenizer=None, max_positions: int = 32768):
    """Mistral-7B's config (or a small one of the same family), with the tokenizer's special ids."""
    from transformers import MistralConfig

    shape = TINY_SHAPE if tiny_shape else MISTRAL_7B_SHAPE
    special = {}
    if tokenizer is not None:
        special = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    return MistralConfig(
        vocab_size=32000,
        max_position_embeddings=max_positions,
        rope_theta=10000.0,
        sliding_window=None,
        tie_word_embeddings=False,
        **shape,
        **special,
    )


def compute_parameters(config) -> tuple[int, int]:
    """(all parameters, parameters that take part in the matmuls: all but the embedding lookup) of a config."""
    import torch
    from transformers import MistralForCausalLM

    with torch.device("meta"):
        model = MistralForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    return total, total - embedding


def write_random_checkpoint(folder: Path, config, tokenizer, *, device: str, seed: int = 0) -> Path:
    """Write a MistralForCausalLM with random bf16 weights to ``folder``, one decoder layer per shard.

    Shapes and names come from the model built on the meta device (no memory); each tensor is drawn on
    ``device`` (normal, std = initializer_range; norms = 1), moved to CPU and written, so at most one layer's
    weights are ever in CPU RAM. The folder then loads with ``from_pretrained`` like any hub checkpoint.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import MistralForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        skeleton = MistralForCausalLM(config)
    groups: dict[str, list[tuple[str, torch.Size]]] = {}
    for name, tensor in skeleton.state_dict().items():
        parts = name.split(".")
        key = f"layer{int(parts[2]):03d}" if name.startswith("model.layers.") else "other"
        groups.setdefault(key, []).append((name, tensor.shape))
    generator = torch.Generator(device=device).manual_seed(seed)
    weight_map: dict[str, str] = {}
    total_bytes = 0
    names = sorted(groups)
    for index, key in enumerate(names, start=1):
        filename = f"model-{index:05d}-of-{len(names):05d}.safetensors"
        shard = {}
        for name, shape in groups[key]:
            if name.endswith("norm.weight"):
                value = torch.ones(shape, dtype=torch.bfloat16, device=device)
            else:
                value = torch.empty(shape, dtype=torch.float32, device=device)
                value.normal_(0.0, config.initializer_range, generator=generator)
                value = value.to(torch.bfloat16)
            shard[name] = value.cpu().contiguous()
            weight_map[name] = filename
            total_bytes += value.numel() * 2
            del value
        save_file(shard, str(folder / filename), metadata={"format": "pt"})
        del shard
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, indent=1)
    )
    config.dtype = "bfloat16"
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def single_token_words(tokenizer) -> list[str]:
    """Words that are exactly one token with a leading space, so ``n`` of them are exactly ``n`` tokens."""
    words = []
    for piece in tokenizer.get_vocab():
        word = piece[1:]
        if piece.startswith("Ġ") and word.isascii() and word.isalpha() and len(word) > 1:
            if len(tokenizer(" " + word, add_special_tokens=False)["input_ids"]) == 1:
                words.append(word)
    if len(words) < 50:
        raise RuntimeError(f"the tokenizer has only {len(words)} single-token words; random pairs need more")
    return sorted(words)


def _prompt_text(tokenizer, words: list[str]) -> str:
    content = "Question:" + "".join(" " + w for w in words)
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)


def random_pairs(tokenizer, n_pairs: int, prompt_tokens: int, answer_tokens: int, *, seed: int = 0):
    """A ``datasets.Dataset`` of prompt/chosen/rejected strings (ChatML) of exactly the given token lengths.

    ``answer_tokens`` includes the end-of-turn token that closes each answer. Words are drawn at random from
    the single-token words, so the token ids are random too; chosen and rejected differ.
    """
    import datasets

    words = single_token_words(tokenizer)
    rng = random.Random(seed)

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    overhead = count(_prompt_text(tokenizer, []))
    n_prompt_words = prompt_tokens - overhead
    n_answer_words = answer_tokens - 1  # + <|im_end|>
    if n_prompt_words < 1 or n_answer_words < 1:
        raise ValueError(f"prompt_tokens must exceed {overhead} and answer_tokens 1")
    rows = []
    for _ in range(n_pairs):
        prompt = _prompt_text(tokenizer, rng.choices(words, k=n_prompt_words))
        chosen, rejected = ("".join(" " + w for w in rng.choices(words, k=n_answer_words)) for _ in range(2))
        eos = tokenizer.eos_token
        rows.append({"prompt": prompt, "chosen": chosen + eos, "rejected": rejected + eos})
    first = rows[0]
    got = (count(first["prompt"]), count(first["prompt"] + first["chosen"]) - count(first["prompt"]))
    if got != (prompt_tokens, answer_tokens):
        raise RuntimeError(f"random pairs came out {got} tokens long, not {(prompt_tokens, answer_tokens)}")
    return datasets.Dataset.from_list(rows)


def step_flops(compute_params: int, tokens: int) -> dict[str, float]:
    """FLOPs of one optimizer step of LoRA-DPO on a frozen base with ``tokens`` tokens (chosen + rejected).

    model FLOPs = 2NT (policy forward) + 2NT (reference forward, adapter off, no grad) + 2NT (backward: only
    the activation gradients; the frozen base's weight gradients, the other 2NT of a normal backward, are never
    computed) = 6NT. Gradient checkpointing recomputes the policy forward in the backward: hardware FLOPs = 8NT.
    N = parameters in the matmuls (all but the embedding lookup); LoRA's own FLOPs (<1% at r=16) and attention
    scores (~5% at 1536 tokens) are left out, so both are slight under-counts.
    """
    n, t = compute_params, tokens
    return {"model": 6.0 * n * t, "hardware": 8.0 * n * t}


def _timing_callback():
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.marks: list[float] = []
            self.losses: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            torch.cuda.synchronize() if torch.cuda.is_available() else None
            self.marks = [time.perf_counter()]

        def on_step_end(self, args, state, control, **kwargs):
            torch.cuda.synchronize() if torch.cuda.is_available() else None
            self.marks.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

        def step_seconds(self) -> list[float]:
            return [b - a for a, b in zip(self.marks, self.marks[1:])]

    return StepTimer()


def run_check(
    *,
    steps: int = 3,
    tiny_shape: bool = False,
    prompt_tokens: int = 1024,
    answer_tokens: int = 512,
    workdir: str | Path | None = None,
    keep: bool = False,
    peak_tflops: float | None = None,
    require_cuda: bool = True,
    **trainer_overrides: Any,
) -> dict[str, Any]:
    """Build, load, train ``steps`` optimizer steps and measure; returns the numbers :func:`main` prints.

    ``require_cuda=False`` and ``trainer_overrides`` (e.g. a smaller batch) exist only for the CPU smoke test
    of this logic in tests/test_gpu_check.py; the command line always requires CUDA and uses the profile as is.
    """
    import torch

    from helpers.loading import load_model, load_tokenizer, quantized_layer_names
    from helpers.profiles import get_profile
    from helpers.tiny_model import build_tokenizer
    from helpers.training import make_trainer, set_seed

    cuda = torch.cuda.is_available()
    if require_cuda and not cuda:
        raise RuntimeError(NO_CUDA_MESSAGE)
    profile = get_profile("full", check_hardware=require_cuda)
    device = "cuda" if cuda else "cpu"
    set_seed(profile.training.seed)
    started = time.perf_counter()
    base = Path(workdir) if workdir else None
    if base:
        base.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="gpu-check-model-", dir=base))
    try:
        tokenizer = build_tokenizer()
        config = mistral_config(tiny_shape=tiny_shape, tokenizer=tokenizer,
                                max_positions=max(4096, prompt_tokens + answer_tokens))
        total_params, compute_params = compute_parameters(config)
        print(f"[gpu-check] writing a random {'tiny' if tiny_shape else 'Mistral-7B'}-shaped model "
              f"({total_params / 1e9:.2f} B parameters, bf16) to {folder}", flush=True)
        t0 = time.perf_counter()
        write_random_checkpoint(folder, config, tokenizer, device=device)
        write_s = time.perf_counter() - t0
        print(f"[gpu-check] loading it in 4-bit NF4 with helpers.loading.load_model ({write_s:.0f} s to write)",
              flush=True)
        t0 = time.perf_counter()
        tokenizer = load_tokenizer(profile, str(folder))
        model = load_model(profile, source=str(folder), progress=False)
        load_s = time.perf_counter() - t0
        n_4bit = len(quantized_layer_names(model))
        loaded_gib = torch.cuda.memory_allocated() / 2**30 if cuda else float("nan")

        t = profile.training
        per_device = trainer_overrides.get("per_device_train_batch_size", t.per_device_train_batch_size)
        accumulation = trainer_overrides.get("gradient_accumulation_steps", t.gradient_accumulation_steps)
        pairs_per_step = per_device * accumulation
        data = random_pairs(tokenizer, pairs_per_step * (steps + 1), prompt_tokens, answer_tokens)
        out = folder / "trainer"
        trainer = make_trainer(profile, model, tokenizer, data, out, max_steps=steps, save_strategy="no",
                               logging_steps=1, **trainer_overrides)
        timer = _timing_callback()
        trainer.add_callback(timer)
        lengths = [len(r["prompt_ids"]) + len(r["chosen_ids"]) for r in trainer.train_dataset.select(range(4))]
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        print(f"[gpu-check] {steps} DPO steps of {pairs_per_step} pairs ({lengths[0]} tokens each side) "
              f"with the full profile's trainer", flush=True)
        trainer.train()
        step_s = timer.step_seconds()
        steady = step_s[1:] if len(step_s) > 1 else step_s
        seconds_per_step = sum(steady) / len(steady)
        tokens_per_step = pairs_per_step * 2 * lengths[0]  # chosen and rejected, each prompt + answer
        flops = step_flops(compute_params, tokens_per_step)
        name = torch.cuda.get_device_name() if cuda else "cpu"
        peak = peak_tflops * 1e12 if peak_tflops else peak_flops(name)
        args = trainer.args
        results = {
            "device": name,
            "shape": "tiny" if tiny_shape else "mistral-7b",
            "parameters": total_params,
            "compute_parameters": compute_params,
            "layers_in_4bit": n_4bit,
            "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
            "optim": str(getattr(args.optim, "value", args.optim)),
            "gradient_checkpointing": bool(args.gradient_checkpointing),
            "pairs_per_step": pairs_per_step,
            "tokens_per_sequence": lengths[0],
            "tokens_per_step": tokens_per_step,
            "steps": steps,
            "step_seconds": [round(s, 3) for s in step_s],
            "seconds_per_step": round(seconds_per_step, 3),
            "pairs_per_second": round(pairs_per_step / seconds_per_step, 3),
            "anchor_pairs_per_second": round(ANCHOR_PAIRS_PER_S, 3),
            "losses": timer.losses,
            "write_seconds": round(write_s, 1),
            "load_seconds": round(load_s, 1),
            "memory_after_load_gib": round(loaded_gib, 2),
            "peak_memory_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
            "peak_memory_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
            "model_flops_per_step": flops["model"],
            "hardware_flops_per_step": flops["hardware"],
            "peak_flops": peak,
            "mfu": round(flops["model"] / seconds_per_step / peak, 4) if peak else None,
            "hfu": round(flops["hardware"] / seconds_per_step / peak, 4) if peak else None,
            "total_seconds": round(time.perf_counter() - started, 1),
        }
        if any(not math.isfinite(x) for x in timer.losses):
            results["warning"] = "a logged loss is not finite"
        return results
    finally:
        if keep:
            print(f"[gpu-check] kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


def report(r: dict[str, Any]) -> str:
    """The results as the lines the command prints."""
    lines = [
        f"device: {r['device']}  ({r['shape']}, {r['parameters'] / 1e9:.2f} B parameters, "
        f"{r['layers_in_4bit']} linear layers in 4-bit NF4; {r['precision']}, {r['optim']}, "
        f"gradient checkpointing {'on' if r['gradient_checkpointing'] else 'off'})",
        f"batch: {r['pairs_per_step']} pairs per optimizer step, {r['tokens_per_sequence']} tokens per sequence, "
        f"{r['tokens_per_step']:,} tokens per step (chosen + rejected)",
        f"seconds per optimizer step: {r['seconds_per_step']:.2f}  (all steps: {r['step_seconds']}; "
        "the first, with warm-up, left out of the mean when there are more)",
        f"pairs per second: {r['pairs_per_second']:.2f}  (card's anchor on one A100: {r['anchor_pairs_per_second']:.2f}"
        f" -> {r['pairs_per_second'] / r['anchor_pairs_per_second']:.1f}x; 200 steps would take "
        f"{200 * r['seconds_per_step'] / 60:.0f} min)",
    ]
    if r["peak_memory_allocated_gib"] is not None:
        lines.append(
            f"GPU memory: {r['memory_after_load_gib']:.1f} GiB after loading, peak "
            f"{r['peak_memory_allocated_gib']:.1f} GiB allocated / {r['peak_memory_reserved_gib']:.1f} GiB reserved "
            "while training"
        )
    flops = (f"model FLOPs per step 6*N*T = {r['model_flops_per_step']:.3g} (N = {r['compute_parameters'] / 1e9:.2f} B "
             f"parameters in matmuls, T = {r['tokens_per_step']:,} tokens: 2NT policy forward + 2NT reference forward "
             "+ 2NT backward for activation gradients only, the base being frozen)")
    lines.append(flops)
    if r["mfu"] is not None:
        lines.append(
            f"MFU: {r['mfu']:.1%} of {r['peak_flops'] / 1e12:.0f} TFLOP/s peak; HFU (8NT, counting the recomputed "
            f"forward of gradient checkpointing): {r['hfu']:.1%}"
        )
    else:
        lines.append("MFU: unknown card, pass --peak-tflops to compute it")
    lines.append(f"losses: {[round(x, 4) for x in r['losses']]}  (random weights: only finiteness means anything)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps to run (default 3)")
    parser.add_argument("--tiny-shape", action="store_true", help="a small Mistral instead of 7B (logic check)")
    parser.add_argument("--prompt-tokens", type=int, default=1024, help="prompt length (the recipe's 1024)")
    parser.add_argument("--answer-tokens", type=int, default=512, help="answer length with <|im_end|> (512)")
    parser.add_argument("--workdir", help="where the random model is written (default: the system temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the random model folder")
    parser.add_argument("--peak-tflops", type=float, help="the card's peak TFLOP/s, if it is not in the table")
    parser.add_argument("--json", metavar="FILE", help="also write the numbers as JSON to FILE")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print(f"error: {NO_CUDA_MESSAGE}", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from helpers.notebook import quiet_libraries

    quiet_libraries()
    results = run_check(
        steps=args.steps,
        tiny_shape=args.tiny_shape,
        prompt_tokens=args.prompt_tokens,
        answer_tokens=args.answer_tokens,
        workdir=args.workdir,
        keep=args.keep,
        peak_tflops=args.peak_tflops,
    )
    print(report(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
