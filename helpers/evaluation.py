"""Evaluation (notebook 06): held-out preference accuracy, implicit rewards, the health of generated answers, and
the real lm-evaluation-harness.

The preference metric alone can lie (a collapsed model can still rank pairs), so the course always reports it next to
the share of well-formed greedy answers and a rule check per kind of pair. lm-eval (``lm_eval.simple_evaluate``,
called in notebook 06's own cell) measures the same models the way the model card did:

- ``tiny`` (and the GPU profiles on their offline stand-ins): ``course_preferences``, the course's held-out pairs as
  an lm_eval multiple-choice task (``helpers/lm_eval_tasks/``); offline, seconds on CPU; its ``acc`` is exactly the
  summed log-likelihood preference accuracy below;
- ``t4`` / ``full``: the suite NeuralHermes-2.5's model card reports (Nous' AGIEval, GPT4All and TruthfulQA), with
  the metric the leaderboard used for each task. It downloads its data sets.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import re
import shutil
import sys
import tempfile
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from trl.trainer.utils import selective_log_softmax

from helpers.data import PreparedData, prepare_data
from helpers.hardware import compute_dtype, cuda_available
from helpers.loading import is_local_model, load_model, load_tokenizer, model_source
from helpers.merging import MERGED_DIRNAME, load_merged
from helpers.paths import DATA_DIR, REPO_ROOT, display_path, outputs_dir
from helpers.profiles import Profile
from helpers.saving import write_json_atomically
from helpers.standins import standin_note, standins_active

GENERATION_BUDGET = 64  # new tokens a well-formed greedy answer must end within
TARGETS = {"dpo_accuracy": 0.85, "gain_over_base": 0.25, "well_formed": 0.95}  # the tiny path's targets
RESULTS_FILENAME = "eval_results.json"

# --- answer log-likelihoods and preference accuracy --------------------------------------------------------------


LOGIT_BUDGET = 2**28  # logits per scoring batch (batch x tokens x vocabulary): 0.5 GiB in fp16, 1 GiB in fp32


def _by_length(lengths: Sequence[int], batch_size: int, max_tokens: int | None = None) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first): padding costs little, results keep order.

    ``max_tokens`` caps a batch's padded size (rows x longest row), so long rows come in smaller batches.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < batch_size and (
            max_tokens is None or (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_tokens
        ):
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


@torch.no_grad()
def answer_logprobs(
    model, tokenizer, prompts: Sequence[str], answers: Sequence[str], batch_size: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-likelihood of each answer given its prompt, summed over the answer's tokens only.

    Prompt and answer are tokenised together and split where they diverge, as TRL's DPO trainer does. Sequences of
    similar length are batched together (a long pair padded beside short ones would cost its length for all), and a
    batch's logits stay within :data:`LOGIT_BUDGET` (Qwen2.5's 151,936-token vocabulary on a T4). The
    log-probabilities come from TRL's ``selective_log_softmax``, which gathers the chosen token's log-probability
    row by row instead of materialising a [batch, tokens, vocabulary] log-softmax in fp32 (3.9 GiB for 16 answers
    of 1,000 tokens with Mistral's 32,002-token vocabulary, beside two 7B models in evaluation).
    Returns ``(sum_logps [N], answer_token_counts [N])`` in the order of ``prompts``.
    """
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    model.eval()
    device = next(model.parameters()).device
    rows, masks = [], []
    for prompt, answer in zip(prompts, answers):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        full_ids = tokenizer(prompt + answer, add_special_tokens=False)["input_ids"]
        split = 0
        while split < min(len(prompt_ids), len(full_ids)) and prompt_ids[split] == full_ids[split]:
            split += 1
        rows.append(full_ids)
        masks.append([0] * split + [1] * (len(full_ids) - split))
    sums, counts = torch.zeros(len(rows)), torch.zeros(len(rows))
    pad = tokenizer.pad_token_id
    vocab = model.get_output_embeddings().weight.shape[0]
    for batch in _by_length([len(r) for r in rows], batch_size, max_tokens=max(1, LOGIT_BUDGET // vocab)):
        width = max(len(rows[i]) for i in batch)
        input_ids = torch.tensor([rows[i] + [pad] * (width - len(rows[i])) for i in batch], device=device)
        attention = torch.tensor([[1] * len(rows[i]) + [0] * (width - len(rows[i])) for i in batch], device=device)
        answer_mask = torch.tensor([masks[i] + [0] * (width - len(masks[i])) for i in batch], device=device)
        logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1]  # [B, T-1, V]
        logps = selective_log_softmax(logits, input_ids[:, 1:]).float()  # [B, T-1]
        mask = answer_mask[:, 1:].float()
        sums[batch] = (logps * mask).sum(1).cpu()
        counts[batch] = mask.sum(1).cpu()
    return sums, counts


@dataclass
class PairScores:
    """Answer log-likelihoods of a model on a set of preference pairs."""

    chosen_sum: torch.Tensor
    rejected_sum: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    kinds: list[str]

    @property
    def chosen_mean(self) -> torch.Tensor:
        """Per-token average log-likelihood of the chosen answers."""
        return self.chosen_sum / self.chosen_tokens.clamp(min=1)

    @property
    def rejected_mean(self) -> torch.Tensor:
        """Per-token average log-likelihood of the rejected answers."""
        return self.rejected_sum / self.rejected_tokens.clamp(min=1)


def score_pairs(model, tokenizer, formatted, batch_size: int = 16) -> PairScores:
    """Score every (prompt, chosen, rejected) of a ChatML-formatted data set under ``model``."""
    prompts = list(formatted["prompt"])
    chosen_sum, chosen_n = answer_logprobs(model, tokenizer, prompts, list(formatted["chosen"]), batch_size)
    rejected_sum, rejected_n = answer_logprobs(model, tokenizer, prompts, list(formatted["rejected"]), batch_size)
    kinds = list(formatted["kind"]) if "kind" in formatted.column_names else ["all"] * len(prompts)
    return PairScores(chosen_sum, rejected_sum, chosen_n, rejected_n, kinds)


def _by_kind(wins: Sequence[bool], kinds: list[str]) -> dict[str, float]:
    groups: dict[str, list[bool]] = defaultdict(list)
    for win, kind in zip(wins, kinds):
        groups[kind].append(bool(win))
    return {kind: sum(v) / len(v) for kind, v in sorted(groups.items())}


def preference_accuracy(scores: PairScores) -> dict:
    """Share of pairs where the chosen answer is more likely than the rejected one.

    ``sum``: summed over answer tokens (what DPO optimises; flatters short answers);
    ``per_token``: averaged per token (fair between a concise and a rambling answer).
    """
    wins_sum = (scores.chosen_sum > scores.rejected_sum).tolist()
    wins_mean = (scores.chosen_mean > scores.rejected_mean).tolist()
    return {
        "sum": sum(wins_sum) / len(wins_sum),
        "per_token": sum(wins_mean) / len(wins_mean),
        "by_kind": {"sum": _by_kind(wins_sum, scores.kinds), "per_token": _by_kind(wins_mean, scores.kinds)},
    }


def implicit_rewards(policy: PairScores, reference: PairScores, beta: float) -> dict:
    """DPO's implicit rewards beta * (log pi - log pi_ref): accuracy and mean margin, overall and by kind."""
    chosen = beta * (policy.chosen_sum - reference.chosen_sum)
    rejected = beta * (policy.rejected_sum - reference.rejected_sum)
    margins = chosen - rejected
    wins = (margins > 0).tolist()
    return {
        "accuracy": sum(wins) / len(wins),
        "mean_margin": margins.mean().item(),
        "mean_chosen": chosen.mean().item(),
        "mean_rejected": rejected.mean().item(),
        "by_kind": _by_kind(wins, policy.kinds),
    }


# --- generation health -------------------------------------------------------------------------------------------


@dataclass
class Generation:
    """One greedy answer: its text, its token ids and whether it ended with the end-of-turn token."""

    prompt: str
    text: str
    token_ids: list[int]
    ended: bool


@torch.no_grad()
def greedy_generate(
    model, tokenizer, prompts: Sequence[str], max_new_tokens: int = GENERATION_BUDGET, batch_size: int = 16
) -> list[Generation]:
    """Greedy answers (deterministic) to ChatML prompts, batched with left padding (prompts of similar length
    together), returned in the order of ``prompts``.

    ``repetition_penalty=1.0`` is passed explicitly: a model's own generation_config may set another
    (Qwen2.5-Instruct's sets one above 1), and it would change even a greedy answer (sampling settings do not act
    when ``do_sample=False``).
    """
    model.eval()
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    results: list[Generation | None] = [None] * len(prompts)
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    try:
        for batch in _by_length(lengths, batch_size):
            chunk = [prompts[i] for i in batch]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                repetition_penalty=1.0,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            for i, prompt, row in zip(batch, chunk, out[:, enc["input_ids"].shape[1] :].tolist()):
                ids = [t for t in row if t != tokenizer.pad_token_id]
                ended = tokenizer.eos_token_id in ids
                if ended:
                    ids = ids[: ids.index(tokenizer.eos_token_id) + 1]
                text = tokenizer.decode(ids, skip_special_tokens=True).strip()
                results[i] = Generation(prompt, text, ids, ended)
    finally:
        tokenizer.padding_side = side
    return [r for r in results if r is not None]


def has_repetition_loop(token_ids: Sequence[int], n: int = 3, times: int = 3) -> bool:
    """True when some ``n``-token sequence occurs ``times`` times in a row (a degenerate loop)."""
    for start in range(len(token_ids) - n * times + 1):
        gram = list(token_ids[start : start + n])
        if all(list(token_ids[start + k * n : start + (k + 1) * n]) == gram for k in range(times)):
            return True
    return False


def is_well_formed(gen: Generation) -> bool:
    """Ends with ``<|im_end|>`` within the budget, says something, and does not loop."""
    return gen.ended and bool(gen.text) and not has_repetition_loop(gen.token_ids)


def words(text: str) -> list[str]:
    """Lower-case words and numbers of ``text`` (punctuation dropped): what the rule checks compare."""
    return re.findall(r"[a-z0-9]+", text.lower())


def overlap_f1(answer: str, reference: str) -> float:
    """Unigram F1 between two texts' words (0 when either is empty), as ROUGE-1 F1 computes it."""
    a, b = words(answer), words(reference)
    if not a or not b:
        return 0.0
    counts: dict[str, int] = defaultdict(int)
    for word in b:
        counts[word] += 1
    common = 0
    for word in a:
        if counts[word] > 0:
            common += 1
            counts[word] -= 1
    if common == 0:
        return 0.0
    precision, recall = common / len(a), common / len(b)
    return 2 * precision * recall / (precision + recall)


def follows_rule(kind: str, chosen: str, rejected: str, answer: str) -> bool:
    """Does a generated ``answer`` show the preference its pair teaches? Judged from the pair's own two answers.

    No phrase list: every rule compares the answer with the pair's chosen and rejected answers, so it works the same
    on the course's pairs, on hub data and on a learner's own pairs.

    - ``correct_vs_wrong``: the answer states the chosen (correct) answer's words, in order;
    - ``follows_system``: the answer starts with the word the chosen answer starts with (and the rejected one not);
    - ``concise_vs_rambling``: the answer is shorter than halfway between the concise and the rambling answer;
    - anything else (``helpful_vs_evasive``, a hub data set's id, ...): the answer is closer in words to the chosen
      answer than to the rejected one (unigram F1, :func:`overlap_f1`).
    """
    if not answer.strip():
        return False
    if kind == "correct_vs_wrong":
        return " ".join(words(chosen)) in " ".join(words(answer))
    if kind == "follows_system":
        first = (words(chosen) or [""])[0]
        return bool(first) and (words(answer) or [""])[0] == first and (words(rejected) or [""])[0] != first
    if kind == "concise_vs_rambling":
        return len(words(answer)) < (len(words(chosen)) + len(words(rejected))) / 2
    return overlap_f1(answer, chosen) > overlap_f1(answer, rejected)


def generation_health(gens: Sequence[Generation], rows: Sequence[dict]) -> dict:
    """Share of well-formed answers, and of answers that follow their pair's rule, overall and by kind.

    ``rows`` are the raw pairs the prompts came from (``kind``, ``chosen``, ``rejected``), in the same order.
    """
    if len(gens) != len(rows):
        raise ValueError(f"{len(gens)} generations but {len(rows)} rows")
    well = [is_well_formed(g) for g in gens]
    rules = [follows_rule(r["kind"], r["chosen"], r["rejected"], g.text) for g, r in zip(gens, rows)]
    return {
        "well_formed": sum(well) / len(well),
        "follows_rule": sum(rules) / len(rules),
        "follows_rule_by_kind": _by_kind(rules, [r["kind"] for r in rows]),
    }


def side_by_side(base_gens, dpo_gens, rows: list[dict], n: int = 5) -> list[dict[str, str]]:
    """``n`` held-out prompts (kinds taken in turn) with the base's and the DPO model's greedy answers."""
    picked: list[int] = []
    kinds = sorted({r["kind"] for r in rows})
    while len(picked) < min(n, len(rows)):
        for kind in kinds:
            index = next((i for i, r in enumerate(rows) if r["kind"] == kind and i not in picked), None)
            if index is not None and len(picked) < n:
                picked.append(index)
    return [
        {
            "kind": rows[i]["kind"],
            "system": rows[i]["system"],
            "question": rows[i]["question"],
            "base": base_gens[i].text,
            "dpo": dpo_gens[i].text,
        }
        for i in picked
    ]


def results_block(profile: Profile, base_scores: PairScores, dpo_scores: PairScores, base_gens: list[Generation],
                  dpo_gens: list[Generation], rows: list[dict]) -> dict[str, Any]:
    """The held-out part of ``eval_results.json`` from scores and generations already computed (notebook 06 has
    them from its own cells; :func:`evaluate_models` computes them first)."""
    base_acc, dpo_acc = preference_accuracy(base_scores), preference_accuracy(dpo_scores)
    base_health, dpo_health = generation_health(base_gens, rows), generation_health(dpo_gens, rows)
    kinds = sorted(base_acc["by_kind"]["per_token"])
    return {
        "heldout_preference_accuracy": {
            "metric": "per_token",
            "base": base_acc["per_token"],
            "dpo": dpo_acc["per_token"],
            "base_sum": base_acc["sum"],
            "dpo_sum": dpo_acc["sum"],
            "by_kind": {
                k: {
                    "base": base_acc["by_kind"]["per_token"][k],
                    "dpo": dpo_acc["by_kind"]["per_token"][k],
                    "base_sum": base_acc["by_kind"]["sum"][k],
                    "dpo_sum": dpo_acc["by_kind"]["sum"][k],
                }
                for k in kinds
            },
        },
        "implicit_rewards": implicit_rewards(dpo_scores, base_scores, profile.dpo.beta),
        "well_formed": {"base": base_health["well_formed"], "dpo": dpo_health["well_formed"]},
        "follows_rule": {
            "base": base_health["follows_rule"],
            "dpo": dpo_health["follows_rule"],
            "by_kind": {
                k: {"base": base_health["follows_rule_by_kind"][k], "dpo": dpo_health["follows_rule_by_kind"][k]}
                for k in sorted(base_health["follows_rule_by_kind"])
            },
        },
        "answer_words": length_table(rows, base_gens, dpo_gens),
        "side_by_side": side_by_side(base_gens, dpo_gens, rows),
        "n_heldout": len(rows),
    }


def evaluate_models(profile: Profile, base_model, dpo_model, tokenizer, data: PreparedData) -> dict[str, Any]:
    """Held-out preference accuracy, implicit rewards and generation health of the base and the DPO model."""
    prompts = list(data.heldout["prompt"])
    return results_block(
        profile,
        score_pairs(base_model, tokenizer, data.heldout),
        score_pairs(dpo_model, tokenizer, data.heldout),
        greedy_generate(base_model, tokenizer, prompts),
        greedy_generate(dpo_model, tokenizer, prompts),
        data.heldout_rows,
    )


def mean_words(texts: Sequence[str]) -> float:
    """The mean number of words (:func:`words`) of ``texts``; NaN for none."""
    return sum(len(words(t)) for t in texts) / len(texts) if texts else float("nan")


def length_table(rows: Sequence[dict], base_gens: Sequence[Generation] | None = None,
                 dpo_gens: Sequence[Generation] | None = None) -> dict[str, dict[str, float]]:
    """Mean words per answer, by kind and overall: the pairs' chosen and rejected answers, and (when given) the greedy
    answers of the base and the DPO model to the same prompts. DPO's length bias shows here: a summed log-likelihood
    margin can be won by changing the length of an answer rather than its content."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        groups[row["kind"]].append(i)
        groups["all"].append(i)
    table: dict[str, dict[str, float]] = {}
    for kind, indices in sorted(groups.items(), key=lambda item: (item[0] == "all", item[0])):
        entry = {"chosen": mean_words([rows[i]["chosen"] for i in indices]),
                 "rejected": mean_words([rows[i]["rejected"] for i in indices])}
        for name, gens in (("base", base_gens), ("dpo", dpo_gens)):
            if gens is not None:
                entry[name] = mean_words([gens[i].text for i in indices])
        table[kind] = entry
    return table


def targets_met(results: dict[str, Any]) -> dict[str, bool]:
    """The tiny path's targets: DPO accuracy >= 0.85, >= 0.25 above base, >= 95% well-formed answers."""
    acc = results["heldout_preference_accuracy"]
    return {
        "dpo_accuracy": acc["dpo"] >= TARGETS["dpo_accuracy"],
        "gain_over_base": acc["dpo"] - acc["base"] >= TARGETS["gain_over_base"],
        "well_formed": results["well_formed"]["dpo"] >= TARGETS["well_formed"],
    }


def results_header(profile: Profile, run_id: str) -> dict[str, Any]:
    """The fields every results file starts with; a run on offline stand-ins says so in ``standins``."""
    header: dict[str, Any] = {"profile": profile.name, "run_id": run_id}
    if standins_active():
        header["standins"] = standin_note(profile.name)
    return header


def write_results(results: dict[str, Any], run_folder: str | Path) -> Path:
    """Write ``eval_results.json`` to the run folder and copy it to ``outputs/eval_results.json`` (atomically)."""
    path = write_json_atomically(Path(run_folder) / RESULTS_FILENAME, results)
    write_json_atomically(outputs_dir() / RESULTS_FILENAME, results)
    return path


# --- lm-evaluation-harness ---------------------------------------------------------------------------------------

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

# The one number reported per task (lm_eval_block); tasks not listed fall back to acc_norm, then acc.
HEADLINE_METRICS: dict[str, str] = {
    COURSE_TASK: "acc",
    COURSE_TASK_BY_KIND: "acc",
    **{task: metric for tasks in GPU_SUITE.values() for task, metric in tasks},
}

_QUIET_LOGGERS = ("lm_eval", "transformers", "datasets", "huggingface_hub", "accelerate")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def suite_tasks() -> list[str]:
    """The nine task names of :data:`GPU_SUITE`, in the model card's order."""
    return [task for tasks in GPU_SUITE.values() for task, _ in tasks]


# Documents per lm-eval task when the notebook's LM_EVAL_LIMIT is None: every one, except on a free T4, where the
# card's nine tasks in full would take hours; 100 per task gives a first look in minutes (estimated).
LM_EVAL_LIMITS = {"tiny": None, "t4": 100, "full": None}


def default_lm_eval_limit(profile: Any, asked: int | float | None = None) -> int | float | None:
    """``asked`` when given, else the profile's default from :data:`LM_EVAL_LIMITS` (None = every document)."""
    return asked if asked is not None else LM_EVAL_LIMITS[str(getattr(profile, "name", profile))]


def tasks_for_profile(profile: Any) -> list[str]:
    """The lm_eval tasks a profile runs: ``tiny`` -> the course's own task; ``t4`` / ``full`` -> the suite.

    On the offline stand-ins (``COURSE_STANDINS=1``) every profile runs the course's own task: the suite's data
    sets cannot be fetched there. ``profile`` is a :class:`helpers.profiles.Profile` or its name.
    """
    name = str(getattr(profile, "name", profile)).strip().lower()
    if name not in {"tiny", "t4", "full"}:
        raise ValueError(f"unknown profile {name!r}; choose one of tiny, t4, full")
    if name == "tiny" or standins_active():
        return [COURSE_TASK]
    return suite_tasks()


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
    from lm_eval.tasks import TaskManager  # lm_eval is imported only when an evaluation runs: it takes seconds

    paths = [include_path] if isinstance(include_path, str | Path) else list(include_path)
    return TaskManager(include_path=[str(p) for p in paths], include_defaults=include_defaults)


def task_manager_for(tasks: Sequence[str], include_path: Sequence[str | Path]):
    """The course's folders alone when they hold every requested task (fast), else with the built-in tasks.

    Every task name is checked first: an unknown one raises a ValueError naming it (nothing is loaded).
    """
    if isinstance(tasks, str) or not tasks:
        raise ValueError(f"tasks must be a non-empty list of task names, not {tasks!r}")
    manager = make_task_manager(include_path, include_defaults=False)
    if not set(tasks) <= set(manager.all_tasks):
        manager = make_task_manager(include_path)
    unknown = [t for t in tasks if t not in set(manager.all_tasks) and not Path(t).is_file()]
    if unknown:
        raise ValueError(
            f"lm_eval does not know the task(s) {', '.join(map(repr, unknown))} (asked for {list(tasks)}). "
            f"The course's own tasks are {COURSE_TASK!r} and {COURSE_TASK_BY_KIND!r}; for other custom tasks "
            f"pass their folder with include_path=... (lm_eval's --include_path); `lm_eval ls tasks` lists the "
            f"built-in ones."
        )
    return manager


@contextlib.contextmanager
def quiet_logging(level: int = logging.ERROR, *, progress: bool = False) -> Iterator[None]:
    """Silence lm_eval's (and the HF libraries') logs for the duration; errors still show.

    ``progress=False`` also keeps lm_eval's progress bars (one per model and stage) out of the output; they go to
    a buffer whose last lines are printed if the evaluation fails. ``True`` shows them (worth it for an hour-long
    GPU suite).
    """
    loggers = [logging.getLogger(name) for name in _QUIET_LOGGERS]
    saved = [lg.level for lg in loggers]
    bars = datasets.is_progress_bar_enabled()
    for lg in loggers:
        lg.setLevel(level)
    datasets.disable_progress_bars()  # the per-kind filters' bars
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stderr(sys.stderr if progress else buffer):
            yield
    except Exception:
        print("\n".join(buffer.getvalue().splitlines()[-20:]), file=sys.stderr)
        raise
    finally:
        for lg, old in zip(loggers, saved):
            lg.setLevel(old)
        if bars:
            datasets.enable_progress_bars()


def lm_eval_device() -> str:
    """``cuda`` where there is a GPU, else ``cpu``."""
    return "cuda" if cuda_available() else "cpu"


def lm_eval_dtype(device: str) -> str:
    """float32 on CPU; the hardware's half precision (bf16 on Ampere+, fp16 on a T4) on a GPU."""
    if not device.startswith("cuda"):
        return "float32"
    return str(compute_dtype()).removeprefix("torch.")


def check_model_reference(model: str | Path) -> str:
    """``model`` as lm_eval's ``pretrained=``: a folder holding a saved model, or a hub id such as ``Org/Name``.

    A hub id is resolved by transformers (from the local cache when offline); anything else is refused here,
    before lm_eval loads anything, naming what was given.
    """
    text = str(model)
    if Path(text).exists():
        if not is_local_model(text):
            raise FileNotFoundError(f"no model folder at {text} (expected a config.json from save_pretrained)")
        return text
    if _HUB_ID.match(text):
        return text
    raise FileNotFoundError(f"{text!r} is neither a model folder (with a config.json) nor a hub id like 'Org/Name'")


def lm_eval_kwargs(
    model: str | Path,
    tasks: Sequence[str],
    task_manager,
    *,
    limit: int | float | None = None,
    batch_size: int | str = 16,
    device: str | None = None,
) -> dict[str, Any]:
    """The keyword arguments of ``lm_eval.simple_evaluate`` for one model (a folder or a hub id) on ``tasks``.

    ``trust_remote_code`` off; float32 on CPU, the hardware's half precision on a GPU. ``limit`` caps the documents
    per task (a quick look; never for reported numbers). ``task_manager``: from :func:`task_manager_for`.
    """
    device = device or lm_eval_device()
    return dict(
        model="hf",
        # a dict, not "pretrained=...,dtype=..." text: a path with a comma cannot break it
        model_args={"pretrained": check_model_reference(model), "dtype": lm_eval_dtype(device),
                    "trust_remote_code": False},
        tasks=list(tasks),
        task_manager=task_manager,
        limit=limit,
        batch_size=batch_size,
        device=device,
        log_samples=False,
    )


def plain_metrics(output: dict[str, Any] | None) -> dict[str, dict[str, float]]:
    """``simple_evaluate``'s output as ``{task: {metric: value}}`` (``"acc,none"`` -> ``"acc"``; numbers only).

    Groups (e.g. ``agieval_nous``) report their aggregate and each subtask its own entry. None (what non-zero ranks
    of a multi-process run get) gives an empty dict.
    """
    if output is None:
        return {}
    found: dict[str, dict[str, float]] = {}
    for task, entry in output["results"].items():
        metrics: dict[str, float] = {}
        for key, value in entry.items():
            if "," not in key or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            metric, _, filt = key.partition(",")
            metrics[metric if filt == "none" else key] = float(value)
        found[task] = metrics
    return found


def run_lm_eval(
    model: str | Path,
    tasks: list[str],
    *,
    limit: int | float | None = None,
    batch_size: int | str = 16,
    device: str | None = None,
    include_path: str | Path | Sequence[str | Path] = (),
    progress: bool = False,
) -> dict[str, dict[str, float]]:
    """``lm_eval.simple_evaluate`` on one model (folder or hub id) -> ``{task: {metric: value}}`` (see
    :func:`plain_metrics`). The course's task folder is always included; ``include_path`` adds more."""
    import lm_eval  # imported only when an evaluation runs: it takes seconds

    extra = [include_path] if isinstance(include_path, str | Path) else list(include_path)
    with course_task_dir() as folder, quiet_logging(progress=progress):
        manager = task_manager_for(tasks, [folder, *extra])
        kwargs = lm_eval_kwargs(model, tasks, manager, limit=limit, batch_size=batch_size, device=device)
        return plain_metrics(lm_eval.simple_evaluate(**kwargs))


def headline_metric(task: str, metrics: dict[str, float]) -> str:
    """The metric reported for ``task``: :data:`HEADLINE_METRICS`, else acc_norm, else acc."""
    for name in (HEADLINE_METRICS.get(task), "acc_norm", "acc"):
        if name and name in metrics:
            return name
    raise KeyError(f"task {task!r} reported none of the expected metrics; it reported {sorted(metrics)}")


def lm_eval_block(
    base: dict[str, dict[str, float]], dpo: dict[str, dict[str, float]], tasks: Sequence[str]
) -> dict[str, dict[str, float]]:
    """``{task: {"base": x, "dpo": y}}`` of each task's headline metric: the ``lm_eval`` block of the results."""
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


def compare_models(
    base: str | Path, dpo: str | Path, tasks: list[str], limit: int | float | None = None, **kwargs: Any
) -> dict[str, dict[str, float]]:
    """The base and the DPO model on the same tasks (see :func:`lm_eval_block`); ``kwargs`` go to run_lm_eval."""
    base_metrics = run_lm_eval(base, tasks, limit=limit, **kwargs)
    dpo_metrics = run_lm_eval(dpo, tasks, limit=limit, **kwargs)
    return lm_eval_block(base_metrics, dpo_metrics, tasks)


# --- the headless evaluation -------------------------------------------------------------------------------------


def evaluate_run(
    profile: Profile, run_folder: str | Path, *, run_id: str = "main", lm_eval_limit: int | None = None,
    with_lm_eval: bool = True,
) -> dict[str, Any]:
    """Evaluate ``<run>/merged`` against the base on held-out pairs (+ lm-eval) and write the results file.

    ``lm_eval_limit``: documents per lm-eval task; None = the profile's default (:data:`LM_EVAL_LIMITS`).
    """
    run_folder = Path(run_folder)
    source = model_source(profile)
    tokenizer = load_tokenizer(profile, source)
    data = prepare_data(profile, tokenizer)
    base = load_model(profile, four_bit=False, source=source)
    merged, _ = load_merged(run_folder / MERGED_DIRNAME)
    results: dict[str, Any] = {**results_header(profile, run_id), "run_folder": display_path(run_folder)}
    results.update(evaluate_models(profile, base, merged, tokenizer, data))
    results["lm_eval"] = (
        compare_models(source, run_folder / MERGED_DIRNAME, tasks_for_profile(profile),
                       limit=default_lm_eval_limit(profile, lm_eval_limit))
        if with_lm_eval else {}
    )
    results["targets_met"] = targets_met(results)
    write_results(results, run_folder)
    return results
