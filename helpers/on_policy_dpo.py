"""On-policy, iterative and online DPO (notebook 10): preference pairs made from the policy's own answers.

Notebook 10 writes the trainers in its cells (``RewardTrainer``, ``DPOTrainer`` per round, ``OnlineDPOTrainer``);
this module holds what is not the lesson: the plan's checks (:func:`check_settings`), the prompts of each round
(:func:`prompt_rows`), the two judges (:func:`rule_scores`: the course's rule checks; :func:`reward_model_scores`:
a trained reward model), the pairs made of each prompt's best and worst answer (:func:`build_pairs`), the judge as
a reward function for TRL's online trainer (:func:`as_reward_function`) and the evaluation of a policy
(:func:`evaluate_policy`). What TRL does inside those trainers is written up in ``docs/on_policy_internals.md``.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from helpers.chatml import escape_control_strings
from helpers.scoring import (
    Generation,
    as_generation,
    by_kind,
    follows_rule,
    generation_health,
    greedy_generate,
    implicit_rewards,
    is_well_formed,
    mean_words,
    preference_accuracy,
    score_pairs,
)

# The plan's keys (profile.on_policy): what each one decides is in the notebook's first section.
SETTING_KEYS = ("prompts_per_round", "samples_per_prompt", "temperature", "max_new_tokens", "rounds", "round_steps",
                "warmup_steps", "reward_steps", "reward_learning_rate", "online_steps", "min_judge_accuracy", "cost")
Judge = Callable[[Sequence[Sequence[Generation]], Sequence[Mapping[str, str]]], list[list[float]]]


def check_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The plan as a dict, refused with a message when a key is missing or unknown (a typo in an override would
    otherwise be ignored) or a value cannot work; returns a copy."""
    missing = [k for k in SETTING_KEYS if k not in settings]
    unknown = sorted(set(settings) - set(SETTING_KEYS))
    if missing or unknown:
        raise ValueError(f"on-policy settings: missing {missing or 'nothing'}, unknown {unknown or 'nothing'}; "
                         f"the keys are {', '.join(SETTING_KEYS)}")
    problems = []
    if settings["samples_per_prompt"] < 2:
        problems.append(f"samples_per_prompt must be at least 2 to make a pair, not {settings['samples_per_prompt']}")
    if not settings["temperature"] > 0:
        problems.append(f"temperature must be positive (0 is greedy: every sample the same), not "
                        f"{settings['temperature']}")
    for key in ("prompts_per_round", "max_new_tokens", "rounds", "round_steps", "reward_steps", "online_steps"):
        if not (isinstance(settings[key], int) and settings[key] >= 1):
            problems.append(f"{key} must be a whole number >= 1, not {settings[key]!r}")
    if not 0 <= settings["warmup_steps"] < min(settings["round_steps"], settings["online_steps"]) + 1:
        problems.append(f"warmup_steps ({settings['warmup_steps']}) must be >= 0 and at most the shortest run's steps")
    if not 0.0 <= settings["min_judge_accuracy"] <= 1.0:
        problems.append(f"min_judge_accuracy is a share in [0, 1], not {settings['min_judge_accuracy']}")
    if problems:
        raise ValueError("on-policy settings: " + "; ".join(problems))
    return dict(settings)


def prompt_rows(formatted, eos_token: str, *, start: int, count: int, seed: int) -> list[dict[str, str]]:
    """``count`` training prompts from position ``start`` of one shuffle of ``formatted`` by ``seed`` (wrapping
    around at the end): each round, and the online run, takes the next ones, so none answers prompts another saw.

    Rows keep ``kind`` and their pair's two answers without the end-of-turn token (the rule judge reads them), and
    the user's ``question`` (for printing).
    """
    if count < 1 or start < 0:
        raise ValueError(f"count must be >= 1 and start >= 0, not {count} and {start}")
    order = list(range(len(formatted)))
    random.Random(seed).shuffle(order)
    rows = []
    for i in range(start, start + count):
        row = formatted[order[i % len(order)]]
        question = row["prompt"].rsplit("<|im_start|>user\n", 1)[-1].split("<|im_end|>", 1)[0]
        rows.append({"prompt": row["prompt"], "kind": row.get("kind", "all"), "question": question,
                     "chosen": row["chosen"].removesuffix(eos_token),
                     "rejected": row["rejected"].removesuffix(eos_token)})
    return rows


