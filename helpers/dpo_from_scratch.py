"""Notebook 07's plumbing: what TRL's own ``DPOTrainer.compute_loss`` says about one batch, and one figure.

Notebook 07 writes DPO itself, in its cells (Rafailov et al., 2023, eq. 7): answer log-probs from the logits, the
four log-prob vectors with the LoRA adapter on and off, the loss, rewards, margins and accuracies. It builds TRL's
trainer in its cells too. What it takes from here is not the lesson: the numbers TRL's ``compute_loss`` records
for a batch (:func:`trl_batch_metrics`), to check the hand-written ones against, and the plot of DPO's gradient
weight (:func:`plot_gradient_weight`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from matplotlib.figure import Figure

from helpers.plots import save_figure

# The per-batch numbers TRL's DPOTrainer records (means over the pairs of the batch), in its own names.
TRL_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
               "logps/rejected")


@torch.no_grad()
def trl_batch_metrics(trainer, batch: dict[str, torch.Tensor], loss_type: Sequence[str] | None = None
                      ) -> dict[str, float]:
    """The loss and the metrics of :data:`TRL_METRICS` that TRL's ``DPOTrainer.compute_loss`` computes for ``batch``.

    The model is put in eval mode (no dropout), so TRL files its metrics under ``trainer._metrics["eval"]``; the
    values this call appended are read and removed again, so the trainer's own logging is not disturbed.
    ``loss_type`` (e.g. ``["ipo"]`` or ``["sigmoid", "sft"]``, each weighted 1.0) swaps TRL's loss list for this
    one call only; by default the trainer's own loss is used.
    """
    trainer.model.eval()
    metrics = trainer._metrics["eval"]
    before = {name: list(values) for name, values in metrics.items()}
    saved = trainer.loss_types, trainer.loss_weights
    if loss_type is not None:
        trainer.loss_types, trainer.loss_weights = list(loss_type), [1.0] * len(loss_type)
    try:
        found = {"loss": trainer.compute_loss(trainer.model, batch).item()}
        for name in TRL_METRICS:
            if len(metrics.get(name, ())) != len(before.get(name, ())) + 1:
                raise RuntimeError(f"TRL did not record {name!r} for this batch; has DPOTrainer changed how it logs?")
            found[name] = metrics[name][-1]
    finally:
        trainer.loss_types, trainer.loss_weights = saved
        metrics.clear()
        metrics.update(before)
    return found


def plot_gradient_weight(reward_margins: Sequence[float], beta: float, path: str | Path | None = None) -> Figure:
    """DPO's per-pair gradient weight ``sigmoid(-margin)`` against the implicit-reward margin, the batch as dots.

    The curve is ``|d loss / d delta| / beta`` of the pair loss ``-log sigmoid(beta * delta)`` with
    ``margin = beta * delta`` (notebook 07 derives it). Saved as PNG to ``path`` when given; returns the figure.
    """
    margins = torch.as_tensor(list(reward_margins), dtype=torch.float32)
    span = max(6.0, float(margins.abs().max()) * 1.2) if len(margins) else 6.0
    grid = torch.linspace(-span, span, 241)
    fig = Figure(figsize=(7, 3.4))
    ax = fig.subplots()
    ax.plot(grid, torch.sigmoid(-grid), color="#4c72b0", label=r"weight $\sigma(r_r - r_c)$")
    ax.scatter(margins, torch.sigmoid(-margins), color="#c44e52", zorder=3, label=f"this batch ({len(margins)} pairs)")
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
