"""Notebook 03: finding the layers LoRA adapts, and reading back what a PEFT-wrapped model trains.

``LoraConfig(...)``, ``get_peft_model`` and the ``DPOTrainer(...)`` that wraps a 4-bit model stand in the notebook's
cells; these helpers look at the result: which layers, which dtypes, which dropout, which tensors a step changed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import bitsandbytes as bnb
import torch

from helpers.chatml import tokenize_pair

LORA_PARTS = ("lora_A", "lora_B")


def linear_layer_names(model) -> list[str]:
    """The distinct short names of the model's linear layers (full precision, 8- or 4-bit), ``lm_head`` left out:
    the candidates for ``LoraConfig(target_modules=...)``."""
    kinds = (torch.nn.Linear, bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, kinds)}
    return sorted(names - {"lm_head"})


def trainable_by_target(model) -> dict[str, int]:
    """Trainable parameters of a PEFT-wrapped model by adapted layer name (``q_proj``, ...), largest first."""
    counts: Counter[str] = Counter()
    for name, param in model.named_parameters():
        if param.requires_grad:  # ...layers.0.self_attn.q_proj.lora_A.default.weight
            counts[name.split(".")[-4]] += param.numel()
    return dict(counts.most_common())


def dropout_rates(model) -> dict[float, int]:
    """How many ``nn.Dropout`` modules ``model`` holds at each rate, e.g. ``{0.05: 28}``: PEFT gives each adapted layer
    one at ``lora_dropout`` (an ``nn.Identity`` at 0), and TRL's trainers set every rate to 0 by default."""
    return dict(sorted(Counter(float(m.p) for m in model.modules() if isinstance(m, torch.nn.Dropout)).items()))


def trainable_dtypes(model) -> list[str]:
    """The dtypes of ``model``'s trainable parameters (``["bfloat16"]``, ``["float32"]``, ...)."""
    return sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.requires_grad})


def answer_batch(tokenizer, prompts: Sequence[str], answers: Sequence[str]) -> dict[str, torch.Tensor]:
    """A right-padded batch of prompt + answer, tokenised as TRL does (:func:`helpers.chatml.tokenize_pair`), with
    ``labels`` = the answer tokens only (prompt and padding -100): a language-modelling loss on the answers."""
    pairs = [tokenize_pair(tokenizer, prompt, answer) for prompt, answer in zip(prompts, answers, strict=True)]
    width = max(len(p) + len(a) for p, a in pairs)

    def padded(rows: list[list[int]], value: int) -> torch.Tensor:
        return torch.tensor([row + [value] * (width - len(row)) for row in rows])

    return {"input_ids": padded([p + a for p, a in pairs], tokenizer.pad_token_id),
            "attention_mask": padded([[1] * (len(p) + len(a)) for p, a in pairs], 0),
            "labels": padded([[-100] * len(p) + a for p, a in pairs], -100)}


def part_of(name: str) -> str:
    """``lora_A``, ``lora_B`` or ``base``: which part of a PEFT-wrapped model a parameter name belongs to."""
    return next((part for part in LORA_PARTS if f".{part}." in name), "base")


def gradient_norms(model) -> dict[str, float]:
    """The gradient norm over all ``lora_A`` and over all ``lora_B`` matrices (0.0 where none reached them)."""
    grads: dict[str, list[torch.Tensor]] = {part: [] for part in LORA_PARTS}
    for name, param in model.named_parameters():
        if param.grad is not None and part_of(name) in grads:
            grads[part_of(name)].append(param.grad.float().norm())
    return {part: torch.stack(g).norm().item() if g else 0.0 for part, g in grads.items()}


def changed_tensors(model, before: dict[str, torch.Tensor]) -> dict[str, int]:
    """How many tensors of each part (``lora_A``, ``lora_B``, ``base``) differ from ``before`` (name -> a copy)."""
    changed = Counter({part: 0 for part in (*LORA_PARTS, "base")})
    for name, param in model.named_parameters():
        changed[part_of(name)] += not torch.equal(param.detach(), before[name])
    return dict(changed)
