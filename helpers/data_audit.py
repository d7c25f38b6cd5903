"""Auditing and filtering preference pairs (notebook 11), as argilla did for orca_dpo_pairs.

- :func:`audit` counts what needs no judge: identical pairs, repeats, prompts of the evaluation data, and the length
  gap between chosen and rejected answers (the length bias DPO learns).
- Judges give each pair a :class:`Verdict`: the labelled order holds (``agree``), is ``reversed``, or is a ``tie``
  (``None``: no verdict). :func:`rule_verdicts` checks answers against what the prompt itself states,
  :func:`margin_verdicts` reads a reward model's scores, :func:`argilla_verdicts` argilla's GPT-4 ratings.
- :func:`agreement` and :func:`detection` compare judges with each other and with a known truth;
  :func:`filter_pairs` applies argilla's rules and counts what each one removed.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import pandas as pd
import torch

from helpers import scoring
from helpers.chatml import escape_control_strings
from helpers.data import check_rows, format_and_filter, read_jsonl
from helpers.profiles import Profile
from helpers.scoring import by_length, greedy_generate, words

FIELDS = ("system", "question", "chosen", "rejected")
RULES = ("evaluation overlap", "identical pair", "exact repeat", "no verdict", "tie", "chosen score too low")


@dataclass(frozen=True)
class Verdict:
    """One judge on one pair: ``status`` (agree / reversed / tie, None = no verdict) and the two answers' scores."""

    status: str | None
    chosen: float | None = None
    rejected: float | None = None


def read_pairs(path: str | Path) -> list[dict]:
    """Every row of a JSON-lines file of orca pairs, checked field by field, nothing dropped: an audit must see the
    identical pairs that :func:`helpers.data.load_pairs` drops."""
    return [row for _, row in check_rows(read_jsonl(path), Path(path).name)]


def prompt_key(text: str) -> str:
    """A question as the overlap check compares it: its lower-case words, so spacing and punctuation hide nothing."""
    return " ".join(words(text))


def audit(rows: Sequence[Mapping], eval_questions: Sequence[str]) -> dict[str, float]:
    """What needs no judge: identical pairs, rows repeating an earlier row, prompts asked before with other answers,
    questions of the evaluation data, and the length gap (mean words of chosen minus rejected answers, and the
    share of pairs whose chosen answer is the longer one)."""
    seen_rows, seen_prompts, held, found = set(), set(), {prompt_key(q) for q in eval_questions}, Counter()
    for row in rows:
        key, prompt = tuple(row[f] for f in FIELDS), (row["system"], row["question"])
        found["identical"] += row["chosen"].strip() == row["rejected"].strip()
        found["duplicate"] += key in seen_rows
        found["repeated_prompt"] += prompt in seen_prompts and key not in seen_rows
        found["eval_overlap"] += prompt_key(row["question"]) in held
        seen_rows.add(key)
        seen_prompts.add(prompt)
    gaps, n = [len(words(r["chosen"])) - len(words(r["rejected"])) for r in rows], max(1, len(rows))
    return {"pairs": len(rows), **{k: found[k] for k in ("identical", "duplicate", "repeated_prompt", "eval_overlap")},
            "mean_gap_words": sum(gaps) / n, "chosen_longer": sum(g > 0 for g in gaps) / n}


def rule_check(row: Mapping, answer: str) -> bool | None:
    """Is ``answer`` right by what its prompt states? Reads the system prompt and the question, never the labels
    (None: no rule for this kind of pair).

    - ``correct_vs_wrong``: "X is larger/smaller than Y" holds for the question's two numbers; otherwise the last word
      of the answer's first sentence (the colour) occurs in the question;
    - ``follows_system``: the answer starts with the word the system prompt asks for;
    - ``concise_vs_rambling``: the answer is one sentence.
    A refusal (``helpful_vs_evasive``) could only be recognised with a list of refusal phrases: no rule.
    """
    kind, question = row.get("kind"), row["question"]
    if kind == "correct_vs_wrong":
        numbers = [int(n) for n in re.findall(r"\d+", question)]
        if len(numbers) == 2:
            said = re.match(r"\s*(\d+) is (larger|smaller) than (\d+)", answer)
            a, b = (int(said[1]), int(said[3])) if said else (0, 0)
            return bool(said) and {a, b} == set(numbers) and (a > b if said[2] == "larger" else a < b)
        first = re.split(r"(?<=[.!?])\s", answer.strip(), maxsplit=1)[0]
        return (words(first) or [""])[-1] in words(question)
    if kind == "follows_system":
        asked = re.search(r"with the word '([^']+)'", row["system"])
        return asked is not None and (words(answer) or [""])[0] == asked[1].lower()
    if kind == "concise_vs_rambling":
        return len(re.findall(r"[.!?](?:\s|$)", answer.strip())) <= 1
    return None


