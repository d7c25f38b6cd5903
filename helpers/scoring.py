"""Scoring models on preference pairs and on their own answers: what every notebook that trains measures.

- :func:`score_pairs` / :func:`preference_accuracy`: how likely a model finds each held-out answer, and the share of
  pairs whose chosen answer it prefers; :func:`implicit_rewards`: DPO's reward β·(log π − log π_ref).
- :func:`greedy_generate` / :func:`generation_health`: a preference metric alone can lie (a collapsed model can
  still rank pairs), so the course always reports it beside the share of well-formed greedy answers and a rule check
  per kind of pair (:func:`follows_rule`).

Pairs are tokenised as TRL 1.16 tokenises them for training (:func:`helpers.chatml.tokenize_pair`), so a score
measures what TRL trained.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from trl.trainer.utils import selective_log_softmax

from helpers.chatml import tokenize_pair

ANSWER_BUDGET = 64  # new tokens a well-formed greedy answer must end within
LOGIT_BUDGET = 2**28  # logits per scoring batch (rows x tokens x vocabulary): 1 GiB in fp32


def by_length(lengths: Sequence[int], batch_size: int, max_tokens: int | None = None) -> list[list[int]]:
    """Indices in batches of similar length, longest first (little padding; results keep their order).
    ``max_tokens`` caps a batch's padded size, so long rows come in smaller batches."""
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        last = batches[-1] if batches else None
        if last and len(last) < batch_size and (max_tokens is None or (len(last) + 1) * lengths[last[0]] <= max_tokens):
            last.append(i)
        else:
            batches.append([i])
    return batches


