"""DPO written by hand in plain torch, as a reader of the paper would (Rafailov et al., 2023, eq. 7).

For a prompt x with a chosen answer y_c and a rejected answer y_r:

    log-ratio      h(y)  = log pi(y | x) - log pi_ref(y | x)          (summed over the answer's tokens)
    implicit reward r(y) = beta * h(y)
    loss                 = -log sigmoid(beta * (h(y_c) - h(y_r)))    = -log sigmoid(r(y_c) - r(y_r))

With a LoRA adapter the reference pi_ref is the same network with the adapter switched off, so no second model
is loaded. Notebook 07 checks these functions against TRL's ``DPOTrainer`` on the same token ids
(:func:`trl_batch_metrics` calls TRL's own ``compute_loss``) and plots the gradient's weighting
(:func:`plot_gradient_weight`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from helpers.plots import save_figure
from helpers.training import build_trainer

# The per-batch numbers TRL's DPOTrainer records (means over the pairs of the batch), in its own names.
TRL_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)


def sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Log-probability of each sequence's answer: the sum of its answer tokens' log-probs ([N, T, V] -> [N]).

    The logit at position t predicts the token at t + 1, so logits and targets are shifted by one; prompt and
    padding positions (``completion_mask == 0``) count zero. ``logits``: [N, T, V], ``input_ids`` and
    ``completion_mask``: [N, T].
    """
    if logits.shape[:2] != input_ids.shape or input_ids.shape != completion_mask.shape:
        raise ValueError(
            f"shapes do not match: logits {tuple(logits.shape)}, input_ids {tuple(input_ids.shape)}, "
            f"completion_mask {tuple(completion_mask.shape)} (expected [N, T, V], [N, T], [N, T])"
        )
    log_probs = F.log_softmax(logits[:, :-1].float(), dim=-1)  # [N, T-1, V]: what position t says about t+1
    targets = input_ids[:, 1:]  # [N, T-1]: the token that came next
    token_logps = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [N, T-1]
    mask = completion_mask[:, 1:].bool()  # [N, T-1]: True where the *predicted* token is an answer token
    return torch.where(mask, token_logps, torch.zeros_like(token_logps)).sum(dim=-1)  # [N]


@contextlib.contextmanager
def reference_mode(model) -> Iterator[None]:
    """Inside this block the model is DPO's reference: the PEFT adapter is switched off (a no-op without PEFT)."""
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield
    else:
        yield


def pair_logps(model, batch: dict[str, torch.Tensor], *, reference: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Answer log-probs of the chosen and rejected halves of a TRL preference batch: ([B], [B]).

    ``batch`` is what TRL's ``DataCollatorForPreference`` makes from B pairs: ``input_ids``, ``attention_mask`` and
    ``completion_mask`` of shape [2B, T], the B chosen sequences first, then the B rejected ones (right-padded).
    ``reference=True`` runs the model with its adapter off, without gradients. Plain logits, no fused head.
    """
    no_grad = torch.no_grad() if reference else contextlib.nullcontext()
    adapter_off = reference_mode(model) if reference else contextlib.nullcontext()
    with no_grad, adapter_off:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    logps = sequence_logps(logits, batch["input_ids"], batch["completion_mask"])  # [2B]
    chosen, rejected = logps.chunk(2, dim=0)  # [B], [B]
    return chosen, rejected


@dataclass
class DPOOutput:
    """The DPO loss of a batch and its parts, per pair ([B]) unless said otherwise."""

    loss: torch.Tensor  # scalar: the mean over pairs
    losses: torch.Tensor  # [B]
    chosen_rewards: torch.Tensor  # [B] beta * (log pi(y_c) - log pi_ref(y_c))
    rejected_rewards: torch.Tensor  # [B]
    margins: torch.Tensor  # [B] chosen_rewards - rejected_rewards
    accuracies: torch.Tensor  # [B] 1.0 where the chosen answer has the larger reward
    policy_chosen_logps: torch.Tensor  # [B]
    policy_rejected_logps: torch.Tensor  # [B]

    def metrics(self) -> dict[str, float]:
        """The batch means under TRL's metric names (plus ``loss``), to compare with what TRL records."""
        values = {
            "loss": self.loss,
            "rewards/chosen": self.chosen_rewards.mean(),
            "rewards/rejected": self.rejected_rewards.mean(),
            "rewards/margins": self.margins.mean(),
            "rewards/accuracies": self.accuracies.mean(),
            "logps/chosen": self.policy_chosen_logps.mean(),
            "logps/rejected": self.policy_rejected_logps.mean(),
        }
        return {name: value.item() for name, value in values.items()}


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
) -> DPOOutput:
    """The sigmoid DPO loss from the four per-pair answer log-probs (each [B]).

    ``-log sigmoid(beta * ((log pi_c - log pi_ref_c) - (log pi_r - log pi_ref_r)))``, averaged over the B pairs;
    the implicit rewards are ``beta * (log pi - log pi_ref)`` of each answer.
    """
    chosen_logratios = policy_chosen_logps - reference_chosen_logps  # [B]
    rejected_logratios = policy_rejected_logps - reference_rejected_logps  # [B]
    losses = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))  # [B]; logsigmoid is stable for big margins
    chosen_rewards = beta * chosen_logratios.detach()  # [B]
    rejected_rewards = beta * rejected_logratios.detach()  # [B]
    return DPOOutput(
        loss=losses.mean(),
        losses=losses,
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        margins=chosen_rewards - rejected_rewards,
        accuracies=(chosen_rewards > rejected_rewards).float(),
        policy_chosen_logps=policy_chosen_logps.detach(),
        policy_rejected_logps=policy_rejected_logps.detach(),
    )