def compare(chosen: float | None, rejected: float | None, tie_margin: float = 0.0) -> Verdict:
    """The verdict of two scores: a tie within ``tie_margin``, else the higher one is the better answer."""
    if chosen is None or rejected is None:
        return Verdict(None, chosen, rejected)
    margin = chosen - rejected
    return Verdict("tie" if abs(margin) <= tie_margin else "agree" if margin > 0 else "reversed", chosen, rejected)


def rule_verdicts(rows: Sequence[Mapping]) -> list[Verdict]:
    """The rule checks on both answers of each pair (1 = right, 0 = wrong): both equal is a tie."""
    def score(row: Mapping, answer: str) -> float | None:
        right = rule_check(row, answer)
        return None if right is None else float(right)

    return [compare(score(r, r["chosen"]), score(r, r["rejected"])) for r in rows]


@torch.no_grad()
def reward_scores(model, tokenizer, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
    """A sequence-classification reward model's score of each text (prompt + answer) [N], tokenised as TRL's
    ``RewardTrainer`` does (``tokenizer(text)``, special tokens included) and right-padded: the model reads its score
    at the last token that is not padding (``config.pad_token_id``). Batches of similar length."""
    model.eval()
    device = next(model.parameters()).device
    side, tokenizer.padding_side = tokenizer.padding_side, "right"
    scores = torch.zeros(len(texts))
    try:
        for batch in by_length([len(t) for t in texts], batch_size):
            enc = tokenizer([texts[i] for i in batch], return_tensors="pt", padding=True).to(device)
            scores[batch] = model(**enc).logits[:, 0].float().cpu()
    finally:
        tokenizer.padding_side = side
    return scores


def margin_verdicts(chosen: torch.Tensor, rejected: torch.Tensor, tie_margin: float) -> list[Verdict]:
    """A reward model's verdicts. Its scores mean nothing alone (the Bradley-Terry loss sees only differences), so they
    are standardised over every answer scored here (mean 0, standard deviation 1): a tie margin and a minimum chosen
    score then mean the same in every run."""
    both = torch.cat([chosen, rejected]).double()
    mean, std = both.mean(), both.std().clamp(min=1e-12)
    z_chosen, z_rejected = ((chosen.double() - mean) / std).tolist(), ((rejected.double() - mean) / std).tolist()
    return [compare(c, r, tie_margin) for c, r in zip(z_chosen, z_rejected)]


def join_argilla(rows: Sequence[Mapping], rated: Sequence[Mapping]) -> list[Mapping | None]:
    """argilla's row for each of ``rows`` (orca columns) by question and original chosen answer (argilla's ``input``
    is orca's ``question``; control strings made inert on both sides, as the course loads hub data), or None."""
    def key(question: str, chosen: str) -> tuple[str, str]:
        return escape_control_strings(question).strip(), escape_control_strings(chosen).strip()

    found = {key(r["input"], r["original_chosen"]): r for r in rated}
    return [found.get(key(row["question"], row["chosen"])) for row in rows]


def argilla_verdicts(joined: Sequence[Mapping | None]) -> list[Verdict]:
    """argilla's judgement of each joined pair: ``status`` unchanged / swapped / tie and the ratings (``rating`` lists
    them in the order ``order`` names the answers). No rating, no verdict (argilla counts it a tie)."""
    verdicts = []
    for r in joined:
        by_label = dict(zip(r["order"], r["rating"])) if r and r["rating"] else None
        status = {"unchanged": "agree", "swapped": "reversed", "tie": "tie"}[r["status"]] if by_label else None
        verdicts.append(Verdict(status, *((by_label["chosen"], by_label["rejected"]) if by_label else ())))
    return verdicts


def first_verdict(*judges: Sequence[Verdict]) -> list[Verdict]:
    """Per pair, the verdict of the first judge that has one: a trusted judge where it can decide, others elsewhere."""
    return [next((v for v in found if v.status is not None), Verdict(None)) for found in zip(*judges, strict=True)]


def agreement(a: Sequence[Verdict], b: Sequence[Verdict], names: tuple[str, str]) -> pd.DataFrame:
    """Two judges' verdicts on the same pairs as a table of counts ("none" = no verdict)."""
    order = ["agree", "reversed", "tie", "none"]
    table = pd.crosstab(pd.Series([v.status or "none" for v in a], name=names[0]),
                        pd.Series([v.status or "none" for v in b], name=names[1]))
    return table.reindex(index=order, columns=order, fill_value=0)


def detection(verdicts: Sequence[Verdict], truth: Sequence[str]) -> dict[str, dict[str, float]]:
    """How well a judge finds the planted defects - swapped pairs (flagged ``reversed``) and ties (flagged ``tie``;
    an identical pair is a tie too): counts, precision (flagged pairs that are defects), recall (defects flagged)."""
    result = {}
    for defect, status, truths in (("swapped", "reversed", {"swapped"}), ("tie", "tie", {"tie", "identical"})):
        flagged, real = [v.status == status for v in verdicts], [t in truths for t in truth]
        hits = sum(f and r for f, r in zip(flagged, real, strict=True))
        result[defect] = {"defects": sum(real), "flagged": sum(flagged), "found": hits,
                          "precision": hits / sum(flagged) if any(flagged) else float("nan"),
                          "recall": hits / sum(real) if any(real) else float("nan")}
    return result


def filter_pairs(rows: Sequence[Mapping], verdicts: Sequence[Verdict], *, eval_questions: Sequence[str],
                 min_chosen_score: float, extra_overlap: Sequence[bool] | None = None) -> tuple[list[dict], dict]:
    """argilla's recipe, rule by rule (:data:`RULES`): drop pairs whose question is in the evaluation data (or flagged
    in ``extra_overlap``, e.g. argilla's ``in_gsm8k_train``), identical pairs, exact repeats, pairs without a verdict
    and ties; swap the pairs the judge reverses; keep those whose chosen answer scores at least ``min_chosen_score``.
    Returns the kept rows (``swapped_by_filter`` says which were swapped) and how many each rule removed."""
    held = {prompt_key(q) for q in eval_questions}
    removed, kept, seen = dict.fromkeys(RULES, 0), [], set()
    for i, (row, v) in enumerate(zip(rows, verdicts, strict=True)):
        key, swap = tuple(row[f] for f in FIELDS), v.status == "reversed"
        score = v.rejected if swap else v.chosen
        rule = next((name for name, hit in zip(RULES, (
            prompt_key(row["question"]) in held or bool(extra_overlap and extra_overlap[i]),
            row["chosen"].strip() == row["rejected"].strip(), key in seen, v.status is None, v.status == "tie",
            score is None or score < min_chosen_score)) if hit), None)
        seen.add(key)
        if rule:
            removed[rule] += 1
        else:
            kept.append({**row, "chosen": row["rejected"], "rejected": row["chosen"]} if swap else dict(row))
            kept[-1]["swapped_by_filter"] = swap
    return kept, {"pairs in": len(rows), **removed, "swapped (kept)": sum(r["swapped_by_filter"] for r in kept),
                  "pairs out": len(kept)}


def label_errors(rows: Sequence[Mapping]) -> float:
    """Share of pairs (with the generator's ``defect`` column) whose label is wrong or a tie: a swapped pair stays
    wrong unless the filter swapped it back; a right pair the filter swapped becomes wrong."""
    wrong = [r["defect"] in ("tie", "identical") or (r["defect"] == "swapped") != r.get("swapped_by_filter", False)
             for r in rows]
    return sum(wrong) / max(1, len(wrong))


def as_dataset(rows: Sequence[Mapping], profile: Profile, tokenizer, split: str) -> datasets.Dataset:
    """Rows in orca columns as notebook 04 trains on them: ChatML-formatted, pairs over the length limits dropped."""
    raw = datasets.Dataset.from_list([{f: r[f] for f in FIELDS} | {"kind": r.get("kind", "all")} for r in rows])
    return format_and_filter(raw, profile, tokenizer, split)[0].remove_columns("row")


def evaluate(model, tokenizer, heldout, heldout_rows: Sequence[Mapping]) -> dict[str, float]:
    """A policy on the held-out pairs: per-token preference accuracy, and its greedy answers' well-formed share,
    rule-following (:func:`helpers.scoring.follows_rule`, against the pair's own answers) and mean length in words."""
    accuracy = scoring.preference_accuracy(scoring.score_pairs(model, tokenizer, heldout))["per_token"]
    answers = greedy_generate(model, tokenizer, list(heldout["prompt"]))
    health = scoring.generation_health(answers, heldout_rows)
    return {"accuracy": accuracy, "well_formed": health["well_formed"], "follows_rule": health["follows_rule"],
            "words": scoring.mean_words([a.text for a in answers])}
