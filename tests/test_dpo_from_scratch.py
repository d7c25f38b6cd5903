"""Notebook 07's plumbing (helpers.dpo_from_scratch) against TRL's own DPOTrainer.

Notebook 07 writes the DPO loss in its own cells and checks it there, cell by cell, against
``trl_batch_metrics`` (TRL's ``DPOTrainer.compute_loss`` on the same batch); nbval runs those self-checks in CI.
These tests prove the plumbing those checks rely on: that a batch from ``preference_batch`` and the numbers
``trl_batch_metrics`` reads back are the ones a hand-written DPO must reproduce. For that they carry their own small
reference implementation (plain logits, the shift by one, the answer mask, the adapter switched off), written
from the paper and TRL's loss formulas, not imported from anywhere in the course.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import dpo_from_scratch as ds

PAIRS = 4


# --- a reference implementation, for these tests only -----------------------------------------------------------


def answer_logps(model, batch, *, adapter: bool = True, per_token: bool = False):
    """Log-probs of the answers of a TRL batch ([2B], or [2B, T-1] per token), adapter on or off."""
    with torch.no_grad():
        if adapter:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        else:
            with model.disable_adapter():
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    token = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    token = token * batch["completion_mask"][:, 1:]
    return token if per_token else token.sum(-1)


def reference_metrics(model, batch, beta: float) -> dict[str, float]:
    policy_chosen, policy_rejected = answer_logps(model, batch).chunk(2)
    ref_chosen, ref_rejected = answer_logps(model, batch, adapter=False).chunk(2)
    chosen, rejected = beta * (policy_chosen - ref_chosen), beta * (policy_rejected - ref_rejected)
    return {
        "loss": -F.logsigmoid(chosen - rejected).mean().item(),
        "rewards/chosen": chosen.mean().item(),
        "rewards/rejected": rejected.mean().item(),
        "rewards/margins": (chosen - rejected).mean().item(),
        "rewards/accuracies": (chosen > rejected).float().mean().item(),
        "logps/chosen": policy_chosen.mean().item(),
        "logps/rejected": policy_rejected.mean().item(),
    }


# --- the plumbing --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trainer_and_batch(tiny_model_path, tmp_path_factory):
    """TRL's DPOTrainer (sigmoid only, the profile's LoRA) on real course pairs, its adapter moved off zero."""
    from helpers.chatml import format_dataset
    from helpers.data import load_preference_data
    from helpers.loading import load_model, load_tokenizer
    from helpers.notebook import quiet_libraries
    from helpers.profiles import get_profile

    quiet_libraries()
    profile = get_profile("tiny")
    tokenizer = load_tokenizer(profile, str(tiny_model_path))
    model = load_model(profile, source=str(tiny_model_path))
    rows = format_dataset(load_preference_data(profile)["train"].select(range(2 * PAIRS)), tokenizer)
    torch.manual_seed(0)  # PEFT draws the A matrices from the global generator
    trainer = ds.sigmoid_trainer(profile, model, tokenizer, rows, tmp_path_factory.mktemp("dpo"), steps=0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a seeded random B: the policy differs from the reference (adapter off)
        for name, parameter in trainer.model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    return trainer, ds.preference_batch(trainer, range(PAIRS)), profile.dpo.beta


def test_the_trainer_runs_trls_per_step_reference_pass(trainer_and_batch):
    trainer, _, _ = trainer_and_batch
    assert not trainer.precompute_ref_logps, "the scratch code's reference pass is compared with TRL's own"
    assert trainer.loss_types == ["sigmoid"] and trainer.ref_model is None


def test_batch_is_trls_layout(trainer_and_batch):
    _, batch, _ = trainer_and_batch
    assert set(batch) == {"input_ids", "attention_mask", "completion_mask"}
    assert batch["input_ids"].shape[0] == 2 * PAIRS
    assert (batch["completion_mask"] <= batch["attention_mask"]).all(), "answer tokens are never padding"
    assert (batch["completion_mask"][:, 0] == 0).all(), "every sequence starts with prompt tokens"


def test_a_hand_written_dpo_equals_trls_compute_loss(trainer_and_batch):
    trainer, batch, beta = trainer_and_batch
    mine = reference_metrics(trainer.model, batch, beta)
    assert abs(mine["rewards/margins"]) > 1e-3, "the rewards should not be zero: is the adapter still at B = 0?"
    theirs = ds.trl_batch_metrics(trainer, batch)  # TRL's own DPOTrainer.compute_loss, fused LM head
    for name in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert abs(mine[name] - theirs[name]) <= 1e-5, f"{name}: by hand {mine[name]}, TRL {theirs[name]}"
    for name in ("logps/chosen", "logps/rejected"):  # sums over answer tokens: float32 rounding grows with length
        assert mine[name] == pytest.approx(theirs[name], rel=1e-5, abs=1e-5), name
    rows = ds.compare_metrics({**mine, "not_in_trl": 1.0}, theirs)
    assert [r[0] for r in rows] == list(mine) and all(r[3] == abs(r[1] - r[2]) for r in rows)


def test_trl_metrics_swap_the_loss_for_one_call_only(trainer_and_batch):
    """What the exercises check against: TRL's hinge, IPO and sigmoid + SFT losses on the same batch."""
    trainer, batch, beta = trainer_and_batch
    before = {k: list(v) for k, v in trainer._metrics["eval"].items()}
    losses_before = trainer.loss_types
    policy_chosen, policy_rejected = answer_logps(trainer.model, batch).chunk(2)
    ref_chosen, ref_rejected = answer_logps(trainer.model, batch, adapter=False).chunk(2)
    delta = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    lengths_chosen, lengths_rejected = batch["completion_mask"].sum(1).chunk(2)
    per_token = (policy_chosen - ref_chosen) / lengths_chosen - (policy_rejected - ref_rejected) / lengths_rejected
    chosen_tokens = answer_logps(trainer.model, batch, per_token=True)[:PAIRS]
    nll = -chosen_tokens.sum() / batch["completion_mask"][:PAIRS, 1:].sum()  # mean over all chosen answer tokens
    expected = {
        ("hinge",): torch.relu(1 - beta * delta).mean().item(),
        ("ipo",): ((per_token - 1 / (2 * beta)) ** 2).mean().item(),
        ("sigmoid", "sft"): (-F.logsigmoid(beta * delta).mean() + nll).item(),
    }
    sigmoid = ds.trl_batch_metrics(trainer, batch)
    for loss_type, value in expected.items():
        found = ds.trl_batch_metrics(trainer, batch, loss_type=list(loss_type))
        assert found["loss"] == pytest.approx(value, rel=1e-5, abs=1e-6), loss_type
        assert found["rewards/margins"] == pytest.approx(sigmoid["rewards/margins"]), "the rewards do not change"
    assert dict(trainer._metrics["eval"]) == before and trainer.loss_types is losses_before


def test_plot_gradient_weight_draws_what_autograd_says(tmp_path):
    fig = ds.plot_gradient_weight([-1.0, 0.2, 2.5], 0.1, tmp_path / "plots" / "w.png")
    assert (tmp_path / "plots" / "w.png").stat().st_size > 1000
    assert len(fig.axes) == 1
    line = fig.axes[0].lines[0]
    margin = torch.tensor(line.get_xdata(), dtype=torch.float64, requires_grad=True)  # z = beta * delta
    (-F.logsigmoid(margin)).sum().backward()  # each pair's loss as a function of its margin
    assert torch.allclose(torch.tensor(line.get_ydata(), dtype=torch.float64), -margin.grad, atol=1e-6)
    dots = fig.axes[0].collections[0].get_offsets()
    assert [round(float(y), 4) for y in dots[:, 1]] == [round(1 / (1 + math.exp(m)), 4) for m in (-1.0, 0.2, 2.5)]
