"""Plots of the course, saved as PNG into a run folder and shown inline by the notebooks.

Figures are built with ``matplotlib.figure.Figure`` (not ``pyplot``), so no global figure state is kept
and a notebook shows each plot exactly once, from the saved file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure

# --- notebooks 01-03 -------------------------------------------------------------------------------

DPI = 80  # small PNGs: the notebooks commit their outputs


def save_figure(fig: Figure, path: str | Path | None) -> Path | None:
    """Write ``fig`` as PNG to ``path`` (folders created); returns the path, or None when not saving."""
    if path is None:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def plot_token_lengths(
    prompt_tokens: Sequence[int],
    pair_tokens: Sequence[int],
    max_prompt_length: int,
    max_length: int,
    path: str | Path | None = None,
) -> Figure:
    """Histograms of prompt lengths and pair lengths (prompt + longer answer) with the profile's limits.

    Notebook 01: pairs right of a dashed line would be dropped by ``helpers.chatml.filter_by_length``.
    """
    fig = Figure(figsize=(9, 3.2))
    panels = fig.subplots(1, 2)
    series = [
        (prompt_tokens, max_prompt_length, "prompt", "max_prompt_length"),
        (pair_tokens, max_length, "prompt + longer answer", "max_length"),
    ]
    for ax, (values, limit, what, name) in zip(panels, series):
        values = list(values)
        over = sum(1 for v in values if v > limit)
        ax.hist(values, bins=30, color="#4c72b0", label=f"pairs ({over} over the limit)")
        ax.axvline(limit, color="#c44e52", linestyle="--", label=f"{name} = {limit} tokens")
        ax.set_xlabel(f"{what} (tokens)")
        ax.set_ylabel("pairs")
        ax.legend(loc="upper right", fontsize=8)
    fig.suptitle(f"Token lengths of {len(prompt_tokens)} pairs (dashed: the limit; longer pairs are dropped)")
    fig.tight_layout()
    save_figure(fig, path)
    return fig


def plot_memory_table(rows, path: str | Path | None = None, title: str = "Mistral-7B: memory") -> Figure:
    """Horizontal bars of a ``helpers.loading.memory_table`` in GiB, labelled with the table's own rounding (2
    decimals); the parts summed into the QLoRA training total in one colour, everything else in another."""
    from matplotlib.patches import Patch

    recipe_colour, other_colour = "#dd8452", "#4c72b0"
    fig = Figure(figsize=(8.5, 0.4 * len(rows) + 1.4))
    ax = fig.subplots()
    labels = [r.item for r in rows][::-1]
    sizes = [r.gib for r in rows][::-1]
    colours = [recipe_colour if r.part_of_recipe else other_colour for r in rows][::-1]
    bars = ax.barh(labels, sizes, color=colours)
    for bar, size in zip(bars, sizes):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {size:.2f}", va="center", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("GiB (2**30 bytes), log scale")
    ax.legend(
        handles=[
            Patch(color=recipe_colour, label="held during QLoRA training (summed in the total)"),
            Patch(color=other_colour, label="the total, and alternatives for comparison"),
        ],
        loc="lower right",
        fontsize=8,
    )
    ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, path)
    return fig


# --- notebooks 04-06 -------------------------------------------------------------------------------

TRAINING_PANELS = (
    ("loss", "loss"),
    ("rewards/chosen", "reward of chosen"),
    ("rewards/rejected", "reward of rejected"),
    ("rewards/margins", "reward margin"),
    ("rewards/accuracies", "reward accuracy"),
    ("logps/chosen", "log-prob of chosen / rejected"),
)


def plot_training_curves(
    history: Sequence[dict], path: str | Path | None = None, title: str = "DPO training", others: dict | None = None
) -> Figure:
    """The trainer's log as six panels: loss (ln 2 marked), rewards, margins, accuracies, log-probs.

    ``others`` maps a label to another run's history, drawn dashed on the same panels for comparison.
    """
    import math

    runs = {"this run": history, **(others or {})}
    fig = Figure(figsize=(12, 6))
    axes = fig.subplots(2, 3).ravel()
    for ax, (key, label) in zip(axes, TRAINING_PANELS):
        for index, (name, rows) in enumerate(runs.items()):
            steps = [r["step"] for r in rows if key in r]
            style = "-" if index == 0 else "--"
            ax.plot(steps, [r[key] for r in rows if key in r], style, label=name if key == "loss" else None)
            if key == "logps/chosen":
                ax.plot(steps, [r["logps/rejected"] for r in rows if key in r], style, alpha=0.6)
        if key == "loss":
            ax.axhline(math.log(2), color="gray", linestyle=":", label="ln 2 (step 0)")
            ax.legend(fontsize=8)
        if key == "logps/chosen":
            ax.legend(["chosen", "rejected"], fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
    return fig


def plot_results(results: dict, path: str | Path | None = None) -> Figure:
    """Base vs DPO bars like the model card's: held-out accuracy overall and per kind, well-formed answers, lm-eval."""
    acc = results["heldout_preference_accuracy"]
    labels = ["held-out accuracy"] + [k.replace("_vs_", " vs\n").replace("_", " ") for k in acc["by_kind"]]
    base = [acc["base"]] + [v["base"] for v in acc["by_kind"].values()]
    dpo = [acc["dpo"]] + [v["dpo"] for v in acc["by_kind"].values()]
    labels.append("well-formed\nanswers")
    base.append(results["well_formed"]["base"])
    dpo.append(results["well_formed"]["dpo"])
    for task, pair in results.get("lm_eval", {}).items():
        labels.append(f"lm-eval\n{task}")
        base.append(pair["base"])
        dpo.append(pair["dpo"])
    fig = Figure(figsize=(max(8, 1.2 * len(labels)), 3.6))
    ax = fig.subplots()
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], base, width=0.4, label="base", color="#8c8c8c")
    bars = ax.bar([x + 0.2 for x in xs], dpo, width=0.4, label="DPO (merged)", color="#dd8452")
    for bar, value in zip(bars, dpo):
        ax.text(bar.get_x() + bar.get_width() / 2, value, f"{value:.2f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.legend(fontsize=8)
    ax.set_title(f"Base vs DPO on the held-out pairs (profile {results.get('profile', '?')})")
    fig.tight_layout()
    save_figure(fig, path)
    return fig
