"""Evaluation: held-out preference accuracy, DPO implicit rewards, and the health of generated answers.

The preference metric alone can lie (a collapsed model can still rank pairs), so the course always
reports it next to the share of well-formed greedy answers and a per-kind rule check.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@torch.no_grad()
def answer_logprobs(
    model, tokenizer, prompts: Sequence[str], answers: Sequence[str], batch_size: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-likelihood of each answer given its prompt, summed over the answer's tokens only.

    Prompt and answer are tokenised together and split where they diverge, as TRL's DPO trainer does.
    Returns ``(sum_logps [N], answer_token_counts [N])``.
    """
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    model.eval()
    device = next(model.parameters()).device
    sums, counts = [], []
    for start in range(0, len(prompts), batch_size):
        rows, masks = [], []
        for prompt, answer in zip(prompts[start : start + batch_size], answers[start : start + batch_size]):
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            full_ids = tokenizer(prompt + answer, add_special_tokens=False)["input_ids"]
            split = 0
            while split < min(len(prompt_ids), len(full_ids)) and prompt_ids[split] == full_ids[split]:
                split += 1
            rows.append(full_ids)
            masks.append([0] * split + [1] * (len(full_ids) - split))
        width = max(len(r) for r in rows)
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
        attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
        answer_mask = torch.tensor([m + [0] * (width - len(m)) for m in masks], device=device)
        logits = model(input_ids=input_ids, attention_mask=attention).logits.float()
        logps = torch.gather(F.log_softmax(logits[:, :-1], dim=-1), 2, input_ids[:, 1:, None]).squeeze(2)
        mask = answer_mask[:, 1:].float()
        sums.append((logps * mask).sum(1).cpu())
        counts.append(mask.sum(1).cpu())
    return torch.cat(sums), torch.cat(counts)


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


def _by_kind(wins: torch.Tensor, kinds: list[str]) -> dict[str, float]:
    groups: dict[str, list[bool]] = defaultdict(list)
    for win, kind in zip(wins.tolist(), kinds):
        groups[kind].append(bool(win))
    return {kind: sum(v) / len(v) for kind, v in sorted(groups.items())}


def preference_accuracy(scores: PairScores) -> dict:
    """Share of pairs where the chosen answer is more likely than the rejected one.

    ``sum``: summed over answer tokens (what DPO optimises; flatters short answers);
    ``per_token``: averaged per token (fair between a concise and a rambling answer).
    """
    wins_sum = scores.chosen_sum > scores.rejected_sum
    wins_mean = scores.chosen_mean > scores.rejected_mean
    return {
        "sum": wins_sum.double().mean().item(),
        "per_token": wins_mean.double().mean().item(),
        "by_kind": {"sum": _by_kind(wins_sum, scores.kinds), "per_token": _by_kind(wins_mean, scores.kinds)},
    }


def implicit_rewards(policy: PairScores, reference: PairScores, beta: float) -> dict:
    """DPO's implicit rewards beta * (log pi - log pi_ref): accuracy and mean margin, overall and by kind."""
    chosen = beta * (policy.chosen_sum - reference.chosen_sum)
    rejected = beta * (policy.rejected_sum - reference.rejected_sum)
    margins = chosen - rejected
    return {
        "accuracy": (margins > 0).float().mean().item(),
        "mean_margin": margins.mean().item(),
        "mean_chosen": chosen.mean().item(),
        "mean_rejected": rejected.mean().item(),
        "by_kind": _by_kind(margins > 0, policy.kinds),
    }


# --- generation health -------------------------------------------------------------------------


@dataclass
class Generation:
    """One greedy answer: its text, its token ids and whether it ended with the end-of-turn token."""

    prompt: str
    text: str
    token_ids: list[int]
    ended: bool


@torch.no_grad()
def greedy_generate(
    model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 64, batch_size: int = 16
) -> list[Generation]:
    """Greedy answers (deterministic) to ChatML prompts, batched with left padding."""
    model.eval()
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    results: list[Generation] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            for prompt, row in zip(chunk, out[:, enc["input_ids"].shape[1] :].tolist()):
                ids = [t for t in row if t != tokenizer.pad_token_id]
                ended = tokenizer.eos_token_id in ids
                if ended:
                    ids = ids[: ids.index(tokenizer.eos_token_id) + 1]
                text = tokenizer.decode(ids, skip_special_tokens=True).strip()
                results.append(Generation(prompt, text, ids, ended))
    finally:
        tokenizer.padding_side = side
    return results


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


_EVASIVE = re.compile(r"\b(sorry|can't|cannot|don't know|rather not|someone else|find it yourself)\b", re.I)
_FILLER = re.compile(r"(good question|let me think|glad that you asked|hope that this helps|that is just what)", re.I)


def _normalise(text: str) -> str:
    return re.sub(r"[^a-z0-9 ]", "", text.lower()).strip()


def follows_rule(kind: str, system: str, question: str, chosen: str, answer: str) -> bool:
    """A simple check that a generated answer shows the preference of its kind.

    - correct_vs_wrong: the answer states the chosen (correct) answer;
    - helpful_vs_evasive: no evasive phrase;
    - concise_vs_rambling: no filler phrase, at most 30 words;
    - follows_system: starts with the word the system prompt asks for.
    """
    if kind == "correct_vs_wrong":
        return _normalise(chosen) in _normalise(answer)
    if kind == "helpful_vs_evasive":
        return bool(answer) and not _EVASIVE.search(answer)
    if kind == "concise_vs_rambling":
        return bool(answer) and not _FILLER.search(answer) and len(answer.split()) <= 30
    if kind == "follows_system":
        match = re.search(r"with the word '([^']+)'", system)
        return bool(match) and answer.startswith(match.group(1))
    raise ValueError(f"no rule check for kind {kind!r}")


def generation_health(gens: Sequence[Generation], rows) -> dict:
    """Share of well-formed answers, and of answers that follow their kind's rule, overall and by kind."""
    well = [is_well_formed(g) for g in gens]
    rules = [
        follows_rule(r["kind"], r["system"], r["question"], r["chosen"], g.text) for g, r in zip(gens, rows)
    ]
    kinds = [r["kind"] for r in rows]
    return {
        "well_formed": sum(well) / len(well),
        "follows_rule": sum(rules) / len(rules),
        "follows_rule_by_kind": _by_kind(torch.tensor(rules), kinds),
    }
