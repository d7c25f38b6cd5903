"""Beyond DPO (notebook 08): the same short run with other preference losses, compared on held-out pairs.

Every variant starts from the same point - the profile's base model, a fresh LoRA adapter, the same seed and
the same formatted pairs - and only the loss changes. DPO-family losses are TRL ``DPOTrainer`` ``loss_type``s
(the profile with the loss swapped, :func:`variant_profile`); ORPO is TRL's reference-free
``trl.experimental.orpo.ORPOTrainer`` (:func:`train_orpo`).

All DPO-family variants share one reference: the base model (the adapter switched off) on the same pairs. So its
log-probabilities are computed once (:func:`shared_reference`, TRL's own ``precompute_ref_log_probs`` pass) and
every run reads them from its train set (:class:`SharedReferenceDPOTrainer`). :data:`PLANS` says per profile how
many steps, which variants and which βs notebook 08 runs; :func:`evaluate_variant` measures each trained adapter the
way notebook 06 measures the course's model, and :func:`plot_variant_curves` overlays the logs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure
from trl import DPOTrainer
from trl.experimental.orpo import ORPOConfig, ORPOTrainer

from helpers.data import PreparedData
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
    dpo_trainer,
    pairs_only,
    set_seed,
    train_dpo,
    train_with,
    with_training_overrides,
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
REFERENCE_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")  # where TRL keeps precomputed reference log-probs


# --- how much notebook 08 runs, per profile ------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """The costly knobs of notebook 08 on one profile, chosen so that the notebook fits its time slot."""

    steps: int  # optimizer steps of every run
    variants: tuple[str, ...]  # keys of VARIANTS, in the order they run
    sweep_betas: tuple[float, ...]  # extra βs for plain sigmoid DPO (the profile's own β is the `sigmoid` run)
    answers: int  # held-out prompts answered greedily for the well-formed share (the first ones of the split)
    reference_batch_size: int  # pairs per batch of the one reference pass (no gradients)
    cost: str  # what the notebook costs with this plan, and whether that was measured
    training: Mapping[str, Any] = field(default_factory=dict)  # TrainingSettings the short runs change

    def run_profile(self, profile: Profile) -> Profile:
        """The profile every run of the comparison trains with: ``steps`` steps and the plan's training changes."""
        return profile.replace("training", **{**self.training, "max_steps": self.steps})

    def pairs_per_run(self, profile: Profile) -> int:
        """Training pairs one run draws: ``steps`` x the pairs of one optimizer step (of :meth:`run_profile`)."""
        t = self.run_profile(profile).training
        return self.steps * t.per_device_train_batch_size * t.gradient_accumulation_steps


# The comparison's runs are short: 60 optimizer steps of 4 pairs (the profile's micro-batch, nothing accumulated)
# at a constant learning rate after the warm-up. A cosine schedule's mean learning rate is half its peak, so these
# 60 steps move the adapter about as far as 100 cosine steps would, at 4 pairs a step instead of 16.
SHORT_RUNS = {"gradient_accumulation_steps": 1, "lr_scheduler_type": "constant_with_warmup"}

PLANS: dict[str, Plan] = {
    # every loss and a two-point β sweep: 9 runs
    "tiny": Plan(steps=60, variants=DEFAULT_VARIANTS, sweep_betas=(0.01, 0.5), answers=48, reference_batch_size=64,
                 cost="about 90 s on 2 shared CPU cores (measured)", training=SHORT_RUNS),
    # three losses of different kinds and one more β: 4 runs, each about 5 minutes of training (estimated)
    "t4": Plan(steps=60, variants=("sigmoid", "ipo", ORPO), sweep_betas=(0.01,), answers=32, reference_batch_size=16,
               cost="about 35 minutes on a free Colab T4 (estimated, not measured)", training=SHORT_RUNS),
    "full": Plan(steps=60, variants=("sigmoid", "ipo", ORPO), sweep_betas=(0.01,), answers=32,
                 reference_batch_size=16, cost="about 40 minutes on an A100 (estimated, not measured)",
                 training=SHORT_RUNS),
}