@torch.no_grad()
def ids_logprobs(model, pad_id: int, rows: Sequence[tuple[list[int], list[int]]], batch_size: int = 16
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The log-likelihood of each answer given its prompt, summed over the answer's tokens: ``(sums [N], counts [N])``
    for ``rows`` of ``(prompt_ids, answer_ids)``.

    TRL's ``selective_log_softmax`` gathers each target token's log-probability row by row instead of materialising a
    [rows, tokens, vocabulary] log-softmax (3.9 GiB for 16 answers of 1,000 tokens with Mistral's vocabulary).
    """
    model.eval()
    device = next(model.parameters()).device
    full = [p + a for p, a in rows]
    sums, counts = torch.zeros(len(full)), torch.zeros(len(full))
    vocab = model.get_output_embeddings().weight.shape[0]
    for batch in by_length([len(r) for r in full], batch_size, max_tokens=max(1, LOGIT_BUDGET // vocab)):
        width = max(len(full[i]) for i in batch)
        pad = [width - len(full[i]) for i in batch]
        ids = torch.tensor([full[i] + [pad_id] * n for i, n in zip(batch, pad)], device=device)
        attention = torch.tensor([[1] * len(full[i]) + [0] * n for i, n in zip(batch, pad)], device=device)
        mask = torch.tensor([[0] * len(rows[i][0]) + [1] * len(rows[i][1]) + [0] * n for i, n in zip(batch, pad)],
                            device=device)[:, 1:].float()
        logps = selective_log_softmax(model(input_ids=ids, attention_mask=attention).logits[:, :-1], ids[:, 1:])
        sums[batch] = (logps.float() * mask).sum(1).cpu()
        counts[batch] = mask.sum(1).cpu()
    return sums, counts


def answer_logprobs(model, tokenizer, prompts: Sequence[str], answers: Sequence[str], batch_size: int = 16
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`ids_logprobs` of answers to prompts, each tokenised as TRL does (:func:`helpers.chatml.tokenize_pair`)."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    rows = [tokenize_pair(tokenizer, p, a) for p, a in zip(prompts, answers)]
    return ids_logprobs(model, tokenizer.pad_token_id, rows, batch_size)


@dataclass
class PairScores:
    """A model's summed answer log-likelihoods on preference pairs, and their token counts."""

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
    """Score every (prompt, chosen, rejected) of a ChatML-formatted data set under ``model``, each pair tokenised and
    split exactly as TRL's DPOTrainer splits it (both answers at one boundary)."""
    prompts = list(formatted["prompt"])
    split = [tokenize_pair(tokenizer, p, c, r) for p, c, r in zip(prompts, formatted["chosen"], formatted["rejected"])]
    chosen = ids_logprobs(model, tokenizer.pad_token_id, [(p, c) for p, c, _ in split], batch_size)
    rejected = ids_logprobs(model, tokenizer.pad_token_id, [(p, r) for p, _, r in split], batch_size)
    kinds = list(formatted["kind"]) if "kind" in formatted.column_names else ["all"] * len(prompts)
    return PairScores(chosen[0], rejected[0], chosen[1], rejected[1], kinds)


def by_kind(values: Sequence[float], kinds: Sequence[str]) -> dict[str, float]:
    """The mean of ``values`` per kind of pair."""
    groups: dict[str, list[float]] = defaultdict(list)
    for value, kind in zip(values, kinds):
        groups[kind].append(float(value))
    return {kind: sum(v) / len(v) for kind, v in sorted(groups.items())}


def preference_accuracy(scores: PairScores) -> dict:
    """Share of pairs whose chosen answer is the likelier one: ``sum`` over answer tokens (what DPO optimises;
    flatters short answers) and ``per_token`` (fair between a concise and a rambling answer), overall and by kind."""
    wins_sum = (scores.chosen_sum > scores.rejected_sum).float().tolist()
    wins_mean = (scores.chosen_mean > scores.rejected_mean).float().tolist()
    return {"sum": sum(wins_sum) / len(wins_sum), "per_token": sum(wins_mean) / len(wins_mean),
            "by_kind": {"sum": by_kind(wins_sum, scores.kinds), "per_token": by_kind(wins_mean, scores.kinds)}}


def implicit_rewards(policy: PairScores, reference: PairScores, beta: float) -> dict:
    """DPO's implicit rewards β·(log π − log π_ref): accuracy and mean margin, overall and by kind."""
    chosen = beta * (policy.chosen_sum - reference.chosen_sum)
    rejected = beta * (policy.rejected_sum - reference.rejected_sum)
    wins = ((chosen - rejected) > 0).float().tolist()
    return {"accuracy": sum(wins) / len(wins), "mean_margin": (chosen - rejected).mean().item(),
            "mean_chosen": chosen.mean().item(), "mean_rejected": rejected.mean().item(),
            "by_kind": by_kind(wins, policy.kinds)}


@dataclass
class Generation:
    """One answer: its text, its token ids and whether it ended with the end-of-turn token."""

    prompt: str
    text: str
    token_ids: list[int]
    ended: bool


def as_generation(tokenizer, prompt: str, new_ids: Sequence[int]) -> Generation:
    """Generated ids as a :class:`Generation`: padding dropped, cut after the first end-of-turn token."""
    ids = [t for t in new_ids if t != tokenizer.pad_token_id]
    ended = tokenizer.eos_token_id in ids
    if ended:
        ids = ids[: ids.index(tokenizer.eos_token_id) + 1]
    return Generation(prompt, tokenizer.decode(ids, skip_special_tokens=True).strip(), ids, ended)


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = ANSWER_BUDGET, batch_size: int = 16,
             samples: int = 1, temperature: float | None = None, seed: int = 0) -> list[list[Generation]]:
    """``samples`` answers to each ChatML prompt (``result[i][j]``): greedy when ``temperature`` is None, else plain
    temperature sampling, seeded, leaving the global random state as it was.

    Every generation setting is passed explicitly (``top_k=0``, ``top_p=1.0``, ``repetition_penalty=1.0``): a
    model's own generation config may set others (Qwen2.5-Instruct's sets a repetition penalty), and they would
    change even a greedy answer. Prompts are left-padded, tokenised as TRL tokenises them for training.
    """
    model.eval()
    device = next(model.parameters()).device
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature else \
        dict(do_sample=False)
    results: list[list[Generation]] = [[] for _ in prompts]
    lengths = [len(tokenizer(p)["input_ids"]) for p in prompts]
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for batch in by_length(lengths, batch_size):
                enc = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True).to(device)
                out = model.generate(**enc, max_new_tokens=max_new_tokens, num_return_sequences=samples,
                                     repetition_penalty=1.0, eos_token_id=tokenizer.eos_token_id,
                                     pad_token_id=tokenizer.pad_token_id, **sampling)
                new = out[:, enc["input_ids"].shape[1]:].tolist()  # [len(batch) * samples, tokens], prompt-major
                for k, i in enumerate(batch):
                    rows = new[k * samples:(k + 1) * samples]
                    results[i] = [as_generation(tokenizer, prompts[i], row) for row in rows]
    finally:
        tokenizer.padding_side = side
    return results


