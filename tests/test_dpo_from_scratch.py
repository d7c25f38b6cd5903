"""DPO from scratch (helpers.dpo_from_scratch) against hand-computed values and against TRL's own DPOTrainer."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import dpo_from_scratch as ds

BETA = 0.1
PAIRS = 4


def test_sequence_logps_counts_answer_tokens_only():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)  # [N, T, V]
    input_ids = torch.tensor([[1, 2, 3, 4, 0], [5, 6, 1, 0, 0]])
    completion = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 0, 0]])  # prompt 0, answer 1, padding 0
    logp = torch.log_softmax(logits, dim=-1)
    expected = torch.stack([logp[0, 1, 3] + logp[0, 2, 4], logp[1, 0, 6] + logp[1, 1, 1]])
    assert torch.allclose(ds.sequence_logps(logits, input_ids, completion), expected)
    # what the model says at prompt and padding positions does not count
    noisy = logits.clone()
    noisy[0, 0], noisy[0, 3:], noisy[1, 2:] = 100.0, -50.0, 3.0
    assert torch.allclose(ds.sequence_logps(noisy, input_ids, completion)[0], expected[0])
    with pytest.raises(ValueError, match="shapes do not match"):
        ds.sequence_logps(logits, input_ids[:, :4], completion)


def test_dpo_loss_by_hand():
    same = torch.tensor([-3.0, -7.0])
    start = ds.dpo_loss(same, same - 1, same, same - 1, BETA)
    assert start.loss.item() == pytest.approx(math.log(2)), "policy == reference: every pair's loss is ln 2"
    assert start.margins.abs().max().item() == 0.0

    out = ds.dpo_loss(torch.tensor([-2.0]), torch.tensor([-9.0]), torch.tensor([-4.0]), torch.tensor([-8.0]), BETA)
    # log-ratios: chosen +2, rejected -1 -> rewards 0.2 and -0.1, margin 0.3, loss -log sigmoid(0.3)
    assert out.chosen_rewards.item() == pytest.approx(0.2)
    assert out.rejected_rewards.item() == pytest.approx(-0.1)
    assert out.margins.item() == pytest.approx(0.3)
    assert out.loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.3))))
    assert out.accuracies.item() == 1.0


def test_gradient_weight_is_sigmoid_of_minus_margin():
    delta = torch.tensor([-20.0, -2.0, 0.0, 3.0, 40.0], requires_grad=True)  # log-ratio margins
    loss = -torch.nn.functional.logsigmoid(BETA * delta).sum()
    loss.backward()
    expected = -BETA * ds.gradient_weight(BETA * delta.detach())
    assert torch.allclose(delta.grad, expected, atol=1e-7)
    assert ds.gradient_weight(torch.tensor(0.0)).item() == 0.5


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


def test_batch_is_trls_layout(trainer_and_batch):
    _, batch, _ = trainer_and_batch
    assert set(batch) == {"input_ids", "attention_mask", "completion_mask"}
    assert batch["input_ids"].shape[0] == 2 * PAIRS
    assert (batch["completion_mask"] <= batch["attention_mask"]).all(), "answer tokens are never padding"


def test_scratch_equals_trl_dpo_trainer(trainer_and_batch):
    trainer, batch, beta = trainer_and_batch
    mine = ds.dpo_from_scratch(trainer.model, batch, beta).output
    assert mine.margins.abs().min().item() > 1e-3, "the rewards should not be zero: is the adapter still at B = 0?"
    theirs = ds.trl_batch_metrics(trainer, batch)  # TRL's own DPOTrainer.compute_loss
    mine_metrics = mine.metrics()
    for name in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        difference = abs(mine_metrics[name] - theirs[name])
        assert difference <= 1e-5, f"{name}: scratch {mine_metrics[name]}, TRL {theirs[name]}"
    for name in ("logps/chosen", "logps/rejected"):  # sums over answer tokens: float32 rounding grows with length
        assert mine_metrics[name] == pytest.approx(theirs[name], rel=1e-5, abs=1e-5), name


def test_trl_metrics_leave_the_trainer_untouched(trainer_and_batch):
    trainer, batch, _ = trainer_and_batch
    before = {k: list(v) for k, v in trainer._metrics["eval"].items()}
    losses_before = trainer.loss_types
    ipo = ds.trl_batch_metrics(trainer, batch, loss_type=["ipo"])
    sigmoid = ds.trl_batch_metrics(trainer, batch)
    assert ipo["loss"] != pytest.approx(sigmoid["loss"]), "loss_type should switch TRL's loss for that call"
    assert ipo["rewards/margins"] == pytest.approx(sigmoid["rewards/margins"])
    assert dict(trainer._metrics["eval"]) == before and trainer.loss_types is losses_before


def test_analytic_weight_equals_autograd_on_the_model(trainer_and_batch):
    trainer, batch, beta = trainer_and_batch
    result = ds.dpo_from_scratch(trainer.model, batch, beta, with_grad=True)
    result.output.loss.backward()
    trainer.model.zero_grad(set_to_none=True)
    weight = ds.gradient_weight(result.output.margins)  # [B]
    pairs = len(weight)
    assert torch.allclose(result.policy_chosen_logps.grad, -beta * weight / pairs, atol=1e-8)
    assert torch.allclose(result.policy_rejected_logps.grad, beta * weight / pairs, atol=1e-8)


def test_plot_gradient_weight(tmp_path):
    fig = ds.plot_gradient_weight([-1.0, 0.2, 2.5], BETA, tmp_path / "plots" / "w.png")
    assert (tmp_path / "plots" / "w.png").stat().st_size > 1000
    assert len(fig.axes) == 1
