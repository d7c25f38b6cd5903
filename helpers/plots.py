"""The course's shared figures, saved as PNG into a run folder and shown by the notebooks from the saved file.

Figures are built with ``matplotlib.figure.Figure`` (not ``pyplot``): no global figure state, and each plot shows
exactly once. A notebook's own figures live in its module; the ones several notebooks draw are here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

DPI = 80  # small PNGs: the notebooks commit their outputs
PANELS = (("loss", "loss"), ("rewards/chosen", "reward of chosen"), ("rewards/rejected", "reward of rejected"),
          ("rewards/margins", "reward margin"), ("rewards/accuracies", "reward accuracy (training batch)"),
          ("logps/chosen", "log-prob of chosen (solid) / rejected (faint)"))


def save_figure(fig: Figure, path: str | Path | None) -> Path | None:
    """Write ``fig`` as PNG to ``path`` (folders made); returns the path, or None when not saving."""
    if path is None:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def plot_training_curves(history: Sequence[Mapping[str, float]], path: str | Path | None = None, *,
                         title: str = "DPO training", loss_type: Sequence[str] = ("sigmoid",),
                         others: Mapping[str, Sequence[Mapping[str, float]]] | None = None) -> Figure:
    """A trainer's log (``trainer.state.log_history``) as six panels: loss, rewards, margins, accuracies, log-probs.

    The loss panel marks ln 2, where sigmoid DPO starts (policy = reference), only when the loss is sigmoid DPO
    alone: another loss, or an added SFT term, starts elsewhere. ``others`` are more runs, drawn dashed.
    """
    runs = {"this run": history, **(others or {})}
    fig = Figure(figsize=(12, 6))
    axes = fig.subplots(2, 3).ravel()
    for ax, (key, label) in zip(axes, PANELS):
        for index, (name, rows) in enumerate(runs.items()):
            rows = [r for r in rows if key in r and "step" in r]
            style, colour = ("-" if index == 0 else "--"), f"C{index}"
            ax.plot([r["step"] for r in rows], [r[key] for r in rows], style, color=colour, label=name)
            if key == "logps/chosen":
                ax.plot([r["step"] for r in rows], [r["logps/rejected"] for r in rows], style, color=colour, alpha=0.4)
        if key == "loss" and list(loss_type) == ["sigmoid"]:
            ax.axhline(math.log(2), color="gray", linestyle=":", label="ln 2: sigmoid DPO at step 0")
        if key == "loss" or (key == "logps/chosen" and others):
            ax.legend(fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
    return fig


def plot_with_spread(seeds: Mapping[str, Mapping[str, Sequence[float]]], metrics: Mapping[str, str],
                     path: str | Path | None = None, *, mine: Mapping[str, Mapping[str, float]] | None = None,
                     title: str = "", note: str = "") -> Figure:
    """One panel per metric, one bar per run: the mean over seeds, the whisker from the lowest to the highest seed,
    each seed a grey dot; ``mine`` (this notebook's own run) a red diamond on top.

    ``seeds``: ``{run: {metric: [value per seed]}}`` (a benchmark's committed result); ``metrics``: ``{key: label}``.
    """
    names = list(seeds)
    fig = Figure(figsize=(max(7.0, 1.2 * len(names) * len(metrics)), 3.8))
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, (key, label) in zip(axes, metrics.items()):
        for x, name in enumerate(names):
            values = [float(v) for v in seeds[name][key]]
            mean = sum(values) / len(values)
            ax.bar(x, mean, color=f"C{x % 10}", alpha=0.5)
            ax.errorbar(x, mean, yerr=[[mean - min(values)], [max(values) - mean]], color="black", capsize=4)
            ax.scatter([x] * len(values), values, color="#555555", s=10, zorder=3)
            if mine and name in mine and key in mine[name]:
                ax.scatter([x], [mine[name][key]], color="#c44e52", marker="D", s=30, zorder=4,
                           label="this notebook's run" if x == 0 else None)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(label, fontsize=10)
    if mine:
        axes[0].legend(fontsize=8, loc="lower left")
    n = len(next(iter(next(iter(seeds.values())).values())))
    fig.suptitle(f"{title} - mean of {n} seeds, whiskers from the lowest to the highest seed" + (f"\n{note}" if note
                                                                                                  else ""))
    fig.tight_layout()
    save_figure(fig, path)
    return fig


def spread_table(seeds: Mapping[str, Mapping[str, Sequence[float]]], metrics: Mapping[str, str], digits: int = 2):
    """``seeds`` (as for :func:`plot_with_spread`) as a pandas table: each metric as "mean (lowest-highest)"."""
    def cell(values: Sequence[float]) -> str:
        values = [float(v) for v in values]
        return f"{sum(values) / len(values):.{digits}f} ({min(values):.{digits}f} to {max(values):.{digits}f})"

    return pd.DataFrame({label: {name: cell(seeds[name][key]) for name in seeds} for key, label in metrics.items()})
