"""Notebook 02: what 4-bit NF4 loading keeps, and the recipe's memory on Mistral-7B, counted on a model built on
PyTorch's ``meta`` device (every module and shape, no storage, no download). The ``BitsAndBytesConfig(...)`` and
``from_pretrained(...)`` calls stand in the notebook's cells; tests/test_loading.py checks the table's rows against
tensors measured on a small model (the fused LM head's with TRL's own ``add_fused_lm_head``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NamedTuple

import bitsandbytes as bnb
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from transformers import AutoModelForCausalLM

from helpers.plots import save_figure
from helpers.profiles import Profile

GIB = 2**30
MISTRAL_7B_VOCAB, OPENHERMES_VOCAB = 32000, 32002  # OpenHermes-2.5 adds <|im_end|> = 32000 and <|im_start|> = 32001
# teknium/OpenHermes-2.5-Mistral-7B's config.json as published (mistralai/Mistral-7B-v0.1's shape, unchanged).
OPENHERMES_2_5_CONFIG: dict[str, Any] = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    vocab_size=OPENHERMES_VOCAB, max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=10000.0,
    sliding_window=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_id=32000, hidden_act="silu")
NF4_BLOCKSIZE, NESTED_BLOCKSIZE = 64, 256  # one absmax scale per 64 weights; double quantisation: per 256 scales
# TRL 1.16's fused LM head (trl/kernels/chunked_logprob.py TOKEN_CHUNK_SIZE, trl/trainer/utils.py
# _CHUNKED_LOGPROB_CHUNK_SIZE): hidden states go through lm_head one tile of tokens x vocabulary at a time.
TRL_TOKEN_TILE, TRL_VOCAB_TILE = 4096, 32768
TRL_PER_TOKEN_BYTES = 8 + 4 + 4 + 2  # kept per scored token: int64 target, fp32 log-normaliser and entropy, 2 masks


def meta_model(config) -> torch.nn.Module:
    """The causal LM of ``config`` on PyTorch's meta device: every module and parameter shape, no storage."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def quantized_layer_names(model) -> list[str]:
    """Names of the layers stored in 4-bit (bitsandbytes ``Linear4bit``)."""
    return [name for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)]


def quant_state_bytes(model) -> int:
    """Bytes of the NF4 constants of a 4-bit model (scales, code tables, offsets): they live in each weight's
    ``quant_state``, outside parameters and buffers, so ``get_memory_footprint()`` leaves them out."""
    def constants(state) -> int:
        found = sum(t.numel() * t.element_size() for t in (state.absmax, state.code, state.offset) if t is not None)
        return found + (constants(state.state2) if state.nested else 0)

    return sum(constants(p.quant_state) for p in model.parameters() if getattr(p, "quant_state", None) is not None)


def nf4_layer_bytes(numel: int, double_quant: bool = True) -> int:
    """Bytes of one NF4 matrix of ``numel`` values as bitsandbytes stores it: two values per byte and one absmax per
    block of 64 (fp32; with double quantisation a uint8, plus an fp32 per 256 blocks, an fp32 offset and a 256-entry
    fp32 code table), plus NF4's 16-entry fp32 code table."""
    blocks = math.ceil(numel / NF4_BLOCKSIZE)
    scales = blocks + math.ceil(blocks / NESTED_BLOCKSIZE) * 4 + 4 + 256 * 4 if double_quant else blocks * 4
    return math.ceil(numel / 2) + scales + 16 * 4


