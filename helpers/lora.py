"""LoRA set-up: the recipe's adapter config, finding linear layers, and counting what trains."""

from __future__ import annotations

from dataclasses import dataclass

import bitsandbytes as bnb
import torch
from peft import LoraConfig

from helpers.profiles import Profile


def lora_config(profile: Profile):
    """The profile's ``peft.LoraConfig``: r, alpha, dropout, bias, task type and the seven target projections."""
    lora = profile.lora
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        bias=lora.bias,
        task_type=lora.task_type,
        target_modules=list(lora.target_modules),
    )


def linear_layer_names(model) -> list[str]:
    """The distinct short names of the linear layers inside the decoder blocks (the LoRA candidates).

    The output head (``lm_head``) is left out: the recipe adapts the attention and MLP projections only.
    """
    linear_types = (torch.nn.Linear, bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, linear_types)}
    names.discard("lm_head")
    return sorted(names)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights are counted as the values they hold, not bytes."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if hasattr(param, "quant_state") or param.__class__.__name__ == "Params4bit":
            n *= 2  # two 4-bit values are packed in each stored byte
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


def lora_scalings(model) -> dict[str, float]:
    """The scaling ``alpha / r`` each LoRA layer of a PEFT-wrapped model applies to ``B @ A``, by short name."""
    found: dict[str, float] = {}
    for name, module in model.named_modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict) and "default" in scaling:
            found[name.rsplit(".", 1)[-1]] = float(scaling["default"])
    return dict(sorted(found.items()))


def dropout_rates(model) -> dict[float, int]:
    """How many ``torch.nn.Dropout`` modules ``model`` holds at each rate ``p``, e.g. ``{0.05: 28}``.

    PEFT gives every adapted layer an ``nn.Dropout(lora_dropout)`` (an ``nn.Identity`` when the rate is 0), so this
    shows whether the recipe's ``lora_dropout`` is in force; TRL's ``DPOTrainer`` sets every ``p`` to 0 by default.
    """
    rates: dict[float, int] = {}
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            rates[float(module.p)] = rates.get(float(module.p), 0) + 1
    return dict(sorted(rates.items()))


def trainable_dtypes(model) -> list[str]:
    """The dtypes of ``model``'s trainable parameters, by name (``["bfloat16"]``, ``["float32"]``, ...)."""
    return sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.requires_grad})


@dataclass(frozen=True)
class StepReport:
    """What one optimiser step changed in a LoRA-wrapped model."""

    step: int
    loss: float
    grad_norm_lora_A: float  # the gradient norm over all lora_A matrices before the step
    grad_norm_lora_B: float
    changed_lora_A: int  # how many lora_A matrices differ after the step
    changed_lora_B: int
    lora_matrices: int  # how many lora_A (and as many lora_B) matrices there are
    changed_base: int  # how many base-model tensors differ after the step (must be 0)

    def __str__(self) -> str:
        return (
            f"step {self.step}: |grad A| = {self.grad_norm_lora_A:.4f}, |grad B| = {self.grad_norm_lora_B:.4f}; "
            f"changed: {self.changed_lora_A}/{self.lora_matrices} lora_A, {self.changed_lora_B}/{self.lora_matrices} "
            f"lora_B, {self.changed_base} base tensors"
        )


def answer_batch(tokenizer, prompts: list[str], answers: list[str]) -> dict[str, torch.Tensor]:
    """A right-padded batch of prompt + answer with ``labels`` = the answer tokens only (prompt and padding -100)."""
    rows, labels = [], []
    for prompt, answer in zip(prompts, answers):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        rows.append(prompt_ids + answer_ids)
        labels.append([-100] * len(prompt_ids) + answer_ids)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
        "labels": torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels]),
    }


def lora_training_steps(
    model, batch: dict[str, torch.Tensor], steps: int = 2, learning_rate: float = 1e-3
) -> list[StepReport]:
    """Take ``steps`` AdamW steps on the trainable (LoRA) parameters of a PEFT model and report what changed.

    ``batch`` holds ``input_ids``, ``attention_mask`` and ``labels`` (see :func:`answer_batch`). Weight decay
    is 0, as in the Trainer's default, so a parameter with a zero gradient stays exactly where it is.
    """
    params = dict(model.named_parameters())
    trainable = [p for p in params.values() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters; wrap it with peft.get_peft_model first")
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=0.0)
    a_names = [n for n in params if "lora_A" in n]
    b_names = [n for n in params if "lora_B" in n]
    base_names = [n for n in params if "lora_" not in n]

    def _changed(before: dict[str, torch.Tensor], names: list[str]) -> int:
        return sum(not torch.equal(before[n], params[n].detach()) for n in names)

    def _norm(names: list[str]) -> float:
        grads = [params[n].grad for n in names if params[n].grad is not None]
        return torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item() if grads else 0.0

    device = next(iter(trainable)).device
    batch = {key: value.to(device) for key, value in batch.items()}
    model.train()
    reports = []
    for step in range(1, steps + 1):
        before = {n: p.detach().clone() for n, p in params.items()}
        optimizer.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        grad_a, grad_b = _norm(a_names), _norm(b_names)
        optimizer.step()
        a_changed, b_changed, base_changed = (_changed(before, n) for n in (a_names, b_names, base_names))
        reports.append(StepReport(step, loss.item(), grad_a, grad_b, a_changed, b_changed, len(a_names), base_changed))
    model.eval()
    return reports