@dataclass
class ScratchResult:
    """DPO on one batch computed by hand: the loss and rewards, and the four log-prob vectors it came from."""

    output: DPOOutput
    policy_chosen_logps: torch.Tensor  # [B], attached to the graph when computed with gradients
    policy_rejected_logps: torch.Tensor  # [B]
    reference_chosen_logps: torch.Tensor  # [B]
    reference_rejected_logps: torch.Tensor  # [B]


def dpo_from_scratch(model, batch: dict[str, torch.Tensor], beta: float, *, with_grad: bool = False) -> ScratchResult:
    """Policy forward (adapter on) and reference forward (adapter off) on a TRL batch, then :func:`dpo_loss`.

    Eval mode (no dropout), as for a comparison. ``with_grad=True`` keeps the policy log-probs in the graph (and
    retains their gradients) so ``result.output.loss.backward()`` reaches them and the adapter.
    """
    model.eval()
    with torch.set_grad_enabled(with_grad):
        policy_chosen, policy_rejected = pair_logps(model, batch)
    if with_grad:
        policy_chosen.retain_grad()
        policy_rejected.retain_grad()
    reference_chosen, reference_rejected = pair_logps(model, batch, reference=True)
    output = dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta)
    return ScratchResult(output, policy_chosen, policy_rejected, reference_chosen, reference_rejected)


# --- TRL's own code path ----------------------------------------------------------------------------------


def sigmoid_trainer(profile, model, tokenizer, train_dataset, output_dir: str | Path, *, steps: int, **overrides):
    """TRL's ``DPOTrainer`` for plain sigmoid DPO (the profile's LoRA, ``ref_model=None``), trained ``steps`` steps.

    Built with :func:`helpers.training.build_trainer` from the profile with ``loss_type=("sigmoid",)`` (the tiny
    profile adds an SFT term for training; the comparison is about DPO alone). A few real optimisation steps
    (batch of ``per_device_train_batch_size`` pairs, no accumulation, no warm-up, nothing saved) make the policy
    differ from the reference, so that the rewards are not all zero. Training prints nothing.
    """
    sigmoid_only = profile.replace("dpo", loss_type=("sigmoid",), loss_weights=None)
    settings = dict(
        max_steps=steps,
        gradient_accumulation_steps=1,
        warmup_steps=0,
        save_strategy="no",
        logging_strategy="no",
    )
    settings.update(overrides)
    trainer = build_trainer(sigmoid_only, model, tokenizer, train_dataset, output_dir, progress=False, **settings)
    if steps > 0:
        trainer.train()
    trainer.model.eval()
    return trainer