def greedy_generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = ANSWER_BUDGET,
                    batch_size: int = 16) -> list[Generation]:
    """One greedy (deterministic) answer to each ChatML prompt, in the order of ``prompts``."""
    found = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return [answers[0] for answers in found]


def has_repetition_loop(token_ids: Sequence[int], n: int = 3, times: int = 3) -> bool:
    """True when some ``n``-token sequence occurs ``times`` times in a row (a degenerate loop)."""
    ids = list(token_ids)
    return any(all(ids[s + k * n: s + (k + 1) * n] == ids[s: s + n] for k in range(times))
               for s in range(len(ids) - n * times + 1))


def is_well_formed(gen: Generation) -> bool:
    """Ends with ``<|im_end|>`` within the budget, says something, and does not loop."""
    return gen.ended and bool(gen.text) and not has_repetition_loop(gen.token_ids)


def words(text: str) -> list[str]:
    """Lower-case words and numbers of ``text``: what the rule checks compare."""
    return re.findall(r"[a-z0-9]+", text.lower())


def mean_words(texts: Sequence[str]) -> float:
    """The mean number of :func:`words` of ``texts`` (NaN for none)."""
    return sum(len(words(t)) for t in texts) / len(texts) if texts else float("nan")


def overlap_f1(answer: str, reference: str) -> float:
    """Unigram F1 between two texts' words, as ROUGE-1 F1 computes it (0 when either is empty)."""
    a, b = words(answer), words(reference)
    counts: dict[str, int] = defaultdict(int)
    for word in b:
        counts[word] += 1
    common = 0
    for word in a:
        if counts[word] > 0:
            common, counts[word] = common + 1, counts[word] - 1
    return 0.0 if common == 0 else 2 * common / (len(a) + len(b))


def follows_rule(kind: str, chosen: str, rejected: str, answer: str) -> bool:
    """Does ``answer`` show the preference its pair teaches? Judged from the pair's own two answers, no phrase list.

    - ``correct_vs_wrong``: the answer states the chosen (correct) answer's words, in order;
    - ``follows_system``: it starts with the word the chosen answer starts with (and the rejected one does not);
    - ``concise_vs_rambling``: it is shorter than halfway between the concise and the rambling answer;
    - anything else (``helpful_vs_evasive``, a hub data set's rows): it is closer in words to the chosen answer than
      to the rejected one (:func:`overlap_f1`).
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
    """Shares of well-formed answers and of answers that follow their pair's rule, overall and by kind.
    ``rows`` are the pairs the prompts came from (``kind``, ``chosen``, ``rejected``), in the same order."""
    if len(gens) != len(rows):
        raise ValueError(f"{len(gens)} generations but {len(rows)} rows")
    well = [float(is_well_formed(g)) for g in gens]
    rules = [float(follows_rule(r["kind"], r["chosen"], r["rejected"], g.text)) for g, r in zip(gens, rows)]
    return {"well_formed": sum(well) / len(well), "follows_rule": sum(rules) / len(rules),
            "follows_rule_by_kind": by_kind(rules, [r["kind"] for r in rows])}