def plan_for(profile: Profile, *, steps: int | None = None, variants: Sequence[str] | None = None,
             sweep_betas: Sequence[float] | None = None) -> Plan:
    """The profile's :data:`PLANS` entry with the knobs a notebook sets (``None`` keeps the profile's default).

    Refuses unknown variant names, and a β sweep without the ``sigmoid`` run it is compared with.
    """
    if profile.name not in PLANS:
        raise ValueError(f"no plan for profile {profile.name!r}; known: {sorted(PLANS)}")
    plan = PLANS[profile.name]
    changes: dict[str, Any] = {}
    if steps is not None:
        if steps < 1:
            raise ValueError(f"steps must be at least 1, not {steps}")
        changes["steps"] = int(steps)
    if variants is not None:
        unknown = [name for name in variants if name not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown variants {unknown}; known: {list(VARIANTS)}")
        changes["variants"] = tuple(variants)
    if sweep_betas is not None:
        changes["sweep_betas"] = tuple(float(b) for b in sweep_betas)
    plan = dataclasses.replace(plan, **changes)
    if plan.sweep_betas and "sigmoid" not in plan.variants:
        raise ValueError("the β sweep is compared with the `sigmoid` run at the profile's β: add 'sigmoid' to the "
                         "variants, or sweep no βs (sweep_betas=())")
    return plan


def comparison_data(profile: Profile, data: PreparedData, plan: Plan) -> PreparedData:
    """``data`` with its train split cut to the pairs one run draws (:meth:`Plan.pairs_per_run`), so that each run
    sees each of its pairs once and the reference pass scores no pair that no run trains on."""
    keep = min(len(data.train), plan.pairs_per_run(profile))
    return PreparedData(data.train.select(range(keep)), data.heldout, data.heldout_rows, data.length_report)


# --- one reference pass for every DPO-family variant ---------------------------------------------------------


class SharedReferenceDPOTrainer(DPOTrainer):
    """TRL's ``DPOTrainer`` that reads the reference log-probs from its train set when they are already there.

    With ``precompute_ref_log_probs=True`` TRL 1.16 runs its reference pass in ``__init__`` (``_precompute_ref_logps``)
    whatever the train set holds: it scores every pair again, then fails to add the columns a second time
    ("The table can't have duplicated columns"); with ``False`` it ignores the columns and runs the reference
    forward at every step. This trainer keeps a train set that already has ``ref_chosen_logps`` and
    ``ref_rejected_logps`` (:func:`shared_reference`) as it is, and TRL's loss then reads them from each batch,
    as after its own pass; without them it is TRL's trainer unchanged.
    """

    def _precompute_ref_logps(self, dataset, name: str, batch_size: int):
        if set(REFERENCE_COLUMNS) <= set(dataset.column_names):
            return dataset
        return super()._precompute_ref_logps(dataset, name, batch_size)


def shared_reference(profile: Profile, train, *, batch_size: int = 64):
    """The train pairs with their reference log-probs, computed once by TRL for every DPO-family variant.

    Every variant's reference is the same network - the profile's base model, its adapter off - on the same pairs,
    so their log-probs are the same numbers. A trainer is built as a run builds it (seed, base model, LoRA) with
    ``precompute_ref_log_probs=True``, which makes TRL score all of ``train`` (``batch_size`` pairs at a time);
    its tokenised train set then carries ``ref_chosen_logps`` and ``ref_rejected_logps`` ([pairs] each, summed
    over each answer's tokens) and is returned. Pass it to :func:`train_variant` as ``reference``.
    """
    set_seed(profile.training.seed)
    source = model_source(profile)
    tokenizer = load_tokenizer(profile, source)
    model = load_model(profile, source=source)
    with tempfile.TemporaryDirectory() as scratch:  # nothing is trained or saved
        trainer = dpo_trainer(variant_profile(profile, "sigmoid"), model, tokenizer, train, scratch,
                              trainer_class=SharedReferenceDPOTrainer, precompute_ref_batch_size=batch_size)
    return trainer.train_dataset


def variant_profile(profile: Profile, variant: Variant | str, *, beta: float | None = None) -> Profile:
    """The profile with only the preference loss changed (and ``beta`` where given); everything else stays.

    The reference log-probs are precomputed (``precompute_ref_log_probs=True``; already so on ``tiny``): the
    comparison computes them once for all variants (:func:`shared_reference`).
    """
    variant = VARIANTS[variant] if isinstance(variant, str) else variant
    changes: dict[str, Any] = {"loss_type": variant.loss_type or profile.dpo.loss_type, "loss_weights": None,
                               "precompute_ref_log_probs": True}
    if beta is not None:
        changes["beta"] = beta
    return profile.replace("dpo", **changes)


RUN_ID_TAG = "08"  # in every run id of the comparison: its short runs never land in another notebook's run folder


def variant_run_id(run_id: str, name: str) -> str:
    """``<run_id>-08-<name>`` with anything but ASCII letters, digits, ``-``, ``_`` and ``.`` replaced by ``-``
    (``sigmoid+sft`` -> ``main-08-sigmoid-sft``). The tag keeps the comparison's ``sigmoid`` run out of
    notebook 06's plain-DPO folder (``main-sigmoid``), which holds a run of other settings."""
    safe = "".join(c if (c.isascii() and c.isalnum()) or c in "-_." else "-" for c in name)
    return f"{run_id}-{RUN_ID_TAG}-{safe}"


def orpo_config(profile: Profile, output_dir: str | Path, **overrides: Any) -> ORPOConfig:
    """A TRL ``ORPOConfig`` with the profile's batch, optimiser, schedule, precision and seed.

    ORPO's own ``beta`` is the paper's λ, the weight of the odds-ratio term next to the NLL term (not a KL
    strength); the profile's β (0.1) happens to be the paper's λ too. DPO-only fields are left out.
    """
    kwargs = dpo_config_kwargs(profile, output_dir)
    for dpo_only in ("loss_type", "loss_weights", "precompute_ref_log_probs", "precompute_ref_batch_size"):
        kwargs.pop(dpo_only)  # ORPO has no reference model
    kwargs["remove_unused_columns"] = False  # ORPO's collator reads its own tokenised columns
    kwargs.update(overrides)
    return ORPOConfig(**kwargs)


def train_orpo(profile: Profile, run_folder: str | Path, *, data, progress: bool = True, **overrides: Any
               ) -> TrainOutcome:
    """Train the profile's LoRA adapter with TRL's ORPO (reference-free) and save it as :func:`train_dpo` does:
    the same sequence (:func:`helpers.training.train_with`), another trainer. ``overrides`` are ``ORPOConfig``
    fields."""
    if not progress:
        overrides.setdefault("disable_tqdm", True)

    def build(model, tokenizer):
        return ORPOTrainer(
            model=model,
            args=orpo_config(profile, Path(run_folder) / CHECKPOINTS_DIRNAME, **overrides),
            train_dataset=pairs_only(data.train),
            processing_class=tokenizer,
            peft_config=lora_config(profile),
        )

    return train_with(profile, run_folder, build, progress=progress, desc="ORPO steps")


def train_on_reference(profile: Profile, run_folder: str | Path, reference, *, progress: bool = True,
                       **overrides: Any) -> TrainOutcome:
    """Train a DPO-family variant on ``reference`` (:func:`shared_reference`), its reference log-probs included.

    The sequence of :func:`helpers.training.train_dpo` (:func:`helpers.training.train_with`); only the trainer
    (:class:`SharedReferenceDPOTrainer`) and its train set differ: no reference pass, none before and none per step.
    """
    missing = [c for c in REFERENCE_COLUMNS if c not in reference.column_names]
    if missing:
        raise ValueError(f"the reference train set lacks {missing}: build it with shared_reference()")
    profile = with_training_overrides(profile, overrides)

    def build(model, tokenizer):
        return dpo_trainer(profile, model, tokenizer, reference, Path(run_folder) / CHECKPOINTS_DIRNAME,
                           progress=progress, trainer_class=SharedReferenceDPOTrainer,
                           keep_columns=REFERENCE_COLUMNS, **overrides)

    return train_with(profile, run_folder, build, progress=progress,
                      desc=f"DPO steps ({'+'.join(profile.dpo.loss_type)})")


def train_variant(
    profile: Profile, name: str, run_folder: str | Path, *, data, max_steps: int, beta: float | None = None,
    reference=None, progress: bool = True, **overrides: Any,
) -> TrainOutcome:
    """Train one variant from the base model: a DPO ``loss_type``, or ORPO.

    A DPO-family variant reads its reference log-probs from ``reference`` (:func:`shared_reference`) when given;
    without it TRL computes them itself before training (:func:`helpers.training.train_dpo`): the same numbers.
    No checkpoints are written (``save_strategy="no"``); the adapter and the log are, as for every run.
    """
    variant = VARIANTS[name]
    settings = {**variant.overrides, **overrides, "max_steps": max_steps, "save_strategy": "no"}
    if variant.reference_free:
        if beta is not None:
            settings["beta"] = beta
        return train_orpo(profile, run_folder, data=data, progress=progress, **settings)
    changed = variant_profile(profile, variant, beta=beta)
    if reference is None:
        return train_dpo(changed, run_folder, data=data, progress=progress, **settings)
    return train_on_reference(changed, run_folder, reference, progress=progress, **settings)


def seconds_per_step(outcome: TrainOutcome) -> float:
    """Wall-clock seconds per optimizer step of a training run (load and save not included)."""
    return outcome.seconds / max(1, outcome.steps)


def evaluate_variant(model, tokenizer, data, base_scores, beta: float, *, answers: int | None = None,
                     max_new_tokens: int | None = None) -> dict:
    """Held-out preference accuracy (per token and summed), implicit-reward margin and generation health.

    ``model`` is the trained PEFT model itself (no merge needed); ``base_scores`` are the base model's
    :func:`helpers.evaluation.score_pairs` on the same held-out pairs, the reference of the implicit reward
    β·(log π − log π_ref). ``margin_nats`` is the same margin without β (Δ, in nats), comparable across βs.
    Every held-out pair is scored; the well-formed share comes from greedy answers to the first ``answers``
    held-out prompts (all when None): generating is the evaluation's slowest part.
    """
    model.eval()
    scores = score_pairs(model, tokenizer, data.heldout)
    accuracy = preference_accuracy(scores)
    rewards = implicit_rewards(scores, base_scores, beta)
    count = len(data.heldout) if answers is None else min(answers, len(data.heldout))
    prompts = list(data.heldout["prompt"])[:count]
    gens = greedy_generate(model, tokenizer, prompts, **({"max_new_tokens": max_new_tokens} if max_new_tokens else {}))
    health = generation_health(gens, data.heldout_rows[:count])
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
        "answers": count,
        "sample": gens[0].text,
    }