def rule_score(row: Mapping[str, str], gen: Generation) -> float:
    """The rule judge's score of one answer: 1 if well-formed, plus 1 if it follows its pair's rule (0, 1 or 2)."""
    return float(is_well_formed(gen)) + float(follows_rule(row["kind"], row["chosen"], row["rejected"], gen.text))


def rule_scores(samples: Sequence[Sequence[Generation]], rows: Sequence[Mapping[str, str]]) -> list[list[float]]:
    """:func:`rule_score` of every answer; ``rows[i]`` is the pair of ``samples[i]``'s prompt."""
    if len(samples) != len(rows):
        raise ValueError(f"{len(samples)} prompts' answers but {len(rows)} rows")
    return [[rule_score(row, g) for g in gens] for gens, row in zip(samples, rows)]


@torch.no_grad()
def reward_scores(reward_model, tokenizer, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
    """The reward model's score of each full text (prompt + answer) [N]. Tokenised as ``RewardTrainer`` tokenises
    its pairs (``tokenizer(text)``, special tokens included), right-padded: the model reads the last real token."""
    reward_model.eval()
    device = next(reward_model.parameters()).device
    side, tokenizer.padding_side = tokenizer.padding_side, "right"
    found = []
    try:
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(list(texts[start:start + batch_size]), return_tensors="pt", padding=True).to(device)
            found.append(reward_model(**enc).logits[:, 0].float().cpu())
    finally:
        tokenizer.padding_side = side
    return torch.cat(found) if found else torch.zeros(0)


def reward_model_scores(reward_model, tokenizer, samples: Sequence[Sequence[Generation]]) -> list[list[float]]:
    """The reward model's score of every answer, shaped like ``samples``. It reads prompt + answer + the end-of-turn
    token when the answer ended (as the pairs it trained on end), so a cut answer reads as cut."""
    texts = [g.prompt + g.text + (tokenizer.eos_token if g.ended else "") for gens in samples for g in gens]
    values = iter(reward_scores(reward_model, tokenizer, texts).tolist())
    return [[next(values) for _ in gens] for gens in samples]


def heldout_reward_accuracy(reward_model, tokenizer, formatted) -> dict[str, Any]:
    """The reward model on held-out pairs: the share whose chosen answer scores strictly higher, overall and by kind."""
    prompts = list(formatted["prompt"])
    chosen = reward_scores(reward_model, tokenizer, [p + a for p, a in zip(prompts, formatted["chosen"])])
    rejected = reward_scores(reward_model, tokenizer, [p + a for p, a in zip(prompts, formatted["rejected"])])
    wins = (chosen > rejected).float().tolist()
    kinds = list(formatted["kind"]) if "kind" in formatted.column_names else ["all"] * len(prompts)
    return {"accuracy": sum(wins) / len(wins), "by_kind": by_kind(wins, kinds), "pairs": len(wins)}


def best_and_worst(scores: Sequence[float]) -> tuple[int, int] | None:
    """Indices of the best (the first of the highest) and the worst (the last of the lowest) score; None on a tie."""
    if len(scores) < 2:
        raise ValueError(f"a pair needs at least 2 scored answers, got {len(scores)}")
    scores = list(scores)
    high, low = max(scores), min(scores)
    if high == low:
        return None
    return scores.index(high), len(scores) - 1 - scores[::-1].index(low)


def build_pairs(samples: Sequence[Sequence[Generation]], scores: Sequence[Sequence[float]],
                rows: Sequence[Mapping[str, str]], eos_token: str) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """One DPO pair per prompt: its best-scored answer ``chosen``, its worst ``rejected``; and counts.

    A prompt whose answers all score the same teaches nothing and is dropped (``ties``), as is one whose best and
    worst answers are the same text. Each answer ends with exactly one ``eos_token``, as the course's pairs do: a
    ChatML control string that a model spelt out of ordinary tokens is made inert (notebook 01), not a second end.
    """
    if not len(samples) == len(scores) == len(rows):
        raise ValueError(f"{len(samples)} samples, {len(scores)} scores, {len(rows)} rows: one of each per prompt")
    pairs, ties = [], 0
    for gens, values, row in zip(samples, scores, rows):
        if len(gens) != len(values):
            raise ValueError(f"{len(gens)} answers but {len(values)} scores for one prompt")
        picked = best_and_worst(values)
        if picked is None or gens[picked[0]].text == gens[picked[1]].text:
            ties += 1
            continue
        best, worst = picked
        pairs.append({"prompt": gens[best].prompt, "chosen": escape_control_strings(gens[best].text) + eos_token,
                      "rejected": escape_control_strings(gens[worst].text) + eos_token, "kind": row.get("kind", "all"),
                      "chosen_score": float(values[best]), "rejected_score": float(values[worst])})
    return pairs, {"prompts": len(samples), "ties": ties, "pairs": len(pairs)}


def judge_agreement(primary: Sequence[Sequence[float]], other: Sequence[Sequence[float]], kinds: Sequence[str]
                    ) -> dict[str, dict[str, float]]:
    """How the ``other`` judge sees the pairs the ``primary`` one builds: for each prompt where ``primary`` does not
    tie, does ``other`` also score its best answer above its worst (``agree``), equal (``tie``) or below
    (``disagree``)? Shares by kind and overall (``all``, last), with ``pairs`` compared."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: {"agree": 0, "tie": 0, "disagree": 0})
    for first, second, kind in zip(primary, other, kinds, strict=True):
        picked = best_and_worst(first)
        if picked is None:
            continue
        best, worst = picked
        verdict = "agree" if second[best] > second[worst] else "tie" if second[best] == second[worst] else "disagree"
        for key in (kind, "all"):
            counts[key][verdict] += 1
    shares = {}
    for key in sorted(counts, key=lambda k: (k == "all", k)):
        total = sum(counts[key].values())
        shares[key] = {**{v: n / total for v, n in counts[key].items()}, "pairs": total}
    return shares


def as_reward_function(judge: Judge, tokenizer, name: str = "judge") -> Callable[..., list[float]]:
    """``judge`` (answers, rows -> scores) as a reward function for ``OnlineDPOTrainer(reward_funcs=...)``.

    TRL 1.16 calls it with the prompts, the decoded answers, their token ids (padded after the end-of-turn token) and
    the data set's other columns, each repeated for the two answers per prompt. The ids become the same
    :class:`Generation` the rounds judged (cut after the end-of-turn token, ``ended`` set), so the online run is
    scored exactly as the rounds were.
    """
    def reward(prompts, completions, completion_ids, **columns) -> list[float]:
        gens = [as_generation(tokenizer, p, ids) for p, ids in zip(prompts, completion_ids)]
        rows = [{"kind": k, "chosen": c, "rejected": r} for k, c, r in
                zip(columns.get("kind", ["all"] * len(gens)), columns.get("chosen", completions),
                    columns.get("rejected", completions))]
        return [scores[0] for scores in judge([[g] for g in gens], rows)]

    reward.__name__ = name  # TRL logs the reward under this name
    return reward


def evaluate_policy(model, tokenizer, data, base_scores, beta: float, max_new_tokens: int = 64) -> dict[str, float]:
    """A policy on the held-out pairs and prompts, as notebook 06 measures the course's model.

    ``accuracy``: per-token preference accuracy; ``margin``: the mean implicit-reward margin β·Δ against the SFT
    model (``base_scores``: its :func:`helpers.scoring.score_pairs` on the same pairs); ``chosen_logp_change``: how
    much likelier the held-out chosen answers became (summed nats, mean over pairs); then the greedy answers'
    well-formed and rule-following shares and their mean length in words.
    """
    scores = score_pairs(model, tokenizer, data.heldout)
    gens = greedy_generate(model, tokenizer, list(data.heldout["prompt"]), max_new_tokens=max_new_tokens,
                           batch_size=64)
    health = generation_health(gens, data.heldout_rows)
    return {"accuracy": preference_accuracy(scores)["per_token"],
            "margin": implicit_rewards(scores, base_scores, beta)["mean_margin"],
            "chosen_logp_change": (scores.chosen_sum - base_scores.chosen_sum).mean().item(),
            "well_formed": health["well_formed"], "follows_rule": health["follows_rule"],
            "mean_words": mean_words([g.text for g in gens])}


def summary_line(label: str, row: Mapping[str, float]) -> str:
    """One line per evaluated policy: held-out accuracy and margin, then what its greedy answers do."""
    return (f"{label}: held-out accuracy {row['accuracy']:.3f} (per token), margin {row['margin']:+.2f}, "
            f"chosen {row['chosen_logp_change']:+.2f} nats, well-formed {row['well_formed']:.0%}, "
            f"follows its rule {row['follows_rule']:.0%}, {row['mean_words']:.1f} words")

