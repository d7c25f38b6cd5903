"""Notebook 07's plumbing: TRL's own DPO code path on one batch, to check the loss the notebook writes by hand.

Notebook 07 writes DPO itself, in its own cells, as a reader of the paper would (Rafailov et al., 2023, eq. 7):
each answer's log-probability from the logits (shifted by one, answer tokens only), the four log-prob vectors with
the LoRA adapter on and off, the sigmoid loss, the implicit rewards, margins and accuracies. What it takes from here
is what the lesson is not: TRL's trainer (:func:`sigmoid_trainer`), a batch from TRL's own collator
(:func:`preference_batch`), the numbers TRL's ``DPOTrainer.compute_loss`` records for that batch
(:func:`trl_batch_metrics`) to check the hand-written ones against (:func:`compare_metrics`), and the plot of the
gradient's weight (:func:`plot_gradient_weight`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
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


# --- TRL's own code path ----------------------------------------------------------------------------------


def sigmoid_trainer(profile, model, tokenizer, train_dataset, output_dir: str | Path, *, steps: int, **overrides):
    """TRL's ``DPOTrainer`` for plain sigmoid DPO (the profile's LoRA, ``ref_model=None``), trained ``steps`` steps.

    Built with :func:`helpers.training.build_trainer` from the profile with ``loss_type=("sigmoid",)`` (the tiny
    profile adds an SFT term for training; the comparison is about DPO alone). A few real optimisation steps
    (batch of ``per_device_train_batch_size`` pairs, no accumulation, no warm-up, nothing saved) make the policy
    differ from the reference, so that the rewards are not all zero. Training prints nothing.
    """
    # TRL's own reference pass at every step, as the hand-written loss does it (no precomputed log-probs)
    sigmoid_only = profile.replace("dpo", loss_type=("sigmoid",), loss_weights=None, precompute_ref_log_probs=False)
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
    trainer's own logging is not disturbed. ``loss_type`` (e.g. ``["ipo"]``, or ``["sigmoid", "sft"]``, each
    weighted 1.0) swaps TRL's loss list for this one call only; by default the trainer's configured loss is used.
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
    """Rows ``(name, scratch, TRL, |difference|)`` for every metric both dictionaries hold (in ``mine``'s order).

    ``mine`` uses TRL's names (:data:`TRL_METRICS`, plus ``loss``); values may be floats or 0-d tensors.
    """
    rows = []
    for name in mine:
        if name in trl:
            value = float(mine[name])
            rows.append((name, value, trl[name], abs(value - trl[name])))
    return rows


# --- the gradient's weight, drawn -----------------------------------------------------------------------------


def plot_gradient_weight(reward_margins: Sequence[float], beta: float, path: str | Path | None = None):
    """DPO's per-pair gradient weight ``sigmoid(-margin)`` against the implicit-reward margin, the batch as dots.

    The curve is ``|d loss / d delta| / beta`` of the pair loss ``-log sigmoid(beta * delta)`` with
    ``margin = beta * delta`` (notebook 07 derives it). Saved as PNG to ``path`` when given (e.g.
    ``<run>/plots/07_dpo_gradient_weight.png``); returns the figure.
    """
    margins = torch.as_tensor(list(reward_margins), dtype=torch.float32)
    span = max(6.0, float(margins.abs().max()) * 1.2) if len(margins) else 6.0
    grid = torch.linspace(-span, span, 241)
    fig = Figure(figsize=(7, 3.4))
    ax = fig.subplots()
    ax.plot(grid, torch.sigmoid(-grid), color="#4c72b0", label=r"weight $\sigma(r_r - r_c)$")
    ax.scatter(margins, torch.sigmoid(-margins), color="#c44e52", zorder=3,
               label=f"this batch ({len(margins)} pairs)")
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
