"""helpers.dpo_from_scratch (notebook 07) against TRL's own DPOTrainer and against the paper's formulas.

Notebook 07 checks the learner's hand-written DPO against ``trl_batch_metrics`` (what TRL's ``compute_loss`` records
for a batch). These tests prove that those numbers are the ones a hand-written DPO must reproduce: a small reference
implementation written here from the paper (plain logits, the shift by one, the answer mask, the adapter switched
off) must agree with them within float rounding, for the sigmoid loss and for the losses the exercises swap in.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import dpo_from_scratch as ds

PAIRS = 4
TOLERANCE = 1e-5  # fp32 on a CPU: two routes to the same sums differ by float rounding, about 1e-6 relative


def answer_logps(model, batch, *, adapter: bool = True, per_token: bool = False) -> torch.Tensor:
    """Log-probs of the answers of a TRL batch ([2B], or [2B, T-1] per token), adapter on or off."""
    with torch.no_grad():
        if adapter:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        else:
            with model.disable_adapter():
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    token = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    token = token * batch["completion_mask"][:, 1:]
    return token if per_token else token.sum(-1)


@pytest.fixture(scope="module")
def trainer_and_batch(profile, tokenizer, tmp_path_factory):
    """TRL's DPOTrainer (sigmoid only, the profile's LoRA) on real course pairs, its adapter moved off zero."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from helpers.chatml import format_dataset
    from helpers.data import load_preference_data, pairs_only
    from helpers.notebook import quiet_libraries

    quiet_libraries()
    rows = format_dataset(load_preference_data(profile)["train"].select(range(2 * PAIRS)), tokenizer)
    sigmoid = profile.with_changes("dpo", loss_type=["sigmoid"], loss_weights=None, precompute_ref_log_probs=False)
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(profile.model_id, dtype="float32"),
        ref_model=None,
        args=DPOConfig(output_dir=str(tmp_path_factory.mktemp("dpo")), **sigmoid.dpo),
        train_dataset=pairs_only(rows),
        processing_class=tokenizer,
        peft_config=LoraConfig(**profile.lora),
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a seeded random B: the policy differs from the reference (adapter off)
        for name, parameter in trainer.model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(PAIRS)])
    return trainer, batch, trainer.beta


def test_trl_metrics_are_a_hand_written_dpo(trainer_and_batch):
    trainer, batch, beta = trainer_and_batch
    policy_chosen, policy_rejected = answer_logps(trainer.model, batch).chunk(2)
    ref_chosen, ref_rejected = answer_logps(trainer.model, batch, adapter=False).chunk(2)
    chosen, rejected = beta * (policy_chosen - ref_chosen), beta * (policy_rejected - ref_rejected)
    mine = {
        "loss": -F.logsigmoid(chosen - rejected).mean().item(),
        "rewards/chosen": chosen.mean().item(),
        "rewards/rejected": rejected.mean().item(),
        "rewards/margins": (chosen - rejected).mean().item(),
        "rewards/accuracies": (chosen > rejected).double().mean().item(),
        "logps/chosen": policy_chosen.mean().item(),
        "logps/rejected": policy_rejected.mean().item(),
    }
    assert abs(mine["rewards/margins"]) > 1e-3, "the rewards should not be zero: is the adapter still at B = 0?"
    theirs = ds.trl_batch_metrics(trainer, batch)  # TRL's own DPOTrainer.compute_loss, fused LM head
    assert set(theirs) == {"loss", *ds.TRL_METRICS}
    scale = max(1.0, abs(mine["logps/chosen"]), abs(mine["logps/rejected"]))
    for name, value in mine.items():
        assert theirs[name] == pytest.approx(value, rel=TOLERANCE, abs=TOLERANCE * scale), name


def test_a_swapped_loss_is_trls_formula_and_is_swapped_back(trainer_and_batch):
    """What the exercises check against: TRL's hinge, IPO and sigmoid + SFT losses on the same batch."""
    trainer, batch, beta = trainer_and_batch
    metrics_before = {k: list(v) for k, v in trainer._metrics["eval"].items()}
    losses_before, weights_before = trainer.loss_types, trainer.loss_weights
    policy_chosen, policy_rejected = answer_logps(trainer.model, batch).chunk(2)
    ref_chosen, ref_rejected = answer_logps(trainer.model, batch, adapter=False).chunk(2)
    delta = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    lengths_chosen, lengths_rejected = batch["completion_mask"].sum(1).chunk(2)
    per_token = (policy_chosen - ref_chosen) / lengths_chosen - (policy_rejected - ref_rejected) / lengths_rejected
    chosen_tokens = answer_logps(trainer.model, batch, per_token=True)[:PAIRS]
    nll = -chosen_tokens.sum() / batch["completion_mask"][:PAIRS, 1:].sum()  # one mean over all chosen answer tokens
    expected = {
        ("hinge",): torch.relu(1 - beta * delta).mean().item(),
        ("ipo",): ((per_token - 1 / (2 * beta)) ** 2).mean().item(),
        ("sigmoid", "sft"): (-F.logsigmoid(beta * delta).mean() + nll).item(),
    }
    sigmoid = ds.trl_batch_metrics(trainer, batch)
    for loss_type, value in expected.items():
        found = ds.trl_batch_metrics(trainer, batch, loss_type=list(loss_type))
        assert found["loss"] == pytest.approx(value, rel=TOLERANCE, abs=TOLERANCE), loss_type
        assert found["loss"] != pytest.approx(sigmoid["loss"], rel=1e-3), f"{loss_type} was not swapped in"
        assert found["rewards/margins"] == pytest.approx(sigmoid["rewards/margins"]), "the rewards do not change"
    assert {k: list(v) for k, v in trainer._metrics["eval"].items()} == metrics_before, "TRL's log was disturbed"
    assert (trainer.loss_types, trainer.loss_weights) == (losses_before, weights_before)


def test_a_metric_trl_no_longer_records_is_an_error(trainer_and_batch, monkeypatch):
    trainer, batch, _ = trainer_and_batch
    compute = trainer.compute_loss

    def forgetful(*args, **kwargs):  # a TRL that computes the loss but logs no reward margins
        loss = compute(*args, **kwargs)
        trainer._metrics["eval"]["rewards/margins"].pop()
        return loss

    monkeypatch.setattr(trainer, "compute_loss", forgetful)
    with pytest.raises(RuntimeError, match="rewards/margins"):
        ds.trl_batch_metrics(trainer, batch)


def test_plot_gradient_weight_draws_what_autograd_says(tmp_path):
    fig = ds.plot_gradient_weight([-1.0, 0.2, 2.5], 0.1, tmp_path / "plots" / "w.png")
    assert (tmp_path / "plots" / "w.png").stat().st_size > 1000
    line = fig.axes[0].lines[0]
    margin = torch.tensor(line.get_xdata(), dtype=torch.float64, requires_grad=True)  # z = beta * delta
    (-F.logsigmoid(margin)).sum().backward()  # each pair's loss as a function of its margin
    assert torch.allclose(torch.tensor(line.get_ydata(), dtype=torch.float64), -margin.grad, atol=1e-6)
    dots = fig.axes[0].collections[0].get_offsets()
    expected = [1 / (1 + math.exp(m)) for m in (-1.0, 0.2, 2.5)]
    assert [float(y) for y in dots[:, 1]] == pytest.approx(expected, abs=1e-6)
