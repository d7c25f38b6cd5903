"""How much memory the recipe needs: weights in each precision, the LoRA adapter, its optimiser and activations.

Everything here is counted from a real model structure built on PyTorch's ``meta`` device: the modules and
parameter shapes exist, their storage does not, so Mistral-7B's 7.2 billion parameters can be counted on a
laptop without a download. Bytes are exact for the weights (including the NF4 quantisation constants) and a
documented estimate for activations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from helpers.profiles import Profile

GIB = 2**30
MISTRAL_7B_VOCAB = 32000  # Mistral-7B-v0.1's tokenizer
OPENHERMES_VOCAB = 32002  # OpenHermes-2.5 adds <|im_start|> and <|im_end|>
MISTRAL_7B_SHAPE = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
}
NF4_BLOCKSIZE = 64  # bitsandbytes: one scale (absmax) per 64 weights
NESTED_BLOCKSIZE = 256  # double quantisation: the absmax values are themselves quantised in blocks of 256
ADAMW_STATE_BYTES = 8  # AdamW keeps two fp32 moments per trainable parameter


def mistral_7b_config(vocab_size: int = OPENHERMES_VOCAB):
    """Mistral-7B's architecture as a ``MistralConfig`` (OpenHermes-2.5's vocabulary of 32,002 by default)."""
    from transformers import MistralConfig

    return MistralConfig(vocab_size=vocab_size, **MISTRAL_7B_SHAPE)


def meta_model(config):
    """A causal LM built from ``config`` on the meta device: real modules and shapes, no weights, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _quantizable(model) -> list[torch.nn.Linear]:
    """The linear layers bitsandbytes quantises: every ``nn.Linear`` except the output head (``lm_head``)."""
    head = model.get_output_embeddings()
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]


def nf4_layer_bytes(numel: int, double_quant: bool = True) -> int:
    """Bytes of one NF4 weight matrix of ``numel`` values, as bitsandbytes stores it.

    Two 4-bit values per byte, plus one absmax scale per block of 64 values: an fp32 (4 bytes) without
    double quantisation; with it, a uint8 per block plus an fp32 per 256 blocks, an fp32 offset and the
    two lookup tables (16 and 256 fp32 values).
    """
    blocks = math.ceil(numel / NF4_BLOCKSIZE)
    code = 16 * 4
    if not double_quant:
        return math.ceil(numel / 2) + blocks * 4 + code
    return math.ceil(numel / 2) + blocks + math.ceil(blocks / NESTED_BLOCKSIZE) * 4 + 4 + 256 * 4 + code


def weight_bytes(model, bits: int, *, unquantized_bits: int = 16, double_quant: bool = True) -> int:
    """Bytes the weights of ``model`` take when stored in ``bits`` (32, 16, 8 or 4).

    32/16: every parameter in that width. 8 (LLM.int8) and 4 (NF4): the linear layers of the decoder in
    that width, with their scales; embeddings, norms and ``lm_head`` stay in ``unquantized_bits`` (16: the
    bf16/fp16 compute dtype on a GPU). Works on meta-device models: only shapes are read.
    """
    total = sum(p.numel() for p in model.parameters())
    if bits in (32, 16):
        return total * bits // 8
    if bits not in (8, 4):
        raise ValueError(f"bits must be 32, 16, 8 or 4, not {bits}")
    layers = _quantizable(model)
    quantized = sum(m.weight.numel() for m in layers)
    rest = (total - quantized) * unquantized_bits // 8
    if bits == 8:  # int8 weights plus one fp32 scale per output row
        return rest + quantized + sum(m.out_features * 4 for m in layers)
    return rest + sum(nf4_layer_bytes(m.weight.numel(), double_quant) for m in layers)


def quant_state_bytes(model) -> int:
    """Bytes of the NF4 quantisation constants of a really 4-bit-loaded model.

    They live in each weight's ``quant_state``, outside parameters and buffers, so
    ``model.get_memory_footprint()`` leaves them out; this adds them back.
    """

    def _tensors(state) -> int:
        found = sum(t.numel() * t.element_size() for t in (state.absmax, state.code) if t is not None)
        if getattr(state, "offset", None) is not None:
            found += state.offset.numel() * state.offset.element_size()
        if getattr(state, "state2", None) is not None:
            found += _tensors(state.state2)
        return found

    return sum(
        _tensors(p.quant_state) for p in model.parameters() if getattr(p, "quant_state", None) is not None
    )