def weight_bytes(model, bits: int, *, unquantized_bits: int = 16, double_quant: bool = True) -> int:
    """Bytes of ``model``'s parameters in ``bits`` (32, 16 or 4, read from shapes: works on the meta device).

    4: bitsandbytes' NF4 for every ``nn.Linear`` but the output head; embeddings, norms and ``lm_head`` keep
    ``unquantized_bits`` (the compute dtype's width).
    """
    total = sum(p.numel() for p in model.parameters())
    if bits in (32, 16):
        return total * bits // 8
    if bits != 4:
        raise ValueError(f"bits must be 32, 16 or 4, not {bits}")
    head = model.get_output_embeddings()
    linear = [m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    return (total - sum(linear)) * unquantized_bits // 8 + sum(nf4_layer_bytes(n, double_quant) for n in linear)


def activation_bytes(config, sequences: int, seq_len: int, *, checkpointing: bool, bytes_per_value: int) -> int:
    """An estimate of what the decoder layers keep for the backward pass, in bytes (padded to ``seq_len``).

    Per token, a layer keeps about 7 tensors of width ``hidden`` (norms, q, rotated q, attention output), 3 of the
    key/value width and 4 of ``intermediate`` (gate, up, SiLU(gate), their product); SDPA keeps no seq_len-squared
    scores. Checkpointed, only each layer's input is kept and one layer at a time is recomputed.
    """
    tokens, hidden, layers = sequences * seq_len, config.hidden_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (getattr(config, "head_dim", None) or hidden // config.num_attention_heads)
    per_layer = tokens * (7 * hidden + 3 * kv + 4 * config.intermediate_size) * bytes_per_value
    return layers * tokens * hidden * bytes_per_value + per_layer if checkpointing else layers * per_layer


def head_saved_bytes(config, tokens: int, bytes_per_value: int) -> int:
    """What TRL 1.16's fused LM head keeps for backward: the scored tokens' hidden states and 18 bytes each."""
    return tokens * (config.hidden_size * bytes_per_value + TRL_PER_TOKEN_BYTES)


def head_peak_bytes(config, tokens: int, bytes_per_value: int) -> int:
    """An estimate of the fused head's peak, its backward pass: what it saved, one tile buffer (allocated 32,768
    wide whatever the vocabulary) and the hidden states' gradient, accumulated in fp32 then cast back."""
    tile = min(tokens, TRL_TOKEN_TILE) * TRL_VOCAB_TILE * bytes_per_value
    gradient = tokens * config.hidden_size * (4 + bytes_per_value)
    return head_saved_bytes(config, tokens, bytes_per_value) + tile + gradient


class MemoryRow(NamedTuple):
    """One line of the memory table: what, how many bytes, how it was counted, and whether training holds it."""

    item: str
    bytes: int
    note: str
    in_training: bool = False


def lora_parameters(model, lora: dict[str, Any]) -> int:
    """The trainable parameters ``LoraConfig(**lora)`` adds to ``model``: ``r x (in + out)`` for each targeted linear
    layer (tests/test_loading.py checks it against PEFT's own count)."""
    return sum(lora["r"] * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in lora["target_modules"])


def memory_table(model, profile: Profile, *, precision: str = "bf16") -> list[MemoryRow]:
    """The recipe's memory on ``model`` (a meta-device model will do) with ``profile``'s adapter, batch and lengths,
    trained in ``precision`` ("bf16": an A100; "fp16": a T4; "fp32"); estimates say so.

    The adapter trains in bf16 under bf16 (TRL casts a 4-bit model's adapter to bf16,
    ``helpers.training.prepare_trainer`` keeps it), else in fp32; ``paged_adamw_32bit`` keeps two fp32 moments
    whatever the parameter's dtype.
    """
    if precision not in ("bf16", "fp16", "fp32"):
        raise ValueError(f"precision must be bf16, fp16 or fp32, not {precision!r}")
    config, dpo = model.config, profile.dpo
    params, lora = sum(p.numel() for p in model.parameters()), lora_parameters(model, profile.lora)
    value = 4 if precision == "fp32" else 2
    adapter, name = (2, "bf16") if precision == "bf16" else (4, "fp32")
    moments = 8 if dpo["optim"].endswith("32bit") or adapter == 4 else 2 * adapter
    sequences = 2 * dpo["per_device_train_batch_size"]  # chosen and rejected run as one batch
    tokens = sequences * dpo["max_length"]
    checkpointed = dpo["gradient_checkpointing"]
    activations = activation_bytes(config, sequences, dpo["max_length"], checkpointing=checkpointed,
                                   bytes_per_value=value)
    head = head_peak_bytes(config, tokens, value)
    double = (profile.bnb or {}).get("bnb_4bit_use_double_quant", True)
    rows = [
        MemoryRow("weights fp32", weight_bytes(model, 32), f"{params:,} parameters x 4 bytes"),
        MemoryRow("weights bf16", weight_bytes(model, 16), "x 2 bytes: how the model is published"),
        MemoryRow("weights 4-bit NF4", weight_bytes(model, 4, unquantized_bits=8 * value, double_quant=double),
                  "NF4 linear layers + " + "double-quantised " * double + f"scales; the rest {8 * value}-bit", True),
        MemoryRow("LoRA adapter", lora * adapter, f"{lora:,} trainable parameters in {name}", True),
        MemoryRow("LoRA gradients", lora * adapter, f"one {name} gradient per parameter", True),
        MemoryRow("AdamW states", lora * moments, f"2 moments x {moments // 2} bytes, updated in place", True),
        MemoryRow("activations (estimate)", activations, f"{sequences} sequences (batch x chosen+rejected) x "
                  f"{dpo['max_length']} tokens, " + ("checkpointed" if checkpointed else "not checkpointed"), True),
        MemoryRow("LM head, fused (estimate)", head, f"TRL's chunked log-probs: a {TRL_TOKEN_TILE:,} x "
                  f"{TRL_VOCAB_TILE:,} tile + {tokens:,} hidden states and their gradient; no logits", True),
    ]
    total = sum(r.bytes for r in rows if r.in_training)
    return rows + [
        MemoryRow("QLoRA training total (estimate)", total, "the rows above marked as held in training"),
        MemoryRow("full logits, for contrast", tokens * config.vocab_size * (value + 4),
                  f"{tokens:,} tokens x {config.vocab_size:,} vocabulary, 16-bit + fp32: TRL 1.16 never holds them"),
        MemoryRow("full fine-tuning, for contrast (estimate)", params * 16 + activations + head,
                  "16 B/param (bf16 weights and grads, fp32 master, AdamW) + activations + head"),
    ]


def format_memory_table(rows: list[MemoryRow]) -> str:
    """The table as fixed-width text: item, GiB, how it was counted."""
    width = max(len(r.item) for r in rows)
    return "\n".join([f"{'':{width}}  {'GiB':>7}  how"] + [f"{r.item:{width}}  {r.bytes / GIB:7.2f}  {r.note}"
                                                         for r in rows])


def plot_memory_table(rows: list[MemoryRow], path: str | Path | None = None, *, title: str = "") -> Figure:
    """Horizontal bars of the table in GiB (log scale), each labelled with the table's own rounding; the legend
    sits below the axes, where it can cover no bar and no label."""
    colours = {True: "#dd8452", False: "#4c72b0"}
    fig = Figure(figsize=(8.5, 0.4 * len(rows) + 2.0))
    ax = fig.subplots()
    shown = rows[::-1]  # the first row on top
    bars = ax.barh([r.item for r in shown], [r.bytes / GIB for r in shown],
                   color=[colours[r.in_training] for r in shown])
    for bar, row in zip(bars, shown):
        ax.text(bar.get_width() * 1.05, bar.get_y() + bar.get_height() / 2, f"{row.bytes / GIB:.2f}", va="center",
                fontsize=8)
    ax.set_xscale("log")
    ax.set_xlim(right=max(r.bytes for r in rows) / GIB * 4)  # room for the longest bar's label
    ax.set_xlabel("GiB (2**30 bytes), log scale")
    ax.legend(handles=[Patch(color=colours[True], label="held during QLoRA training (summed in the total)"),
                       Patch(color=colours[False], label="the total, and alternatives for contrast")],
              loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, fontsize=8, frameon=False)
    ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, path)
    return fig
