"""The real lm-evaluation-harness (lm_eval 0.4.x), run from the course.

Two kinds of evaluation go through the same code:

- ``tiny``: ``course_preferences``, the course's own held-out preference pairs as an lm_eval
  multiple-choice task (``helpers/lm_eval_tasks/``); it runs offline on CPU in seconds and its ``acc``
  is exactly the summed log-likelihood preference accuracy of :mod:`helpers.evaluation`.
- ``t4`` / ``full``: the suite NeuralHermes-2.5's model card reports (Nous' AGIEval, GPT4All and
  TruthfulQA), with the metric the leaderboard used for each task. It downloads its data sets.

Typical use (notebook 06)::

    from helpers.harness import compare_models, tasks_for_profile
    lm_eval_block = compare_models(base_path, dpo_path, tasks_for_profile(profile))
    # {"course_preferences": {"base": 0.69, "dpo": 0.81}}
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from helpers.paths import DATA_DIR, REPO_ROOT

TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
HELDOUT_FILE = DATA_DIR / "heldout.jsonl"
# How the task YAMLs name the held-out data: relative to the repository root (see course_preferences.yaml).
_RELATIVE_DATA_FILE = HELDOUT_FILE.relative_to(REPO_ROOT).as_posix()

COURSE_TASK = "course_preferences"
COURSE_TASK_BY_KIND = "course_preferences_by_kind"

# NeuralHermes-2.5's model card: Nous' benchmark suite, with the metric reported for each task
# (acc_norm where the leaderboard used it, else acc; mc2 for TruthfulQA).
GPU_SUITE: dict[str, list[tuple[str, str]]] = {
    "AGIEval": [("agieval_nous", "acc_norm")],
    "GPT4All": [
        ("arc_challenge", "acc_norm"),
        ("arc_easy", "acc_norm"),
        ("boolq", "acc"),
        ("hellaswag", "acc_norm"),
        ("openbookqa", "acc_norm"),
        ("piqa", "acc_norm"),
        ("winogrande", "acc"),
    ],
    "TruthfulQA": [("truthfulqa_mc2", "mc2")],
}

# The one number reported per task (compare_models); tasks not listed fall back to acc_norm, then acc.
HEADLINE_METRICS: dict[str, str] = {
    COURSE_TASK: "acc",
    COURSE_TASK_BY_KIND: "acc",
    **{task: metric for tasks in GPU_SUITE.values() for task, metric in tasks},
}

_QUIET_LOGGERS = ("lm_eval", "transformers", "datasets", "huggingface_hub", "accelerate")


def suite_tasks() -> list[str]:
    """The nine task names of :data:`GPU_SUITE`, in the model card's order."""
    return [task for tasks in GPU_SUITE.values() for task, _ in tasks]


def tasks_for_profile(profile: Any) -> list[str]:
    """The lm_eval tasks a profile runs: ``tiny`` -> the course's own task; ``t4`` / ``full`` -> the suite.

    ``profile`` is a :class:`helpers.profiles.Profile` or its name.
    """
    name = str(getattr(profile, "name", profile)).strip().lower()
    if name == "tiny":
        return [COURSE_TASK]
    if name in {"t4", "full"}:
        return suite_tasks()
    raise ValueError(f"unknown profile {name!r}; choose one of tiny, t4, full")


@contextlib.contextmanager
def course_task_dir() -> Iterator[Path]:
    """A temporary copy of ``helpers/lm_eval_tasks`` whose data path is absolute, for ``include_path``.

    The YAMLs name ``data/heldout.jsonl`` relative to the repository root (so the lm_eval CLI works from
    there); the copy points at the absolute path, so the evaluation works from any working directory
    without ``os.chdir``.
    """
    with tempfile.TemporaryDirectory(prefix="course-lm-eval-tasks-") as tmp:
        folder = Path(tmp) / "lm_eval_tasks"
        shutil.copytree(TASKS_DIR, folder, ignore=shutil.ignore_patterns("__pycache__"))
        main = folder / f"{COURSE_TASK}.yaml"
        text = main.read_text(encoding="utf-8")
        needle = f"test: {_RELATIVE_DATA_FILE}"
        if text.count(needle) != 1:
            raise RuntimeError(f"{TASKS_DIR / main.name} should name its data as {needle!r} exactly once")
        main.write_text(text.replace(needle, f"test: {HELDOUT_FILE.as_posix()}"), encoding="utf-8")
        yield folder


def make_task_manager(include_path: str | Path | Sequence[str | Path], *, include_defaults: bool = True):
    """An ``lm_eval.tasks.TaskManager`` over the folders in ``include_path`` (plus lm_eval's built-in tasks).

    Indexing the thousands of built-in task YAMLs takes several seconds; ``include_defaults=False``
    skips it when only the course's own tasks are needed.
    """
    from lm_eval.tasks import TaskManager

    paths = [include_path] if isinstance(include_path, str | Path) else list(include_path)
    return TaskManager(include_path=[str(p) for p in paths], include_defaults=include_defaults)


def _task_manager_for(tasks: Sequence[str], include_path: Sequence[str | Path]):
    """The course's folders alone when they hold every requested task (fast), else with the built-in tasks."""
    own = make_task_manager(include_path, include_defaults=False)
    if not isinstance(tasks, str) and set(tasks) <= set(own.all_tasks):
        return own
    return make_task_manager(include_path)