@dataclass
class Comparison:
    """Runs variants from one starting point and keeps, for each, its evaluation row and its training log.

    ``base_scores`` are the base model's held-out scores (the reference of every implicit reward); ``reference``
    the train pairs with their reference log-probs (:func:`shared_reference`), shared by the DPO-family runs
    (None: each run computes its own); ``answers`` how many held-out prompts are answered for the well-formed share.
    Runs go to ``run_dir(profile.name, f"{run_id}-{label}")``.
    """

    profile: Profile
    data: Any
    tokenizer: Any
    base_scores: Any
    run_id: str = "main"
    steps: int = 100
    reference: Any = None
    answers: int | None = None
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
                                reference=self.reference, progress=progress, **overrides)
        row = evaluate_variant(outcome.model, self.tokenizer, self.data, self.base_scores, used_beta,
                               answers=self.answers)
        row.update(beta=used_beta, steps=outcome.steps, seconds_per_step=seconds_per_step(outcome))
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
    """One line per run: held-out accuracy, margin, well-formed share (of how many answers) and speed."""
    speed = row.get("seconds_per_step")
    return (f"{label}: held-out accuracy {row['accuracy_per_token']:.3f} (per token), implicit-reward margin "
            f"{row['margin']:+.2f}, well-formed {row['well_formed']:.0%}"
            + (f" of {row['answers']}" if "answers" in row else "")
            + (f", {speed:.2f} s/step" if speed is not None else ""))


TABLE_COLUMNS = {
    "accuracy_per_token": "held-out acc. (per token)",
    "margin": "implicit-reward margin",
    "chosen_logp_change": "Δ log p(chosen)",
    "well_formed": "well-formed",
    "follows_rule": "follows rule",
    "seconds_per_step": "s / step",
}


def results_table(rows: Mapping[str, Mapping[str, float]], columns: Mapping[str, str] | None = None, digits: int = 3):
    """A pandas DataFrame, one row per variant, with the comparison's columns (renamed for display).

    Rounded as Python's ``f"{value:.3f}"`` rounds (the printed summary lines), not half-to-even as pandas' ``round``
    does: one number, one rounding (0.8625 is 0.863 in both).
    """
    columns = dict(columns or TABLE_COLUMNS)
    frame = pd.DataFrame.from_dict({name: dict(row) for name, row in rows.items()}, orient="index")
    present = [c for c in columns if c in frame.columns]
    table = frame[present].rename(columns=columns).astype(float)
    return table.map(lambda value: float(f"{value:.{digits}f}"))


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
