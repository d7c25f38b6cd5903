"""Evaluation (notebook 06): what the course reports about a trained model, and the real lm-evaluation-harness.

The measurements themselves live in :mod:`helpers.scoring` (held-out preference accuracy, implicit rewards, greedy
answers and their health). This module puts them together the way notebook 06 and the seeded comparison
(``python -m benchmarks.seeds 06``) report them - one row of numbers per model, the answers side by side, the
lengths - and prepares what ``lm_eval.simple_evaluate`` (called in notebook 06's own cell) needs: a
``TaskManager`` that knows the course's own task, quiet logs, and its output as plain numbers.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from lm_eval.tasks import TaskManager

from helpers.profiles import COURSE_TASK
from helpers.scoring import Generation, PairScores, by_kind, mean_words, preference_accuracy

TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"  # the course's task: data/heldout.jsonl as pairs
QUIET = ("lm_eval", "lm-eval", "transformers", "datasets", "huggingface_hub", "accelerate")
# The numbers of one model's row (notebook 06's table and its NN_results.json), with their labels.
ROW_METRICS = {"accuracy": "held-out accuracy (per token)", "well_formed": "well-formed answers",
               "follows_rule": "answers that follow their rule",
               "chosen_logp_change": "change of log p(chosen), nats"}


def model_row(scores: PairScores, health: Mapping[str, Any], base: PairScores | None = None) -> dict[str, float]:
    """One model's numbers on the held-out pairs: preference accuracy (per token and summed), the shares of
    well-formed answers and of answers that follow their pair's rule, and how far the chosen answers' summed
    log-likelihood moved from ``base`` (mean over pairs, in nats; 0 for the base itself)."""
    accuracy = preference_accuracy(scores)
    change = 0.0 if base is None else (scores.chosen_sum - base.chosen_sum).mean().item()
    return {"accuracy": accuracy["per_token"], "accuracy_sum": accuracy["sum"],
            "well_formed": float(health["well_formed"]), "follows_rule": float(health["follows_rule"]),
            "chosen_logp_change": change}


def side_by_side(base: Sequence[Generation], dpo: Sequence[Generation], rows: Sequence[Mapping[str, Any]],
                 n: int = 5) -> list[dict[str, str]]:
    """``n`` held-out prompts with the base model's and the DPO model's greedy answers, the kinds taken in turn
    (the first pair of each kind, then the second of each, ...), so every kind of pair shows up."""
    queues: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        queues.setdefault(row["kind"], []).append(i)
    order: list[int] = []
    while any(queues.values()) and len(order) < n:
        for queue in queues.values():
            if queue and len(order) < n:
                order.append(queue.pop(0))
    return [{"kind": rows[i]["kind"], "system": rows[i]["system"], "question": rows[i]["question"],
             "base": base[i].text, "dpo": dpo[i].text} for i in order]


def length_table(rows: Sequence[Mapping[str, Any]], **answers: Sequence[Generation]) -> dict[str, dict[str, float]]:
    """Mean words per kind of pair: the pairs' chosen and rejected answers, and each model's greedy answers
    (``length_table(rows, base=..., dpo=...)``), overall in the row ``all``."""
    kinds = [row["kind"] for row in rows]
    columns = {"chosen": [r["chosen"] for r in rows], "rejected": [r["rejected"] for r in rows],
               **{name: [g.text for g in gens] for name, gens in answers.items()}}
    table = {name: by_kind([mean_words([t]) for t in texts], kinds) for name, texts in columns.items()}
    for name, texts in columns.items():
        table[name]["all"] = mean_words(texts)
    return {kind: {name: table[name][kind] for name in columns} for kind in table["chosen"]}


# --- lm-evaluation-harness --------------------------------------------------------------------------------------


def task_manager(tasks: Sequence[str]) -> TaskManager:
    """An lm-eval ``TaskManager`` that knows the course's task (``helpers/lm_eval_tasks``).

    lm-eval's thousands of built-in task files are indexed (several seconds) only when ``tasks`` asks for one of
    them (the card's suite on the GPU profiles). An unknown task name is refused here, naming it.
    """
    if isinstance(tasks, str) or not tasks:
        raise ValueError(f"tasks must be a non-empty list of task names, not {tasks!r}")
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    if not set(tasks) <= set(manager.all_tasks):
        manager = TaskManager(include_path=str(TASKS_DIR))
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"lm-eval knows no task {', '.join(map(repr, unknown))}; the course's own task is "
                         f"{COURSE_TASK!r}, and `lm_eval ls tasks` lists the built-in ones")
    return manager


@contextlib.contextmanager
def quiet_lm_eval(progress: bool = False) -> Iterator[None]:
    """lm-eval's (and the Hugging Face libraries') logs off for the block; errors still show.

    Without ``progress`` its progress bars (several per model) go to a buffer, whose last lines are printed if the
    evaluation fails; with it they show (worth it for the card's suite, which takes an hour on a GPU).
    """
    loggers = [logging.getLogger(name) for name in QUIET]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stderr(sys.stderr if progress else buffer):
            yield
    except Exception:
        print("\n".join(buffer.getvalue().splitlines()[-20:]), file=sys.stderr)
        raise
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def plain_metrics(output: Mapping[str, Any] | None) -> dict[str, dict[str, float]]:
    """``simple_evaluate``'s output as ``{task: {metric: value}}`` (``"acc,none"`` becomes ``"acc"``; numbers only).

    A group (``agieval_nous``) reports its aggregate, each subtask its own entry. None (what the other processes of
    a multi-process run get) gives ``{}``.
    """
    found: dict[str, dict[str, float]] = {}
    for task, entry in (output or {}).get("results", {}).items():
        metrics = {}
        for key, value in entry.items():
            if "," in key and isinstance(value, int | float) and not isinstance(value, bool):
                metric, _, how = key.partition(",")
                metrics[metric if how == "none" else key] = float(value)
        found[task] = metrics
    return found


def lm_eval_table(outputs: Mapping[str, Mapping[str, Any] | None], metrics: Mapping[str, str]
                  ) -> dict[str, dict[str, float]]:
    """``{task: {model: value}}``: for each task, the metric the card reports (``profile.lm_eval["metrics"]``) of
    each model's ``simple_evaluate`` output (``outputs``: ``{model name: output}``)."""
    plain = {name: plain_metrics(output) for name, output in outputs.items()}
    table: dict[str, dict[str, float]] = {}
    for task, metric in metrics.items():
        for name, results in plain.items():
            if metric not in results.get(task, {}):
                raise KeyError(f"lm-eval reported no {metric!r} for {task!r} of {name!r}: it reported "
                               f"{sorted(results.get(task, {}))}")
            table.setdefault(task, {})[name] = results[task][metric]
    return table
