"""Beyond DPO (notebook 08): the same short run with other preference losses, compared on held-out pairs.

Every variant starts from the same point - the profile's base model, a fresh LoRA adapter, the same seed and
the same formatted pairs - and only the loss changes. DPO-family losses are TRL ``DPOTrainer`` ``loss_type``s
(:func:`helpers.training.train_dpo` with the loss swapped in the profile); ORPO is TRL's reference-free
``trl.experimental.orpo.ORPOTrainer`` (:func:`train_orpo`). :func:`evaluate_variant` measures each trained
adapter the way notebook 06 measures the course's model, and :func:`plot_variant_curves` overlays the logs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure
from trl.experimental.orpo import ORPOConfig, ORPOTrainer

from helpers.evaluation import generation_health, greedy_generate, implicit_rewards, preference_accuracy, score_pairs
from helpers.loading import load_model, load_tokenizer, model_source
from helpers.lora import lora_config
from helpers.paths import run_dir
from helpers.plots import save_figure
from helpers.profiles import Profile
from helpers.saving import write_json_atomically
from helpers.training import (
    CHECKPOINTS_DIRNAME,
    TrainOutcome,
    dpo_config_kwargs,
    finish_run,
    pairs_only,
    prepare_trainer,
    set_seed,
    timed_train,
    train_dpo,
)

ORPO = "orpo"  # the name of the reference-free variant (a trainer of its own, not a DPO loss_type)


@dataclass(frozen=True)
class Variant:
    """One preference loss of the comparison: what TRL is asked for, and what it changes."""

    name: str
    loss_type: tuple[str, ...]  # DPOConfig.loss_type; empty for ORPO (its own trainer)
    changes: str  # what the loss does differently from sigmoid DPO
    choose_when: str  # when to pick it
    overrides: dict[str, Any] = field(default_factory=dict)  # extra DPOConfig / ORPOConfig fields
    reference_free: bool = False


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant(
            "sigmoid",
            ("sigmoid",),
            "DPO itself: -log σ(β·Δ), Δ = the chosen answer's log-ratio minus the rejected one's (summed over tokens)",
            "the default; clean pairs, a reference model (or a LoRA adapter to switch off)",
        ),
        Variant(
            "sigmoid+sft",
            ("sigmoid", "sft"),
            "sigmoid DPO plus the negative log-likelihood of the chosen answer (RPO-style); the tiny profile's loss",
            "when plain DPO lowers the chosen answers' likelihood too and the text degrades (notebook 06)",
        ),
        Variant(
            "ipo",
            ("ipo",),
            "a squared loss (Δ/len − 1/(2β))²: pulls the per-token margin to a target instead of pushing it to ∞",
            "near-deterministic preferences or small data, where DPO over-fits and drifts far from the reference",
        ),
        Variant(
            "hinge",
            ("hinge",),
            "SLiC's max(0, 1 − β·Δ): a pair stops contributing once its margin reaches 1/β",
            "you want the model to stop working on pairs it already ranks right (a margin, not a probability)",
        ),
        Variant(
            "robust",
            ("robust",),
            "robust DPO (rDPO): assumes a share ε of the pairs is flipped and un-biases the sigmoid loss for it "
            "(ε = label_smoothing = 0.1)",
            "noisy labels, e.g. pairs ranked by a judge model that is wrong now and then",
            overrides={"label_smoothing": 0.1},
        ),
        Variant(
            "sigmoid_norm",
            ("sigmoid_norm",),
            "sigmoid DPO on per-token (length-normalised) log-ratios: long answers no longer win by length",
            "the chosen answers are systematically longer or shorter than the rejected ones (length bias)",
        ),
        Variant(
            ORPO,
            (),
            "reference-free (ORPO): NLL of the chosen answer plus λ·(−log σ(log-odds ratio)) of per-token "
            "likelihoods; no reference pass at all",
            "no SFT stage before (ORPO does SFT and preference in one) or no memory/time for reference log-probs",
            reference_free=True,
        ),
    )
}

DEFAULT_VARIANTS = ("sigmoid", "sigmoid+sft", "ipo", "hinge", "robust", "sigmoid_norm", ORPO)


def variant_profile(profile: Profile, variant: Variant | str, *, beta: float | None = None) -> Profile:
    """The profile with only the preference loss changed (and ``beta`` where given); everything else stays."""
    variant = VARIANTS[variant] if isinstance(variant, str) else variant
    changes: dict[str, Any] = {"loss_type": variant.loss_type or profile.dpo.loss_type, "loss_weights": None}
    if beta is not None:
        changes["beta"] = beta
    return profile.replace("dpo", **changes)


def variant_run_id(run_id: str, name: str) -> str:
    """``<run_id>-<name>`` with anything but ASCII letters, digits, ``-``, ``_`` and ``.`` replaced by ``-``
    (``sigmoid+sft`` -> ``main-sigmoid-sft``)."""
    safe = "".join(c if (c.isascii() and c.isalnum()) or c in "-_." else "-" for c in name)
    return f"{run_id}-{safe}"


def orpo_config(profile: Profile, output_dir: str | Path, **overrides: Any) -> ORPOConfig:
    """A TRL ``ORPOConfig`` with the profile's batch, optimiser, schedule, precision and seed.

    ORPO's own ``beta`` is the paper's λ, the weight of the odds-ratio term next to the NLL term (not a KL
    strength); the profile's β (0.1) happens to be the paper's λ too. DPO-only fields are left out.
    """
    kwargs = dpo_config_kwargs(profile, output_dir)
    for dpo_only in ("loss_type", "loss_weights"):
        kwargs.pop(dpo_only)
    kwargs["remove_unused_columns"] = False  # ORPO's collator reads its own tokenised columns
    kwargs.update(overrides)
    return ORPOConfig(**kwargs)


def train_orpo(profile: Profile, run_folder: str | Path, *, data, progress: bool = True, **overrides: Any
               ) -> TrainOutcome:
    """Train the profile's LoRA adapter with TRL's ORPO (reference-free) and save it as :func:`train_dpo` does.

    The same sequence as ``train_dpo`` (seed, load, build, :func:`helpers.training.prepare_trainer`, train,
    :func:`helpers.training.finish_run`); only the trainer differs. ``overrides`` are ``ORPOConfig`` fields.
    """
    run_folder = Path(run_folder)
    run_folder.mkdir(parents=True, exist_ok=True)
    set_seed(profile.training.seed)
    source = model_source(profile)
    tokenizer = load_tokenizer(profile, source)
    model = load_model(profile, source=source)
    if not progress:
        overrides.setdefault("disable_tqdm", True)
    trainer = ORPOTrainer(
        model=model,
        args=orpo_config(profile, run_folder / CHECKPOINTS_DIRNAME, **overrides),
        train_dataset=pairs_only(data.train),
        processing_class=tokenizer,
        peft_config=lora_config(profile),
    )
    prepare_trainer(trainer, profile, progress=progress, desc="ORPO steps")
    return finish_run(trainer, profile, run_folder, timed_train(trainer))


def train_variant(
    profile: Profile, name: str, run_folder: str | Path, *, data, max_steps: int, beta: float | None = None,
    progress: bool = True, **overrides: Any,
) -> TrainOutcome:
    """Train one variant from the base model: a DPO ``loss_type`` through ``train_dpo``, or ORPO.

    No checkpoints are written (``save_strategy="no"``); the adapter and the log are, as for every run.
    """
    variant = VARIANTS[name]
    settings = {**variant.overrides, **overrides, "max_steps": max_steps, "save_strategy": "no"}
    if variant.reference_free:
        if beta is not None:
            settings["beta"] = beta
        return train_orpo(profile, run_folder, data=data, progress=progress, **settings)
    return train_dpo(variant_profile(profile, variant, beta=beta), run_folder, data=data, progress=progress,
                     **settings)


def seconds_per_step(outcome) -> float:
    """Wall-clock seconds per optimizer step of a training run (load and save not included)."""
    return outcome.seconds / max(1, outcome.trainer.state.global_step)


def evaluate_variant(model, tokenizer, data, base_scores, beta: float, *, max_new_tokens: int | None = None) -> dict:
    """Held-out preference accuracy (per token and summed), implicit-reward margin and generation health.

    ``model`` is the trained PEFT model itself (no merge needed); ``base_scores`` are the base model's
    :func:`helpers.evaluation.score_pairs` on the same held-out pairs, the reference of the implicit reward
    β·(log π − log π_ref). ``margin_nats`` is the same margin without β (Δ, in nats), comparable across βs.
    """
    model.eval()
    scores = score_pairs(model, tokenizer, data.heldout)
    accuracy = preference_accuracy(scores)
    rewards = implicit_rewards(scores, base_scores, beta)
    prompts = list(data.heldout["prompt"])
    gens = greedy_generate(model, tokenizer, prompts, **({"max_new_tokens": max_new_tokens} if max_new_tokens else {}))
    health = generation_health(gens, data.heldout_rows)
    chosen_logp = (scores.chosen_sum - base_scores.chosen_sum).mean().item()
    return {
        "accuracy_per_token": accuracy["per_token"],
        "accuracy_sum": accuracy["sum"],
        "reward_accuracy": rewards["accuracy"],
        "margin": rewards["mean_margin"],
        "margin_nats": rewards["mean_margin"] / beta,
        "chosen_logp_change": chosen_logp,
        "well_formed": health["well_formed"],
        "follows_rule": health["follows_rule"],
        "sample": gens[0].text,
    }


@dataclass
class Comparison:
    """Runs variants from one starting point and keeps, for each, its evaluation row and its training log.

    ``base_scores`` are the base model's held-out scores (the reference of every implicit reward); runs go to
    ``run_dir(profile.name, f"{run_id}-{label}")``.
    """

    profile: Profile
    data: Any
    tokenizer: Any
    base_scores: Any
    run_id: str = "main"
    steps: int = 100
    rows: dict[str, dict] = field(default_factory=dict)
    histories: dict[str, list] = field(default_factory=dict)

    def add_row(self, label: str, row: dict) -> None:
        """Add a row evaluated elsewhere (e.g. the base model's)."""
        self.rows[label] = row

    def run(self, name: str, *, beta: float | None = None, label: str | None = None, progress: bool = True,
            **overrides: Any) -> None:
        """Train variant ``name`` for ``steps`` steps from the base model, evaluate it, print one line, keep the row."""
        label = label or name
        used_beta = self.profile.dpo.beta if beta is None else beta
        folder = run_dir(self.profile.name, variant_run_id(self.run_id, label))
        outcome = train_variant(self.profile, name, folder, data=self.data, max_steps=self.steps, beta=beta,
                                progress=progress, **overrides)
        row = evaluate_variant(outcome.trainer.model, self.tokenizer, self.data, self.base_scores, used_beta)
        row.update(beta=used_beta, steps=outcome.trainer.state.global_step, seconds_per_step=seconds_per_step(outcome))
        self.rows[label], self.histories[label] = row, outcome.history
        print(summary_line(label, row))

    def save(self, path: str | Path) -> Path:
        """Write the rows and training logs as JSON (the solutions notebook of 08 reads them back)."""
        return save_results(self.rows, self.histories, path)


def save_results(rows: Mapping[str, Mapping], histories: Mapping[str, Sequence], path: str | Path) -> Path:
    """``{"rows": ..., "histories": ...}`` as JSON, written atomically."""
    return write_json_atomically(path, {"rows": rows, "histories": histories}, indent=1)


def load_results(path: str | Path) -> tuple[dict[str, dict], dict[str, list]]:
    """(rows, histories) written by :func:`save_results`."""
    saved = json.loads(Path(path).read_text())
    return saved["rows"], saved["histories"]


def summary_line(label: str, row: Mapping[str, Any]) -> str:
    """One line per run: held-out accuracy, margin, well-formed share and speed."""
    speed = row.get("seconds_per_step")
    return (f"{label}: held-out accuracy {row['accuracy_per_token']:.3f} (per token), implicit-reward margin "
            f"{row['margin']:+.2f}, well-formed {row['well_formed']:.0%}"
            + (f", {speed:.2f} s/step" if speed is not None else ""))


TABLE_COLUMNS = {
    "accuracy_per_token": "held-out acc. (per token)",
    "margin": "implicit-reward margin",
    "chosen_logp_change": "Δ log p(chosen)",
    "well_formed": "well-formed",
    "seconds_per_step": "s / step",
}


def results_table(rows: Mapping[str, Mapping[str, float]], columns: Mapping[str, str] | None = None, digits: int = 3):
    """A pandas DataFrame, one row per variant, with the comparison's columns (renamed for display)."""
    columns = dict(columns or TABLE_COLUMNS)
    frame = pd.DataFrame.from_dict({name: dict(row) for name, row in rows.items()}, orient="index")
    present = [c for c in columns if c in frame.columns]
    return frame[present].rename(columns=columns).astype(float).round(digits)


# --- the figure ------------------------------------------------------------------------------------------------

CURVE_PANELS = (
    ("loss", "loss ÷ its first logged value"),
    ("rewards/margins", "reward margin (training batch)"),
    ("logps/chosen", "log-prob of the chosen answers"),
)


def curve(history: Sequence[Mapping[str, float]], key: str, *, relative: bool = False) -> tuple[list, list]:
    """(steps, values) of one logged metric; ``relative`` divides by the first value (losses of other scales)."""
    rows = [r for r in history if key in r and "step" in r]
    steps = [r["step"] for r in rows]
    values = [float(r[key]) for r in rows]
    if relative and values and values[0] not in (0.0,) and math.isfinite(values[0]):
        values = [v / values[0] for v in values]
    return steps, values


def plot_variant_curves(
    histories: Mapping[str, Sequence[Mapping[str, float]]], path: str | Path | None = None,
    title: str = "Preference losses from the same start", dashed: Sequence[str] = (ORPO,),
):
    """Loss (relative to its start), training-batch reward margin and chosen log-prob of every variant.

    Losses live on different scales (IPO starts at (1/(2β))², sigmoid at ln 2), so each is divided by its first
    logged value. The ``dashed`` runs (ORPO) log rewards as β·mean per-token log-prob with no reference, and
    per-token log-probs: same panels, different units.
    """
    fig = Figure(figsize=(13, 3.8))
    axes = fig.subplots(1, len(CURVE_PANELS))
    for ax, (key, label) in zip(axes, CURVE_PANELS):
        for name, history in histories.items():
            steps, values = curve(history, key, relative=key == "loss")
            ax.plot(steps, values, "--" if name in dashed else "-", label=name)
        if key == "rewards/margins":
            ax.axhline(0.0, color="gray", linestyle=":", linewidth=1)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
    return fig