def preference_batch(trainer, indices: Sequence[int]) -> dict[str, torch.Tensor]:
    """Rows of the trainer's tokenised train set collated by TRL's own ``DataCollatorForPreference``.

    Returns ``input_ids``, ``attention_mask``, ``completion_mask``: [2B, T], the B chosen sequences first, on the
    trainer's device.
    """
    batch = trainer.data_collator([trainer.train_dataset[i] for i in indices])
    return {name: tensor.to(trainer.accelerator.device) for name, tensor in batch.items()}


@torch.no_grad()
def trl_batch_metrics(
    trainer, batch: dict[str, torch.Tensor], loss_type: Sequence[str] | None = None
) -> dict[str, float]:
    """Loss and reward metrics of one batch as TRL's ``DPOTrainer.compute_loss`` computes and records them.

    The model is put in eval mode (no dropout); TRL then files its metrics under ``trainer._metrics["eval"]``
    (lists it averages when it logs). The values this call appended are read and removed again, so the
    trainer's own logging is not disturbed. ``loss_type`` (e.g. ``["ipo"]``) swaps TRL's loss list for this one
    call only; by default the trainer's configured loss is used.
    """
    trainer.model.eval()
    metrics = trainer._metrics["eval"]
    before = {name: list(values) for name, values in metrics.items()}
    saved = trainer.loss_types, trainer.loss_weights
    if loss_type is not None:
        trainer.loss_types, trainer.loss_weights = list(loss_type), [1.0] * len(loss_type)
    try:
        loss = trainer.compute_loss(trainer.model, batch)
        found = {"loss": loss.item()}
        for name in TRL_METRICS:
            if len(metrics.get(name, ())) != len(before.get(name, ())) + 1:
                raise RuntimeError(f"TRL did not record {name!r} for this batch; has DPOTrainer changed how it logs?")
            found[name] = metrics[name][-1]
    finally:
        trainer.loss_types, trainer.loss_weights = saved
        metrics.clear()
        metrics.update(before)
    return found


def compare_metrics(mine: dict[str, float], trl: dict[str, float]) -> list[tuple[str, float, float, float]]:
    """Rows ``(name, scratch, TRL, |difference|)`` for every metric both dictionaries hold."""
    return [(name, mine[name], trl[name], abs(mine[name] - trl[name])) for name in mine if name in trl]


# --- the gradient -----------------------------------------------------------------------------------------


def gradient_weight(reward_margins: torch.Tensor) -> torch.Tensor:
    """How strongly DPO pushes on each pair: ``sigmoid(-(r_c - r_r))`` for implicit-reward margins [B] -> [B].

    With ``delta = h(y_c) - h(y_r)`` (log-ratio margin) the pair's loss is ``-log sigmoid(beta * delta)`` and
    ``d loss / d delta = -beta * sigmoid(-beta * delta)``: the weight is near 1 for a pair the model ranks wrong
    (margin < 0) and falls towards 0 as the pair is ranked right by a wide margin.
    """
    return torch.sigmoid(-reward_margins)


def plot_gradient_weight(reward_margins: Sequence[float], beta: float, path: str | Path | None = None):
    """DPO's per-pair gradient weight ``sigmoid(-margin)`` against the implicit-reward margin, the batch as dots.

    Saved as PNG to ``path`` when given (e.g. ``<run>/plots/07_dpo_gradient_weight.png``); returns the figure.
    """
    margins = torch.as_tensor(list(reward_margins), dtype=torch.float32)
    span = max(6.0, float(margins.abs().max()) * 1.2) if len(margins) else 6.0
    grid = torch.linspace(-span, span, 241)
    fig = Figure(figsize=(7, 3.4))
    ax = fig.subplots()
    ax.plot(grid, gradient_weight(grid), color="#4c72b0", label=r"weight $\sigma(r_r - r_c)$")
    ax.scatter(margins, gradient_weight(margins), color="#c44e52", zorder=3, label=f"this batch ({len(margins)} pairs)")
    ax.axvline(0.0, color="black", linewidth=0.5)
    ax.text(-span * 0.95, 0.82, "ranked wrong:\nfull push", fontsize=8, color="#555555")
    ax.text(span * 0.95, 0.1, "ranked right:\nlittle push", fontsize=8, color="#555555", ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel(r"implicit reward margin $r_c - r_r = \beta\,\Delta$")
    ax.set_ylabel(r"$|\partial L / \partial \Delta| \;/\; \beta$")
    ax.set_title(f"DPO's gradient weight per pair (beta = {beta})")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    return fig
