"""What every notebook needs around ``from_pretrained``: the tokenizer checked, 4-bit weights kept trainable on a
CPU, and logits compared. The ``from_pretrained`` calls themselves stand in the notebooks' cells."""

from __future__ import annotations

from collections.abc import Sequence

import bitsandbytes as bnb
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from helpers.profiles import Profile


def check_tokenizer(tokenizer, source: str = "tokenizer") -> None:
    """Refuse a tokenizer the recipe cannot train with: no chat template, or pad == eos."""
    if not tokenizer.chat_template:
        raise ValueError(f"{source} has no chat template; the recipe needs a ChatML chat model's tokenizer")
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise ValueError(
            f"{source}: pad token {tokenizer.pad_token!r} is the eos token. DPO itself would cope (TRL's preference "
            "collator masks by length), but an SFT collator masks every pad position out of the labels, the "
            "end-of-turn token with them, and generation cannot tell padding from a finished answer. "
            "Set a separate pad token first.")


def load_tokenizer(model_id: str):
    """The model's tokenizer, right-padded, with a pad token distinct from eos (checked, notebook 01)."""
    tokenizer = AutoTokenizer.from_pretrained(model_id)
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        vocab = tokenizer.get_vocab()  # hub chat models sometimes ship pad == eos: an unused special token fixes it
        tokenizer.pad_token = next(t for t in ("<|endoftext|>", "<unk>", "<pad>")
                                   if t in vocab and vocab[t] != tokenizer.eos_token_id)
    tokenizer.padding_side = "right"
    check_tokenizer(tokenizer, model_id.rsplit("/", 2)[-1] if "/" in model_id else model_id)
    return tokenizer


def device_map() -> dict[str, int] | None:
    """``from_pretrained(device_map=...)``: the whole model on this process's GPU, or None (the CPU)."""
    return {"": torch.cuda.current_device()} if torch.cuda.is_available() else None


def load_base_model(profile: Profile, *, four_bit: bool | None = None):
    """The profile's base model as notebooks 02 and 04 load it in their cells: in 4-bit NF4 when the profile trains
    in 4-bit (``four_bit``: force either way; a merge needs the unquantised weights), in ``profile.dtype``."""
    four_bit = bool(profile.bnb) if four_bit is None else four_bit
    settings = profile.bnb or {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                               "bnb_4bit_compute_dtype": profile.dtype}
    model = AutoModelForCausalLM.from_pretrained(
        profile.model_id,
        quantization_config=BitsAndBytesConfig(**settings) if four_bit else None,
        dtype=profile.dtype,
        device_map=device_map(),
    )
    keep_nf4_trainable(model)
    return model


def keep_nf4_trainable(model) -> int:
    """On a CPU, stop bitsandbytes from repacking ``model``'s 4-bit weights; returns how many layers it guarded.

    bitsandbytes 0.50 on a CPU with AVX512-BF16 repacks a ``Linear4bit`` weight, for good, the first time the layer
    runs in eval mode on an input that needs no gradient, and from then on uses an inference kernel with no backward:
    a later training step silently gets no gradient through the frozen base weights. A model fresh from
    ``from_pretrained`` is in eval mode, so one evaluation before training is enough. The guard is bitsandbytes' own
    switch, ``Linear4bit.support_avx512bf16_for_cpu``. On a GPU nothing is repacked and nothing changes.
    """
    if torch.cuda.is_available():
        return 0
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameters; a 4-bit weight counts the values it holds (two per stored byte)."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel() * (2 if param.__class__.__name__ == "Params4bit" else 1)
        total += n
        trainable += n if param.requires_grad else 0
    return trainable, total


@torch.no_grad()
def logits_of(model, inputs: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
    """The logits ``model`` (in eval mode) gives ``inputs`` (``input_ids`` or a tokenizer's dict), fp32 on the CPU."""
    model.eval()
    device = next(model.parameters()).device
    batch = {"input_ids": inputs} if isinstance(inputs, torch.Tensor) else dict(inputs)
    return model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()


def largest_difference(a: torch.Tensor | Sequence[torch.Tensor], b: torch.Tensor | Sequence[torch.Tensor]) -> float:
    """The largest absolute difference between two tensors (or two equally long lists of tensors)."""
    pairs = [(a, b)] if isinstance(a, torch.Tensor) else list(zip(a, b, strict=True))
    return max((x.float() - y.float()).abs().max().item() for x, y in pairs)