def check_tasks(task_manager, tasks: Sequence[str]) -> None:
    """Raise a ValueError naming every task lm_eval does not know (nothing is loaded)."""
    if isinstance(tasks, str) or not tasks:
        raise ValueError(f"tasks must be a non-empty list of task names, not {tasks!r}")
    known = set(task_manager.all_tasks)
    unknown = [t for t in tasks if t not in known and not Path(t).is_file()]
    if unknown:
        raise ValueError(
            f"lm_eval does not know the task(s) {', '.join(map(repr, unknown))} (asked for {list(tasks)}). "
            f"The course's own tasks are {COURSE_TASK!r} and {COURSE_TASK_BY_KIND!r}; for other custom tasks "
            f"pass their folder with include_path=... (lm_eval's --include_path); `lm_eval ls tasks` lists the "
            f"built-in ones."
        )


@contextlib.contextmanager
def quiet_logging(level: int = logging.ERROR) -> Iterator[None]:
    """Silence lm_eval's (and the HF libraries') INFO/WARNING logs for the duration; errors still show."""
    import datasets

    loggers = [logging.getLogger(name) for name in _QUIET_LOGGERS]
    saved = [lg.level for lg in loggers]
    bars = datasets.is_progress_bar_enabled()
    for lg in loggers:
        lg.setLevel(level)
    datasets.disable_progress_bars()  # the per-kind filters' bars; lm_eval's own request bar stays
    try:
        yield
    finally:
        for lg, old in zip(loggers, saved):
            lg.setLevel(old)
        if bars:
            datasets.enable_progress_bars()


def _default_device() -> str:
    from helpers.hardware import cuda_available

    return "cuda" if cuda_available() else "cpu"


def _dtype_name(device: str) -> str:
    """float32 on CPU; the hardware's half precision (bf16 on Ampere+, fp16 on a T4) on a GPU."""
    if not device.startswith("cuda"):
        return "float32"
    from helpers.hardware import compute_dtype

    return str(compute_dtype()).removeprefix("torch.")


def _plain_metrics(entry: dict[str, Any]) -> dict[str, float]:
    """``{"acc,none": 0.7, "alias": ...}`` -> ``{"acc": 0.7}``: numeric metrics, the ``,none`` filter dropped."""
    metrics: dict[str, float] = {}
    for key, value in entry.items():
        if "," not in key or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        metric, _, filt = key.partition(",")
        metrics[metric if filt == "none" else key] = float(value)
    return metrics


def run_lm_eval(
    model_path: str | Path,
    tasks: list[str],
    *,
    limit: int | float | None = None,
    batch_size: int | str = 16,
    device: str | None = None,
    include_path: str | Path | Sequence[str | Path] = (),
) -> dict[str, dict[str, float]]:
    """Evaluate a local model folder with ``lm_eval.simple_evaluate`` and return ``{task: {metric: value}}``.

    The course's task folder is always included; ``include_path`` adds more folders of task YAMLs.
    Groups (e.g. ``agieval_nous``) report their aggregate and each subtask its own entry. ``limit``
    caps the documents per task (a quick look; never for reported numbers). The model is loaded with
    ``trust_remote_code`` off, in float32 on CPU and the hardware's half precision on a GPU.
    """
    import lm_eval

    model_path = Path(model_path)
    if not (model_path / "config.json").exists():
        raise FileNotFoundError(f"no model folder at {model_path} (expected a config.json from save_pretrained)")
    device = device or _default_device()
    extra = [include_path] if isinstance(include_path, str | Path) else list(include_path)
    with course_task_dir() as folder, quiet_logging():
        task_manager = _task_manager_for(tasks, [folder, *extra])
        check_tasks(task_manager, tasks)
        output = lm_eval.simple_evaluate(
            model="hf",
            # a dict, not "pretrained=...,dtype=..." text: a path with a comma cannot break it
            model_args={"pretrained": str(model_path), "dtype": _dtype_name(device), "trust_remote_code": False},
            tasks=list(tasks),
            task_manager=task_manager,
            limit=limit,
            batch_size=batch_size,
            device=device,
            log_samples=False,
        )
    if output is None:  # only on non-zero ranks of a multi-process run
        return {}
    return {task: _plain_metrics(entry) for task, entry in output["results"].items()}


def headline_metric(task: str, metrics: dict[str, float]) -> str:
    """The metric reported for ``task``: :data:`HEADLINE_METRICS`, else acc_norm, else acc."""
    for name in (HEADLINE_METRICS.get(task), "acc_norm", "acc"):
        if name and name in metrics:
            return name
    raise KeyError(f"task {task!r} reported none of the expected metrics; it reported {sorted(metrics)}")


def compare_models(
    base_path: str | Path,
    dpo_path: str | Path,
    tasks: list[str],
    limit: int | float | None = None,
    **kwargs: Any,
) -> dict[str, dict[str, float]]:
    """The base and the DPO model on the same tasks: ``{task: {"base": x, "dpo": y}}`` (headline metric).

    This is the ``lm_eval`` block of the course's results file. ``kwargs`` go to :func:`run_lm_eval`.
    """
    base = run_lm_eval(base_path, tasks, limit=limit, **kwargs)
    dpo = run_lm_eval(dpo_path, tasks, limit=limit, **kwargs)
    block: dict[str, dict[str, float]] = {}
    for task in tasks:
        if task not in base or task not in dpo:
            raise KeyError(f"lm_eval returned no result for {task!r}; it returned {sorted(base)}")
        metric = headline_metric(task, base[task])
        values = {"base": base[task][metric], "dpo": dpo[task][metric]}
        if any(math.isnan(v) for v in values.values()):
            raise ValueError(f"lm_eval returned NaN for {task!r} ({metric}): {values}")
        block[task] = values
    return block
