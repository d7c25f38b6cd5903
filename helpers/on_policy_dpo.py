"""On-policy, iterative and online DPO (notebook 10): preference pairs made from the policy's own answers.

Notebook 04 trains on someone else's fixed pairs (off-policy: the answers were written by other models). Here the
SFT'd model answers the training prompts itself, several times each (:func:`sample_answers`). Two judges score those
answers side by side: the course's rule checks (:func:`rule_scores`, built on ``helpers.evaluation.follows_rule`` and
``is_well_formed``: each answer is judged from its prompt's own chosen and rejected answers) and a reward model that
the notebook trains with TRL's ``RewardTrainer`` (:func:`reward_model_scores`; :func:`require_usable_judge` refuses
one that cannot rank the held-out pairs). The best and the worst answer of each prompt become a chosen/rejected pair
(:func:`build_pairs`; prompts whose answers tie are dropped), and DPO on them is **on-policy**; repeated from the
policy it produced, **iterative**; with sampling and judging inside every training step (TRL's
``trl.experimental.online_dpo.OnlineDPOTrainer``, fed by :func:`trl_reward_function`), **online**.

The notebook calls ``RewardTrainer(...)``, ``DPOTrainer(...)`` and ``OnlineDPOTrainer(...)`` itself; this module
builds their arguments (:func:`reward_config_kwargs`, :func:`round_config_kwargs`, :func:`online_config_kwargs`) and
holds the plumbing: sampling, judging, pairs, evaluation (:func:`evaluate_policy`), the comparison table
(:func:`comparison_table`) and figure (:func:`plot_comparison`). The costly knobs have per-profile defaults
(:data:`ON_POLICY_SETTINGS`).
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import pandas as pd
import torch
from matplotlib.figure import Figure
from peft import LoraConfig

from helpers.evaluation import (
    GENERATION_BUDGET,
    Generation,
    follows_rule,
    generation_health,
    greedy_generate,
    implicit_rewards,
    is_well_formed,
    mean_words,
    preference_accuracy,
    score_pairs,
)
from helpers.hardware import compute_dtype, cuda_available
from helpers.loading import bnb_config, forbid_cpu_nf4_packing, local_cuda_device, model_source
from helpers.plots import save_figure
from helpers.profiles import Profile
from helpers.saving import write_json_atomically
from helpers.standins import standins_active
from helpers.training import dpo_config_kwargs, set_seed

JUDGES = ("reward_model", "rules")  # what builds the pairs: the trained reward model, or the course's rule checks

# --- per-profile defaults of the costly knobs ---------------------------------------------------------------------


@dataclass(frozen=True)
class OnPolicySettings:
    """The knobs of notebook 10 that decide its cost: how much to sample, judge and train."""

    prompts_per_round: int  # training prompts the policy answers in each round (fresh prompts every round)
    samples_per_prompt: int  # answers sampled per prompt; the best and the worst make the pair
    temperature: float  # sampling temperature: higher = more varied answers, fewer ties, more nonsense
    max_new_tokens: int  # the answer budget of a sample (and of the online trainer's samples)
    rounds: int  # on-policy rounds: round 1 from the SFT model, each next one from the previous round's policy
    round_steps: int  # DPO optimizer steps per round
    warmup_steps: int  # learning-rate warm-up of each round (and of the reward model and the online run)
    reward_steps: int  # RewardTrainer optimizer steps
    reward_learning_rate: float  # the reward model's learning rate (LoRA + a fresh score head)
    online_steps: int  # OnlineDPOTrainer optimizer steps (each one samples and judges its own batch)
    seed: int = 42  # the sampling seed (round r samples with seed + r)
    min_judge_accuracy: float = 0.75  # held-out pair accuracy below which the reward model is refused as a judge

    def __post_init__(self) -> None:
        if self.samples_per_prompt < 2:
            raise ValueError(f"samples_per_prompt must be at least 2 to make a pair, not {self.samples_per_prompt}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive (0 would be greedy: every sample equal), "
                             f"not {self.temperature}")
        if self.rounds < 1 or self.round_steps < 1 or self.prompts_per_round < 1:
            raise ValueError("rounds, round_steps and prompts_per_round must be at least 1")
        if not 0.0 <= self.min_judge_accuracy <= 1.0:
            raise ValueError(f"min_judge_accuracy is a share in [0, 1] (0.5 is a coin), not {self.min_judge_accuracy}")


# tiny: measured on 2 shared CPU cores (notebook 10 runs in about a minute). t4/full: estimated, not run on a GPU -
# one epoch over each round's pairs (pairs ~ prompts, 16 pairs a step), answers as long as the recipe's.
ON_POLICY_SETTINGS: dict[str, OnPolicySettings] = {
    "tiny": OnPolicySettings(prompts_per_round=64, samples_per_prompt=4, temperature=1.0, max_new_tokens=64,
                             rounds=2, round_steps=16, warmup_steps=2, reward_steps=20, reward_learning_rate=3e-3,
                             online_steps=4),
    "t4": OnPolicySettings(prompts_per_round=512, samples_per_prompt=4, temperature=0.8, max_new_tokens=256,
                           rounds=2, round_steps=32, warmup_steps=3, reward_steps=100, reward_learning_rate=1e-4,
                           online_steps=16),
    "full": OnPolicySettings(prompts_per_round=1024, samples_per_prompt=4, temperature=0.8, max_new_tokens=512,
                             rounds=3, round_steps=64, warmup_steps=6, reward_steps=200, reward_learning_rate=2e-5,
                             online_steps=50),
}

# What the defaults cost per profile: "measured" on tiny; on the GPUs "estimated" (never run there).
ON_POLICY_COSTS = {
    "tiny": "about 1 minute on 2 CPU cores (measured)",
    "t4": "about 1.5 hours on a T4: 2 x 2,048 sampled answers, 2 x 32 DPO steps, 100 reward-model steps, "
          "16 online steps, 5 evaluations (estimated)",
    "full": "about 5 hours on one A100: 3 x 4,096 sampled answers of the 7B model (transformers' generate: most of "
            "the time), 3 x 64 DPO steps, 200 reward-model steps, 50 online steps (estimated)",
}


# On the offline stand-ins (helpers.standins) a GPU profile runs on a CPU with random weights: its path is tested at
# these sizes (its own temperature, learning rates and loss), not at the GPU's. A reward model on random weights ranks
# pairs by chance, so the judge's floor is off there (the notebook prints the accuracy it got).
STANDIN_SIZES = {"prompts_per_round": 16, "max_new_tokens": 32, "round_steps": 4, "reward_steps": 4,
                 "online_steps": 2, "warmup_steps": 1, "min_judge_accuracy": 0.0}


def on_policy_settings(profile: Profile | str, **overrides: Any) -> OnPolicySettings:
    """The profile's :data:`ON_POLICY_SETTINGS`, with the ``overrides`` that are not None (the notebook's knobs).

    A GPU profile on the offline stand-ins (``$COURSE_STANDINS``) gets :data:`STANDIN_SIZES` first: its random
    stand-in model on a CPU only tests the code path.
    """
    name = str(getattr(profile, "name", profile))
    if name not in ON_POLICY_SETTINGS:
        raise ValueError(f"no on-policy settings for profile {name!r}; known: {', '.join(ON_POLICY_SETTINGS)}")
    changes = {key: value for key, value in overrides.items() if value is not None}
    unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(OnPolicySettings)})
    if unknown:
        raise ValueError(f"unknown on-policy setting(s) {', '.join(unknown)}")
    settings = ON_POLICY_SETTINGS[name]
    if name != "tiny" and standins_active():
        settings = dataclasses.replace(settings, **STANDIN_SIZES)
    return dataclasses.replace(settings, **changes)


def settings_table() -> pd.DataFrame:
    """:data:`ON_POLICY_SETTINGS` as a table, one column per profile (what a GPU profile would use instead)."""
    return pd.DataFrame({name: dataclasses.asdict(s) for name, s in ON_POLICY_SETTINGS.items()})


def loss_overrides(loss_type: Sequence[str] | None) -> dict[str, Any]:
    """``DPOConfig`` overrides for a round's loss: none for the profile's own (notebook 04's), else that
    ``loss_type`` list with no ``loss_weights`` (the profile's weights belong to its own pair of losses)."""
    if loss_type is None:
        return {}
    if isinstance(loss_type, str):
        raise TypeError(f"loss_type is a list in TRL 1.x: write [{loss_type!r}], not {loss_type!r}")
    return {"loss_type": list(loss_type), "loss_weights": None}


# --- prompts and sampling -----------------------------------------------------------------------------------------


def prompt_rows(formatted, eos_token: str, *, count: int, block: int, seed: int = 42) -> list[dict[str, str]]:
    """Block ``block`` (0, 1, ...) of ``count`` training prompts, drawn from one seeded shuffle of ``formatted``.

    Each round (and the online run) takes its own block, so every round answers prompts it has not seen; a block past
    the end wraps around. Rows keep ``kind`` and the pair's own answers, with the end-of-turn token taken off again:
    the rule checks judge an answer from them. ``formatted`` is ChatML-formatted (``prompt``, ``chosen``,
    ``rejected``, ``kind``), as ``helpers.data.prepare_data`` returns it.
    """
    if count < 1 or block < 0:
        raise ValueError(f"count must be >= 1 and block >= 0, not {count} and {block}")
    order = list(range(len(formatted)))
    random.Random(seed).shuffle(order)
    picked = [order[(block * count + i) % len(order)] for i in range(count)]
    rows = []
    for index in picked:
        row = formatted[index]
        rows.append({"prompt": row["prompt"], "kind": row.get("kind", "all"),
                     "chosen": row["chosen"].removesuffix(eos_token),
                     "rejected": row["rejected"].removesuffix(eos_token)})
    return rows


def user_turn(prompt: str) -> str:
    """The user's question inside a ChatML prompt (the text of its last ``user`` turn), for printing."""
    marker = "<|im_start|>user\n"
    if marker not in prompt:
        return prompt
    return prompt.rsplit(marker, 1)[1].split("<|im_end|>", 1)[0]


def _generation(tokenizer, prompt: str, row: Sequence[int]) -> Generation:
    """One sampled answer as a :class:`helpers.evaluation.Generation`: cut after the end-of-turn token, padding off."""
    ids = [t for t in row if t != tokenizer.pad_token_id]
    ended = tokenizer.eos_token_id in ids
    if ended:
        ids = ids[: ids.index(tokenizer.eos_token_id) + 1]
    return Generation(prompt, tokenizer.decode(ids, skip_special_tokens=True).strip(), ids, ended)


@torch.no_grad()
def sample_answers(
    model, tokenizer, prompts: Sequence[str], *, n: int, temperature: float, seed: int,
    max_new_tokens: int = GENERATION_BUDGET, batch_size: int = 32,
) -> list[list[Generation]]:
    """``n`` sampled answers to each ChatML prompt: ``result[i][j]`` is answer ``j`` to ``prompts[i]``.

    Plain temperature sampling (``top_k=0``, ``top_p=1.0``, no repetition penalty, all passed explicitly: a model's
    own generation config may set others, Qwen2.5-Instruct's does). The same ``seed``, prompts and ``batch_size``
    give the same answers on the same machine; the global random state is left as it was (``torch.random.fork_rng``).
    ``batch_size`` counts prompts: each ``generate`` call makes ``batch_size * n`` answers.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, not {n}")
    model.eval()
    device = next(model.parameters()).device
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    results: list[list[Generation]] = []
    cuda = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)
            for start in range(0, len(prompts), batch_size):
                chunk = list(prompts[start : start + batch_size])
                enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
                out = model.generate(
                    **enc, do_sample=True, temperature=temperature, top_k=0, top_p=1.0, repetition_penalty=1.0,
                    num_return_sequences=n, max_new_tokens=max_new_tokens,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                )
                rows = out[:, enc["input_ids"].shape[1] :].tolist()  # [len(chunk) * n, new tokens], prompt-major
                for i, prompt in enumerate(chunk):
                    results.append([_generation(tokenizer, prompt, row) for row in rows[i * n : (i + 1) * n]])
    finally:
        tokenizer.padding_side = side
    return results


# --- the two judges -----------------------------------------------------------------------------------------------


def rule_score(kind: str, chosen: str, rejected: str, gen: Generation) -> float:
    """The rule judge's score of one answer: 1 if well-formed plus 1 if it follows its pair's rule (0, 1 or 2)."""
    return float(is_well_formed(gen)) + float(follows_rule(kind, chosen, rejected, gen.text))


def rule_scores(samples: Sequence[Sequence[Generation]], rows: Sequence[Mapping[str, str]]) -> list[list[float]]:
    """:func:`rule_score` of every sample; ``rows[i]`` (``kind``, ``chosen``, ``rejected``) is ``samples[i]``'s pair."""
    if len(samples) != len(rows):
        raise ValueError(f"{len(samples)} prompts' samples but {len(rows)} rows")
    return [[rule_score(r["kind"], r["chosen"], r["rejected"], g) for g in gens] for gens, r in zip(samples, rows)]


@torch.no_grad()
def reward_scores(reward_model, tokenizer, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
    """The reward model's scalar score of each full text (prompt + answer) [N], tokenised as ``RewardTrainer`` does
    (``tokenizer(text)``, special tokens included), right-padded; the score is read at the last non-pad token."""
    reward_model.eval()
    device = next(reward_model.parameters()).device
    side, tokenizer.padding_side = tokenizer.padding_side, "right"
    found = []
    try:
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(list(texts[start : start + batch_size]), return_tensors="pt", padding=True).to(device)
            found.append(reward_model(**enc).logits[:, 0].float().cpu())
    finally:
        tokenizer.padding_side = side
    return torch.cat(found) if found else torch.zeros(0)


def sample_text(gen: Generation, eos_token: str) -> str:
    """What the reward model reads for a sample: prompt + answer, + the end-of-turn token when the answer ended."""
    return gen.prompt + gen.text + (eos_token if gen.ended else "")


def reward_model_scores(reward_model, tokenizer, samples: Sequence[Sequence[Generation]], batch_size: int = 32
                        ) -> list[list[float]]:
    """The reward model's score of every sample, in the shape of ``samples``."""
    flat = [sample_text(g, tokenizer.eos_token) for gens in samples for g in gens]
    values = reward_scores(reward_model, tokenizer, flat, batch_size).tolist()
    shaped, at = [], 0
    for gens in samples:
        shaped.append(values[at : at + len(gens)])
        at += len(gens)
    return shaped


def reward_accuracy(chosen: Sequence[float] | torch.Tensor, rejected: Sequence[float] | torch.Tensor) -> float:
    """Share of pairs whose chosen answer scores strictly higher than its rejected one (a tie counts as a miss)."""
    chosen, rejected = torch.as_tensor(chosen, dtype=torch.float64), torch.as_tensor(rejected, dtype=torch.float64)
    if chosen.shape != rejected.shape or chosen.numel() == 0:
        raise ValueError(f"need as many chosen as rejected scores, and some: {tuple(chosen.shape)} vs "
                         f"{tuple(rejected.shape)}")
    return (chosen > rejected).double().mean().item()


def heldout_reward_accuracy(reward_model, tokenizer, formatted, batch_size: int = 32) -> dict[str, Any]:
    """The reward model on held-out pairs: pair accuracy overall and by kind, and the mean score margin."""
    prompts = list(formatted["prompt"])
    chosen = reward_scores(reward_model, tokenizer, [p + c for p, c in zip(prompts, formatted["chosen"])], batch_size)
    rejected = reward_scores(reward_model, tokenizer, [p + r for p, r in zip(prompts, formatted["rejected"])],
                             batch_size)
    kinds = list(formatted["kind"]) if "kind" in formatted.column_names else ["all"] * len(prompts)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, kind in enumerate(kinds):
        groups[kind].append(i)
    return {
        "accuracy": reward_accuracy(chosen, rejected),
        "by_kind": {k: reward_accuracy(chosen[idx], rejected[idx]) for k, idx in sorted(groups.items())},
        "mean_margin": (chosen - rejected).mean().item(),
        "n": len(prompts),
    }


class JudgeRefused(ValueError):
    """A reward model too poor at ranking held-out pairs to be trusted as a judge."""


def require_usable_judge(accuracy: float, threshold: float, *, name: str = "the reward model") -> None:
    """Refuse a judge whose held-out pair accuracy is below ``threshold``: its pairs would teach its own mistakes."""
    if not accuracy >= threshold:  # also refuses NaN
        raise JudgeRefused(
            f"{name} ranks only {accuracy:.1%} of the held-out pairs right, below the {threshold:.0%} this notebook "
            "requires of a judge. Pairs built from its scores would teach the policy its mistakes (and a policy "
            "trained against a poor judge learns to please the judge, not you). Train it longer or on more pairs "
            "(settings.reward_steps), check its held-out accuracy by kind, or set JUDGE = 'rules'."
        )


def judge_agreement(primary: Sequence[Sequence[float]], other: Sequence[Sequence[float]], kinds: Sequence[str]
                    ) -> dict[str, dict[str, float]]:
    """How a second judge sees the pairs the first one would build, by kind and overall (``all``).

    For every prompt where ``primary`` does not tie, take its best and worst sample (as :func:`build_pairs` does) and
    ask ``other``: does it also score the best one higher (``agree``), equal (``tie``) or lower (``disagree``)?
    Returns shares, and ``pairs``, the number of prompts compared.
    """
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
        shares[key] = {**{v: c / total for v, c in counts[key].items()}, "pairs": total}
    return shares


# --- pairs from the best and the worst sample ---------------------------------------------------------------------


def best_and_worst(scores: Sequence[float]) -> tuple[int, int] | None:
    """Indices of the best (first of the highest) and the worst (last of the lowest) score; None when all tie."""
    if len(scores) < 2:
        raise ValueError(f"a pair needs at least 2 scored samples, got {len(scores)}")
    high, low = max(scores), min(scores)
    if high == low:
        return None
    return list(scores).index(high), len(scores) - 1 - list(scores)[::-1].index(low)


@dataclass(frozen=True)
class PairStats:
    """What :func:`build_pairs` kept: prompts judged, prompts dropped because their samples tie, pairs made."""

    prompts: int
    ties: int
    pairs: int

    def __str__(self) -> str:
        return f"{self.prompts} prompts: {self.pairs} pairs, {self.ties} dropped (their samples tie)"


def build_pairs(samples: Sequence[Sequence[Generation]], scores: Sequence[Sequence[float]],
                rows: Sequence[Mapping[str, str]], eos_token: str) -> tuple[list[dict[str, Any]], PairStats]:
    """One DPO pair per prompt: its best-scored sample as ``chosen``, its worst as ``rejected``.

    Prompts whose samples all score the same teach nothing and are dropped (counted in ``ties``), as are prompts
    whose best and worst samples are the same text. Answers end with exactly one ``eos_token`` (as the course's
    formatted pairs do), so TRL adds none. Each pair keeps its ``kind`` and both scores.
    """
    if not len(samples) == len(scores) == len(rows):
        raise ValueError(f"{len(samples)} samples, {len(scores)} scores and {len(rows)} rows: one of each per prompt")
    pairs, ties = [], 0
    for gens, values, row in zip(samples, scores, rows):
        if len(gens) != len(values):
            raise ValueError(f"{len(gens)} samples but {len(values)} scores for one prompt")
        picked = best_and_worst(values)
        if picked is None or gens[picked[0]].text == gens[picked[1]].text:
            ties += 1
            continue
        best, worst = picked
        pairs.append({"prompt": gens[best].prompt, "chosen": gens[best].text + eos_token,
                      "rejected": gens[worst].text + eos_token, "kind": row.get("kind", "all"),
                      "chosen_score": float(values[best]), "rejected_score": float(values[worst])})
    return pairs, PairStats(len(samples), ties, len(pairs))


def pairs_dataset(pairs: Sequence[Mapping[str, Any]]) -> datasets.Dataset:
    """The pairs as a ``datasets.Dataset`` with ``prompt``, ``chosen``, ``rejected`` and ``kind`` (what DPO reads)."""
    if not pairs:
        raise ValueError("no pairs to train on: every prompt's samples tied. Sample more answers per prompt, raise "
                         "the temperature, or use the other judge")
    return datasets.Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected", "kind")} for p in pairs])


def save_pairs(pairs: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """A round's pairs as JSON, written atomically (the solutions notebook reads them back)."""
    return write_json_atomically(path, list(pairs), indent=1)


def load_pairs(path: str | Path) -> list[dict[str, Any]]:
    """Pairs written by :func:`save_pairs`."""
    return json.loads(Path(path).read_text())


def judge(name: str, samples, rows, *, reward_model=None, tokenizer=None) -> list[list[float]]:
    """Scores of every sample by the judge called ``name``: ``"rules"`` or ``"reward_model"`` (see :data:`JUDGES`)."""
    if name == "rules":
        return rule_scores(samples, rows)
    if name == "reward_model":
        if reward_model is None or tokenizer is None:
            raise ValueError("the reward_model judge needs reward_model= and tokenizer=")
        return reward_model_scores(reward_model, tokenizer, samples)
    raise ValueError(f"unknown judge {name!r}; choose one of {', '.join(JUDGES)}")


def on_policy_pairs(policy, tokenizer, rows, settings: OnPolicySettings, *, round_index: int, judge_name: str,
                    reward_model=None) -> tuple[list[list[Generation]], list[dict[str, Any]], PairStats]:
    """One round's data, the steps notebook 10 shows one by one for round 1: sample ``settings.samples_per_prompt``
    answers to each row's prompt from ``policy`` (seed ``settings.seed + round_index``), judge them, build the pairs.
    Returns (samples, pairs, stats)."""
    samples = sample_answers(policy, tokenizer, [r["prompt"] for r in rows], n=settings.samples_per_prompt,
                             temperature=settings.temperature, seed=settings.seed + round_index,
                             max_new_tokens=settings.max_new_tokens)
    scores = judge(judge_name, samples, rows, reward_model=reward_model, tokenizer=tokenizer)
    pairs, stats = build_pairs(samples, scores, rows, tokenizer.eos_token)
    return samples, pairs, stats


# --- the reward model ---------------------------------------------------------------------------------------------


def reward_lora_config(profile: Profile) -> LoraConfig:
    """The profile's LoRA settings for a reward model: the same rank and projections, ``task_type="SEQ_CLS"``, and
    the new score head (``score``: hidden size -> 1, randomly initialised) trained in full (``modules_to_save``)."""
    lora = profile.lora
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias=lora.bias,
                      task_type="SEQ_CLS", target_modules=list(lora.target_modules), modules_to_save=["score"])


def load_reward_model(profile: Profile, tokenizer, *, source: str | None = None):
    """The profile's base model with a one-output score head (``AutoModelForSequenceClassification``, ``num_labels=1``).

    In 4-bit NF4 where the profile trains in 4-bit (QLoRA), like the policy. The score head is new: it is drawn
    after seeding with the profile's seed, so the run repeats. The pad token is set on the config: the model reads
    each sequence's score at its last non-pad token.
    """
    from transformers import AutoModelForSequenceClassification

    source = source or model_source(profile)
    kwargs: dict[str, Any] = {"num_labels": 1, "use_safetensors": True, "trust_remote_code": False}
    four_bit = profile.quantization.load_in_4bit
    if four_bit:
        kwargs["quantization_config"] = bnb_config(profile)
        kwargs["dtype"] = compute_dtype(profile.quantization.compute_dtype)
    else:
        kwargs["dtype"] = torch.float32 if not torch.cuda.is_available() else compute_dtype("auto")
    if torch.cuda.is_available():
        kwargs["device_map"] = {"": local_cuda_device()}
    set_seed(profile.training.seed)
    model = AutoModelForSequenceClassification.from_pretrained(source, **kwargs)
    model.config.pad_token_id = tokenizer.pad_token_id
    if four_bit and not torch.cuda.is_available():
        forbid_cpu_nf4_packing(model)
    return model


_DPO_ONLY = ("beta", "loss_type", "loss_weights", "precompute_ref_log_probs", "precompute_ref_batch_size")


def reward_config_kwargs(profile: Profile, settings: OnPolicySettings, output_dir: str | Path, **overrides: Any
                         ) -> dict[str, Any]:
    """Keyword arguments of TRL's ``RewardConfig``: the profile's batch, precision, optimizer, checkpointing and seed
    (as notebook 04's ``DPOConfig``), the reward model's own steps and learning rate, no checkpoints saved."""
    kwargs = dpo_config_kwargs(profile, output_dir)
    for field in _DPO_ONLY:
        kwargs.pop(field)
    kwargs.update(max_steps=settings.reward_steps, learning_rate=settings.reward_learning_rate,
                  warmup_steps=settings.warmup_steps, logging_steps=max(1, settings.reward_steps // 10),
                  save_strategy="no")
    kwargs.update(overrides)
    return kwargs


# --- DPO rounds and the online trainer ----------------------------------------------------------------------------


def round_config_kwargs(profile: Profile, settings: OnPolicySettings, output_dir: str | Path, **overrides: Any
                        ) -> dict[str, Any]:
    """Keyword arguments of one round's ``DPOConfig``: notebook 04's (loss, β, batch, learning rate, seed, ...), with
    ``settings.round_steps`` steps, a warm-up to match, a log point every few steps and no checkpoints."""
    return dpo_config_kwargs(profile, output_dir, **{
        "max_steps": settings.round_steps, "warmup_steps": settings.warmup_steps,
        "logging_steps": max(1, settings.round_steps // 8), "save_strategy": "no", **overrides})


def online_config_kwargs(profile: Profile, settings: OnPolicySettings, output_dir: str | Path, **overrides: Any
                         ) -> dict[str, Any]:
    """Keyword arguments of TRL's ``OnlineDPOConfig``: the profile's β, batch, learning rate, precision and seed, the
    sampling of the on-policy rounds (temperature, answer budget), ``settings.online_steps`` steps.

    TRL's online trainer has its own loss (``loss_type`` "sigmoid" or "ipo", no SFT term) and no reference
    pre-computation (its samples are new every step); those DPO fields are left out.
    """
    kwargs = dpo_config_kwargs(profile, output_dir)
    for field in ("loss_weights", "precompute_ref_log_probs", "precompute_ref_batch_size"):
        kwargs.pop(field)
    # max_length stays the profile's (prompt + answer): the prompts are filtered to max_prompt_length, and an answer
    # of max_new_tokens fits after the longest of them on every profile
    kwargs.update(max_steps=settings.online_steps, warmup_steps=min(settings.warmup_steps, settings.online_steps - 1),
                  logging_steps=1, save_strategy="no", remove_unused_columns=False,  # the judge reads kind, chosen, ...
                  max_new_tokens=settings.max_new_tokens, temperature=settings.temperature, loss_type="sigmoid")
    if not cuda_available():
        # the same prompts per step in one micro-batch: one generate call a step instead of one per micro-batch
        # (about 2.5 instead of 3.3 s a step for the tiny profile on a CPU, measured)
        kwargs["per_device_train_batch_size"] *= kwargs["gradient_accumulation_steps"]
        kwargs["gradient_accumulation_steps"] = 1
    kwargs.update(overrides)
    return kwargs


def prompts_per_step(config_kwargs: Mapping[str, Any]) -> int:
    """Prompts one optimizer step reads (one process): micro-batch x accumulation."""
    return int(config_kwargs["per_device_train_batch_size"]) * int(config_kwargs["gradient_accumulation_steps"])


def trl_reward_function(judge_name: str, tokenizer, *, reward_model=None) -> Callable[..., list[float]]:
    """The judge as a reward function for TRL's ``OnlineDPOTrainer(reward_funcs=...)``: the same scores the on-policy
    rounds used, for the two answers the trainer samples per prompt.

    TRL calls it with the prompts, the decoded answers (special tokens dropped), their token ids and the data set's
    other columns (``kind``, ``chosen``, ``rejected``: the rule judge reads them). An answer counts as ended when its
    ids hold the end-of-turn token, as in :func:`sample_answers`.
    """
    if judge_name not in JUDGES:
        raise ValueError(f"unknown judge {judge_name!r}; choose one of {', '.join(JUDGES)}")

    def reward(prompts, completions, completion_ids, **columns) -> list[float]:
        gens = [_generation(tokenizer, p, ids) for p, ids in zip(prompts, completion_ids)]
        rows = [{"kind": k, "chosen": c, "rejected": r}
                for k, c, r in zip(columns.get("kind", ["all"] * len(prompts)), columns.get("chosen", completions),
                                   columns.get("rejected", completions))]
        scores = judge(judge_name, [[g] for g in gens], rows, reward_model=reward_model, tokenizer=tokenizer)
        return [s[0] for s in scores]

    reward.__name__ = f"{judge_name}_judge"  # TRL logs the reward under this name
    return reward


def online_dataset(rows: Sequence[Mapping[str, str]]) -> datasets.Dataset:
    """Prompts for the online trainer, with ``kind`` and the pair's own answers for the rule judge."""
    return datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "kind", "chosen", "rejected")} for r in rows])


# --- evaluation, the table and the figure -------------------------------------------------------------------------


def evaluate_policy(model, tokenizer, data, base_scores, beta: float, *, max_new_tokens: int = GENERATION_BUDGET
                    ) -> dict[str, Any]:
    """A policy on the held-out pairs and prompts, as notebook 06 measures the course's model.

    ``accuracy``: per-token preference accuracy; ``margin``: mean implicit-reward margin β·Δ against the SFT model
    (``base_scores``, its :func:`helpers.evaluation.score_pairs` on the same pairs); ``chosen_logp_change``: how much
    more (or less) likely the held-out chosen answers became, summed over their tokens, mean over pairs; then the
    greedy answers' well-formed and rule-following shares and mean length in words.
    """
    model.eval()
    scores = score_pairs(model, tokenizer, data.heldout)
    rewards = implicit_rewards(scores, base_scores, beta)
    gens = greedy_generate(model, tokenizer, list(data.heldout["prompt"]), max_new_tokens=max_new_tokens,
                           batch_size=64)  # 64 answers a generate call: about 1.4x faster than 16 on a CPU (measured)
    health = generation_health(gens, data.heldout_rows)
    return {
        "accuracy": preference_accuracy(scores)["per_token"],
        "margin": rewards["mean_margin"],
        "chosen_logp_change": (scores.chosen_sum - base_scores.chosen_sum).mean().item(),
        "well_formed": health["well_formed"],
        "follows_rule": health["follows_rule"],
        "follows_rule_by_kind": health["follows_rule_by_kind"],
        "mean_words": mean_words([g.text for g in gens]),
        "answers": [g.text for g in gens[:3]],
    }


def summary_line(label: str, row: Mapping[str, Any]) -> str:
    """One line per evaluated policy: held-out accuracy and margin, then what its greedy answers do."""
    return (f"{label}: held-out accuracy {row['accuracy']:.3f} (per token), implicit-reward margin "
            f"{row['margin']:+.2f}, well-formed {row['well_formed']:.0%}, follows its rule {row['follows_rule']:.0%}, "
            f"{row['mean_words']:.1f} words")


def curve(history: Sequence[Mapping[str, float]], key: str = "logps/chosen") -> tuple[list[float], list[float]]:
    """(steps, values) of one logged metric of a TRL training log (rows without it are skipped)."""
    rows = [r for r in history if key in r and "step" in r]
    return [float(r["step"]) for r in rows], [float(r[key]) for r in rows]


def shift_steps(history: Sequence[Mapping[str, float]], by: int) -> list[dict[str, float]]:
    """A training log with its steps moved on by ``by``: round k's log drawn after the k-1 rounds before it."""
    return [{**row, "step": row["step"] + by} for row in history if "step" in row]


def logps_trend(history: Sequence[Mapping[str, float]], key: str = "logps/chosen") -> float:
    """How ``key`` moved over a run: the mean of its last quarter of logged values minus the mean of its first quarter
    (at least one value each). For ``logps/chosen``: > 0, the chosen answers of the training batches got likelier;
    < 0, less likely. Quarters, not the first and last value: each logged value is one batch's mean, and batches
    differ (short and long answers). NaN when nothing was logged."""
    _, values = curve(history, key)
    if not values:
        return float("nan")
    k = max(1, len(values) // 4)
    return sum(values[-k:]) / k - sum(values[:k]) / k


TABLE_COLUMNS = {
    "accuracy": "held-out acc. (per token)",
    "margin": "implicit-reward margin",
    "chosen_logp_change": "Δ log p(held-out chosen)",
    "well_formed": "well-formed",
    "follows_rule": "follows rule",
    "mean_words": "mean words",
    "logps_trend": "logps/chosen trend (training)",
    "steps": "steps",
}


def comparison_table(rows: Mapping[str, Mapping[str, Any]], digits: int = 3) -> pd.DataFrame:
    """One row per run (SFT model, off-policy, on-policy rounds, online), the comparison's columns, rounded once."""
    frame = pd.DataFrame.from_dict({name: {k: row.get(k, float("nan")) for k in TABLE_COLUMNS}
                                    for name, row in rows.items()}, orient="index")
    return frame.rename(columns=TABLE_COLUMNS).astype(float).round(digits)


BAR_METRICS = (("accuracy", "held-out acc.\n(per token)"), ("well_formed", "well-formed"),
               ("follows_rule", "follows rule"))


def plot_comparison(rows: Mapping[str, Mapping[str, Any]], histories: Mapping[str, Sequence[Mapping[str, float]]],
                    path: str | Path | None = None, title: str = "Off-policy, on-policy and online DPO") -> Figure:
    """Two panels, one colour per run: the held-out shares of every row of ``rows`` as bars, and ``logps/chosen`` of
    every training log in ``histories`` (named as its row; later rounds' steps shifted) over the optimizer steps.

    The right panel's values are summed nats of the chosen answers of each run's own training batches: notebook 04's
    fixed pairs for the off-policy run, the policy's own samples for the others - compare trends, not levels.
    """
    fig = Figure(figsize=(13, 4.4))
    bars, lines = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.2, 1]})
    names = list(dict.fromkeys([*rows, *histories]))
    colour = {name: f"C{i % 10}" for i, name in enumerate(names)}
    width = 0.8 / max(1, len(rows))
    for i, name in enumerate(rows):
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(BAR_METRICS))]
        bars.bar(xs, [rows[name][key] for key, _ in BAR_METRICS], width=width, color=colour[name], label=name)
    bars.set_xticks(range(len(BAR_METRICS)), [label for _, label in BAR_METRICS], fontsize=9)
    bars.set_ylim(0, 1.05)
    bars.set_title("held-out pairs and prompts", fontsize=10)
    for name, history in histories.items():
        steps, values = curve(history)
        lines.plot(steps, values, marker=".", color=colour[name], label=None if name in rows else name)
    lines.set_xlabel("optimizer step (later rounds after the earlier ones)")
    lines.set_ylabel("logps/chosen (summed, nats)")
    lines.set_title("log-likelihood of the chosen answers of the training batches", fontsize=10)
    handles, labels = bars.get_legend_handles_labels()
    extra, extra_labels = lines.get_legend_handles_labels()
    fig.legend(handles + extra, labels + extra_labels, loc="lower center", ncol=min(6, len(names)), fontsize=8)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    save_figure(fig, path)
    return fig


def save_comparison(rows: Mapping[str, Mapping[str, Any]], histories: Mapping[str, Sequence], path: str | Path
                    ) -> Path:
    """The comparison's rows and training logs as JSON, written atomically (the solutions notebook reads it back)."""
    return write_json_atomically(path, {"rows": rows, "histories": histories}, indent=1)


def load_comparison(path: str | Path) -> tuple[dict[str, dict], dict[str, list]]:
    """(rows, histories) written by :func:`save_comparison`."""
    saved = json.loads(Path(path).read_text())
    return saved["rows"], saved["histories"]
