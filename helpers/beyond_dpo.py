"""Beyond DPO (notebook 08): the same short run with other preference losses, compared on held-out pairs.

Notebook 08 writes the trainers in its cells: ``DPOTrainer`` for TRL's one pass of the reference, a DPO-family run
per loss (the run's ``DPOConfig`` with only the loss changed, :func:`variant_profile`) and ``ORPOTrainer`` for the
reference-free ORPO. What it takes from here is not the lesson: the table of losses (:data:`LOSSES`), the plan of
the profile with the notebook's knobs (:func:`plan_for`), the trainer that reads the shared reference log-probs
instead of computing them again (:class:`SharedReferenceDPOTrainer`, docs/beyond_dpo_internals.md says why TRL
1.16 needs it), the held-out evaluation of a trained model (:func:`evaluate_variant`), a table and a figure.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure
from trl import DPOTrainer

from helpers.plots import save_figure
from helpers.profiles import Profile
from helpers.scoring import (
    PairScores,
    generation_health,
    greedy_generate,
    implicit_rewards,
    preference_accuracy,
    score_pairs,
)

ORPO = "orpo"  # the reference-free variant: a trainer of its own, not a DPO loss_type
REFERENCE_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")  # where TRL keeps precomputed reference log-probs
# The DPOConfig settings of each DPO-family variant: only the loss and what that loss needs.
LOSSES: dict[str, dict[str, Any]] = {
    "sigmoid": {"loss_type": ["sigmoid"]},  # DPO itself, the recipe's loss
    "sigmoid+sft": {"loss_type": ["sigmoid", "sft"]},  # plus the NLL of the chosen answer (the tiny profile's loss)
    "ipo": {"loss_type": ["ipo"]},
    "hinge": {"loss_type": ["hinge"]},
    "robust": {"loss_type": ["robust"], "label_smoothing": 0.1},  # ε, the share of flipped labels: in [0, 0.5)
    "sigmoid_norm": {"loss_type": ["sigmoid_norm"]},
}
# The DPOConfig settings a variant may change; everything else is the run's own.
LOSS_SETTINGS = ("loss_type", "loss_weights", "label_smoothing", "beta")


def plan_for(profile: Profile, *, steps: int | None = None, variants: Sequence[str] | None = None,
             betas: Sequence[float] | None = None, answers: int | None = None) -> dict[str, Any]:
    """``profile.beyond`` with the notebook's knobs (None keeps the profile's value); unknown variants refused."""
    plan = dict(profile.beyond)
    for key, value in (("steps", steps), ("variants", variants), ("betas", betas), ("answers", answers)):
        if value is not None:
            plan[key] = list(value) if isinstance(value, list | tuple) else value
    unknown = [name for name in plan["variants"] if name not in LOSSES and name != ORPO]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; known: {[*LOSSES, ORPO]}")
    if plan["betas"] and "sigmoid" not in plan["variants"]:
        raise ValueError("the β sweep is compared with the `sigmoid` run at the profile's β: add 'sigmoid' to the "
                         "variants, or sweep no βs (BETAS = [])")
    if plan["steps"] < 1:
        raise ValueError(f"steps must be at least 1, not {plan['steps']}")
    return plan


def run_profile(profile: Profile, plan: Mapping[str, Any]) -> Profile:
    """The profile every run of the comparison trains with: the plan's steps and training changes, nothing saved,
    and the reference log-probs precomputed (one pass for all: :class:`SharedReferenceDPOTrainer`)."""
    return profile.with_changes("dpo", **plan["training"], max_steps=plan["steps"], save_strategy="no",
                                precompute_ref_log_probs=True, precompute_ref_batch_size=plan["reference_batch_size"])


def variant_profile(profile: Profile, name: str, *, beta: float | None = None) -> Profile:
    """``profile`` with only the preference loss of variant ``name`` changed (and ``beta`` where given).

    Settings a loss does not use go back to TRL's defaults (no ``loss_weights``, ``label_smoothing`` 0), so the
    profile's own loss (``["sigmoid", "sft"]`` with weights on tiny) does not leak into a variant.
    """
    changes: dict[str, Any] = {"loss_weights": None, "label_smoothing": 0.0, **LOSSES[name]}
    return profile.with_changes("dpo", **changes, **({"beta": beta} if beta is not None else {}))


class SharedReferenceDPOTrainer(DPOTrainer):
    """TRL's ``DPOTrainer`` that keeps the reference log-probs its train set already holds.

    With ``precompute_ref_log_probs=True`` TRL 1.16 scores every pair in ``__init__`` whatever the train set holds,
    then fails on the columns it would add a second time; this trainer skips that pass when
    ``ref_chosen_logps`` and ``ref_rejected_logps`` are there (TRL's loss then reads them from each batch, as after
    its own pass). Without those columns it is TRL's trainer unchanged.
    """

    def _precompute_ref_logps(self, dataset, name: str, batch_size: int):
        if set(REFERENCE_COLUMNS) <= set(dataset.column_names):
            return dataset
        return super()._precompute_ref_logps(dataset, name, batch_size)


def evaluate_variant(model, tokenizer, data, base_scores: PairScores, beta: float, *, answers: int,
                     scores: PairScores | None = None) -> dict:
    """A model's row, measured as notebook 06 measures the course's model, on the held-out pairs of ``data``.

    Every held-out pair is scored: per-token preference accuracy, the implicit-reward margin β·Δ against
    ``base_scores`` (the base model on the same pairs) and Δ itself in nats (comparable across βs), the change of
    the chosen answers' log-likelihood. The first ``answers`` prompts are answered greedily (the slowest part) for
    the shares of well-formed answers and of answers that follow their pair's rule. ``sample``: the first answer.
    ``scores``: the model's own held-out scores when already computed (the base model's are ``base_scores``).
    """
    scores = scores if scores is not None else score_pairs(model, tokenizer, data.heldout)
    rewards = implicit_rewards(scores, base_scores, beta)
    count = min(answers, len(data.heldout))
    gens = greedy_generate(model, tokenizer, list(data.heldout["prompt"])[:count])
    health = generation_health(gens, data.heldout_rows[:count])
    return {"accuracy_per_token": preference_accuracy(scores)["per_token"], "margin": rewards["mean_margin"],
            "margin_nats": rewards["mean_margin"] / beta,
            "chosen_logp_change": (scores.chosen_sum - base_scores.chosen_sum).mean().item(),
            "well_formed": health["well_formed"], "follows_rule": health["follows_rule"], "answers": count,
            "sample": gens[0].text}


def summary_line(label: str, row: Mapping[str, Any]) -> str:
    """One line per run: held-out accuracy, margin, well-formed share (of how many answers) and speed."""
    speed = row.get("seconds_per_step")
    return (f"{label}: held-out accuracy {row['accuracy_per_token']:.3f} (per token), implicit-reward margin "
            f"{row['margin']:+.2f}, well-formed {row['well_formed']:.0%} of {row['answers']}"
            + (f", {speed:.2f} s/step" if speed is not None else ""))


COLUMNS = {"accuracy_per_token": "held-out acc. (per token)", "margin": "margin β·Δ", "margin_nats": "Δ (nats)",
           "chosen_logp_change": "Δ log p(chosen)", "well_formed": "well-formed", "follows_rule": "follows rule",
           "seconds_per_step": "s / step"}


def results_table(rows: Mapping[str, Mapping[str, Any]], columns: Sequence[str] | None = None, digits: int = 3):
    """A table, one row per run, of the :data:`COLUMNS` named in ``columns`` (all by default), as printed."""
    keys = [k for k in (columns or COLUMNS) if any(k in row for row in rows.values())]
    frame = pd.DataFrame({COLUMNS[k]: {name: row.get(k, math.nan) for name, row in rows.items()} for k in keys})
    return frame.astype(float).round(digits)


CURVE_PANELS = (("loss", "loss ÷ its first logged value"), ("rewards/margins", "reward margin (training batch)"),
                ("logps/chosen", "log-prob of the chosen answers"))


def plot_variant_curves(histories: Mapping[str, Sequence[Mapping[str, float]]], path: str | Path | None = None,
                        title: str = "Preference losses from the same start") -> Figure:
    """Loss (divided by its first logged value: the losses live on other scales), training-batch reward margin and
    chosen log-prob of every run; ORPO dashed (it logs per-token log-probs and λ·log-prob as rewards)."""
    fig = Figure(figsize=(13, 3.8))
    axes = fig.subplots(1, len(CURVE_PANELS))
    for ax, (key, label) in zip(axes, CURVE_PANELS):
        for name, history in histories.items():
            rows = [r for r in history if key in r and "step" in r]
            values = [float(r[key]) for r in rows]
            if key == "loss" and values and values[0] != 0.0 and math.isfinite(values[0]):
                values = [v / values[0] for v in values]
            ax.plot([r["step"] for r in rows], values, "--" if name == ORPO else "-", label=name)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
    return fig