def activation_bytes(config, sequences: int, seq_len: int, *, checkpointing: bool = True, bytes_per_value: int = 2):
    """A rough estimate of the activation memory of one training forward + backward pass.

    ``sequences`` x ``seq_len`` tokens (every sequence padded to ``seq_len``: the worst case). One decoder
    layer keeps, per token, about 7 tensors of width ``hidden`` (norm inputs/outputs, q, rotated q, attention
    output), 3 of the key/value width and 4 of ``intermediate`` (gate, up, SiLU(gate), their product) for its
    backward pass; attention by SDPA/flash keeps no ``seq_len``-squared scores. With gradient checkpointing
    only each layer's input is kept and one layer at a time is recomputed. The logits add a 16-bit copy and
    an fp32 one for the loss. Not counted: the CUDA context, allocator slack, temporary buffers.
    """
    tokens = sequences * seq_len
    hidden, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    per_layer = tokens * (7 * hidden + 3 * kv + 4 * inter) * bytes_per_value
    logits = tokens * config.vocab_size * (bytes_per_value + 4)
    if checkpointing:
        return layers * tokens * hidden * bytes_per_value + per_layer + logits
    return layers * per_layer + logits


@dataclass(frozen=True)
class MemoryRow:
    """One line of the memory table: what, how many bytes, and how it was counted."""

    item: str
    bytes: int
    note: str
    part_of_recipe: bool = False  # counted in the recipe's training total

    @property
    def gib(self) -> float:
        """The size in GiB (2**30 bytes)."""
        return self.bytes / GIB


def lora_trainable_parameters(config, profile: Profile) -> int:
    """Trainable parameters of the profile's LoRA adapter on a model of ``config``: PEFT's own wrapping of a
    meta-device model, counted, not computed from a formula."""
    from peft import get_peft_model

    from helpers.lora import count_parameters, lora_config

    wrapped = get_peft_model(meta_model(config), lora_config(profile))
    return count_parameters(wrapped)[0]


def memory_table(config, profile: Profile) -> list[MemoryRow]:
    """The memory of the recipe on a model of ``config`` with ``profile``'s LoRA, batch and length.

    Rows: the weights in fp32 / bf16 / 8-bit / 4-bit NF4; then what QLoRA training adds to the 4-bit weights
    (adapter, its gradients, AdamW's two fp32 moments, activations) and their total; last, for contrast,
    full fine-tuning with AdamW in mixed precision. The adapter and its gradients are bf16 when the profile
    loads in 4-bit, because TRL 1.x's trainers cast a quantised model's adapter to bf16; fp32 otherwise
    (PEFT's default). ``paged_adamw_32bit`` keeps its two moments in fp32 whatever the parameter dtype.
    """
    model = meta_model(config)
    params = sum(p.numel() for p in model.parameters())
    lora = lora_trainable_parameters(config, profile)
    t, q = profile.training, profile.quantization
    sequences = 2 * t.per_device_train_batch_size  # TRL runs chosen and rejected as one concatenated batch
    activations = activation_bytes(config, sequences, profile.dpo.max_length, checkpointing=t.gradient_checkpointing)
    # TRL 1.x casts the adapter of a quantised model to bf16 (the QLoRA paper's choice); PEFT's default is fp32.
    adapter_bytes, adapter_dtype = (2, "bf16") if q.load_in_4bit else (4, "fp32")
    rows = [
        MemoryRow("weights fp32", weight_bytes(model, 32), f"{params:,} parameters x 4 bytes"),
        MemoryRow("weights bf16", weight_bytes(model, 16), "x 2 bytes: how the model is published"),
        MemoryRow("weights 8-bit", weight_bytes(model, 8), "LLM.int8 linear layers + row scales; rest bf16"),
        MemoryRow(
            "weights 4-bit NF4",
            weight_bytes(model, 4, double_quant=q.double_quant),
            "NF4 linear layers + " + ("double-quantised " if q.double_quant else "") + "scales; rest bf16",
            part_of_recipe=True,
        ),
        MemoryRow("LoRA adapter", lora * adapter_bytes, f"{lora:,} trainable parameters in {adapter_dtype}", True),
        MemoryRow("LoRA gradients", lora * adapter_bytes, f"one {adapter_dtype} gradient per parameter", True),
        MemoryRow(
            "AdamW states (32-bit)",
            lora * ADAMW_STATE_BYTES,
            "2 fp32 moments x 4 bytes; no master copy, the adapter is updated in place",
            True,
        ),
        MemoryRow(
            "activations (estimate)",
            activations,
            f"{sequences} sequences (batch {t.per_device_train_batch_size} x chosen+rejected) x "
            f"{profile.dpo.max_length} tokens, " + ("checkpointed" if t.gradient_checkpointing else "no checkpointing"),
            True,
        ),
    ]
    total = sum(r.bytes for r in rows if r.part_of_recipe)
    rows.append(MemoryRow("QLoRA training total", total, "4-bit weights + adapter + grads + AdamW + activations"))
    rows.append(
        MemoryRow(
            "full fine-tuning, for contrast",
            params * 16 + activations,
            "bf16 weights + bf16 grads + fp32 master + AdamW (16 B/param) + activations",
        )
    )
    return rows


def format_memory_table(rows: list[MemoryRow]) -> str:
    """The table as fixed-width text: item, GiB, how it was counted."""
    width = max(len(r.item) for r in rows)
    lines = [f"{'':{width}}  {'GiB':>7}  how"]
    lines += [f"{r.item:{width}}  {r.gib:7.2f}  {r.note}" for r in rows]
    return "\n".join(lines)
