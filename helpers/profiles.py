"""Profiles: every setting of a run in one object, under the libraries' own argument names.

- ``full``: the NeuralHermes-2.5-Mistral-7B recipe exactly as its model card states it (one A100-class GPU).
- ``t4``: the same recipe shape scaled to a free Colab T4 in a workshop hour.
- ``tiny``: CPU and offline: the course's tiny Mistral-architecture chat model (shipped in ``data/tiny_model``) on
  the course's own preference pairs, with settings that learn in seconds.

A profile holds what a cell passes to a library: ``BitsAndBytesConfig(**profile.bnb)``, ``LoraConfig(**profile.lora)``,
``DPOConfig(**profile.dpo)``, ``lm_eval.simple_evaluate(**profile.lm_eval)``; and the plans of notebooks 08, 10 and
11 (``beyond``, ``on_policy``, ``audit``). :func:`get_profile` also fits it to this machine (bf16 on Ampere and
newer, fp16 on a T4, fp32 and plain AdamW on a CPU). Every value that differs from the recipe is listed in
``Profile.why`` with the reason, so a learner sees exactly what changed.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data"
PROFILE_ENV_VAR = "COURSE_PROFILE"
FULL_PROFILE_MIN_GIB = 35.0  # a "40 GB" A100 reports about 39.4 GiB; 24-32 GB cards stay on t4
SEVEN_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# The card's benchmark suite (Nous' AGIEval, GPT4All, TruthfulQA) with the metric reported for each task.
CARD_SUITE = {"agieval_nous": "acc_norm", "arc_challenge": "acc_norm", "arc_easy": "acc_norm", "boolq": "acc",
              "hellaswag": "acc_norm", "openbookqa": "acc_norm", "piqa": "acc_norm", "winogrande": "acc",
              "truthfulqa_mc2": "mc2"}
COURSE_TASK = "course_preferences"  # the course's held-out pairs as an lm-eval task (helpers/lm_eval_tasks)


@dataclass(frozen=True)
class Profile:
    """One run's settings. Dicts are keyword arguments of the library call named in the comment."""

    name: str
    description: str
    model_id: str  # from_pretrained(model_id): a hub id, or the shipped tiny model's folder
    dataset: str  # a hub id (orca columns: system, question, chosen, rejected), or "data" for the course's own pairs
    train_pairs: int | None  # None = every pair
    heldout_pairs: int  # pairs a hub data set holds out for evaluation (the course's own data has its own split)
    max_prompt_length: int  # the recipe's prompt limit: TRL 1.x has none, the course drops longer pairs (notebook 01)
    bnb: dict[str, Any] | None  # BitsAndBytesConfig(**bnb) for training; None = not quantised
    lora: dict[str, Any]  # LoraConfig(**lora)
    dpo: dict[str, Any]  # DPOConfig(output_dir=..., **dpo)
    lm_eval: dict[str, Any]  # lm_eval.simple_evaluate(model=..., **lm_eval) and the metric reported per task
    beyond: dict[str, Any]  # notebook 08: steps, variants, betas, answers, training changes of the short runs
    on_policy: dict[str, Any]  # notebook 10: sampling, judging and training sizes
    audit: dict[str, Any]  # notebook 11: judges, filter thresholds, the two training runs
    real_model: bool = True  # False: a model that must never be pushed to the hub (tiny, stand-ins)
    why: dict[str, str] = field(default_factory=dict)  # "dpo.learning_rate" -> why it differs from the card
    dtype: str = "float32"  # from_pretrained(dtype=...) and the 4-bit compute dtype, chosen by the hardware

    def changes(self, section: str) -> dict[str, Any]:
        """The settings of ``section`` ("dpo", "lora", "bnb") that differ from the card (``full``): ``{}`` on full."""
        card = getattr(FULL, section) or {}
        mine = getattr(self, section) or {}
        return {k: v for k, v in mine.items() if card.get(k, _MISSING) != v}

    def with_changes(self, section: str, **changes: Any) -> Profile:
        """A copy with some settings of one section changed: ``profile.with_changes("dpo", max_steps=20)``."""
        if section in ("beyond", "on_policy", "audit", "lm_eval", "dpo", "lora", "bnb"):
            return replace(self, **{section: {**(getattr(self, section) or {}), **changes}})
        raise ValueError(f"unknown profile section {section!r}")

    def to_json(self) -> str:
        """The profile as indented JSON (``python scripts/dpo.py --print-profile`` shows it)."""
        return json.dumps({k: getattr(self, k) for k in self.__dataclass_fields__}, indent=2, default=str)


_MISSING = object()

# DPOConfig arguments the course adds on every profile: they are not the recipe, they run it.
COURSE_DPO = dict(
    gradient_checkpointing_kwargs={"use_reentrant": False},  # the non-reentrant checkpointing PyTorch recommends
    logging_steps=1,
    save_strategy="steps",
    save_steps=50,
    save_total_limit=2,
    report_to="none",  # "wandb" or "tensorboard" work too, never required
    seed=42,
    data_seed=42,
    loss_type=["sigmoid"],  # DPO's own loss (TRL 1.x takes a list)
    ddp_find_unused_parameters=False,  # every LoRA weight takes part in every forward (data-parallel runs)
)

FULL = Profile(
    name="full",
    description="The NeuralHermes-2.5-Mistral-7B recipe exactly as its model card states it (one A100-class GPU).",
    model_id="teknium/OpenHermes-2.5-Mistral-7B",
    dataset="Intel/orca_dpo_pairs",
    train_pairs=None,
    heldout_pairs=200,
    max_prompt_length=1024,
    bnb=dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
             bnb_4bit_compute_dtype="bfloat16"),
    lora=dict(r=16, lora_alpha=16, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
              target_modules=SEVEN_PROJECTIONS),
    dpo=dict(
        per_device_train_batch_size=4,
        gradient_accumulation_steps=4,
        gradient_checkpointing=True,
        learning_rate=5e-5,
        lr_scheduler_type="cosine",
        max_steps=200,
        warmup_steps=100,
        optim="paged_adamw_32bit",
        bf16=True,
        beta=0.1,
        max_length=1536,
        **COURSE_DPO,
    ),
    lm_eval=dict(tasks=list(CARD_SUITE), limit=None, batch_size=16, metrics=CARD_SUITE),
    beyond=dict(steps=60, variants=["sigmoid", "ipo", "orpo"], betas=[0.01], answers=32, reference_batch_size=16,
                training={"gradient_accumulation_steps": 1, "lr_scheduler_type": "constant_with_warmup"},
                cost="about 40 minutes on an A100 (estimated)"),
    on_policy=dict(prompts_per_round=1024, samples_per_prompt=4, temperature=0.8, max_new_tokens=512, rounds=3,
                   round_steps=64, warmup_steps=6, reward_steps=200, reward_learning_rate=2e-5, online_steps=50,
                   min_judge_accuracy=0.75, cost="about 5 hours on one A100 (estimated)"),
    audit=dict(dataset="argilla/distilabel-intel-orca-dpo-pairs", min_chosen_score=8.0, reward_steps=200,
               reward_learning_rate=2e-5, min_judge_accuracy=0.75, train_steps=200,
               cost="about 2.5 hours on one A100: two runs of the recipe and a reward model (estimated)"),
)

T4 = replace(
    FULL,
    name="t4",
    description="The recipe's shape on a free Colab T4 (16 GB, fp16) in about a workshop hour.",
    model_id="Qwen/Qwen2.5-0.5B-Instruct",
    train_pairs=2000,
    max_prompt_length=512,
    dpo={**FULL.dpo, "max_steps": 100, "warmup_steps": 10, "save_steps": 25, "max_length": 768},
    lm_eval={**FULL.lm_eval, "limit": 100},
    beyond={**FULL.beyond, "cost": "about 35 minutes on a free Colab T4 (estimated)"},
    on_policy={**FULL.on_policy, "prompts_per_round": 512, "max_new_tokens": 256, "rounds": 2, "round_steps": 32,
               "warmup_steps": 3, "reward_steps": 100, "reward_learning_rate": 1e-4, "online_steps": 16,
               "cost": "about 1.5 hours on a T4 (estimated)"},
    audit={**FULL.audit, "reward_steps": 100, "reward_learning_rate": 1e-4, "train_steps": 100,
           "cost": "about 1.5 hours on a T4 (estimated)"},
    why={
        "model_id": "a 0.5B ChatML chat model instead of 7B: it fits a T4 with room for activations",
        "train_pairs": "2,000 of the ~12,900 pairs: 100 steps x 16 pairs use 1,600 of them",
        "max_prompt_length": "512 instead of 1024: activation memory on 16 GB",
        "dpo.max_steps": "100 instead of 200, so that the run ends inside a workshop hour",
        "dpo.warmup_steps": "10 instead of 100: the card warms up for half its run, too long for 100 steps",
        "dpo.save_steps": "a checkpoint every quarter of the run: Colab sessions get cut",
        "dpo.max_length": "768 instead of 1536: activation memory on 16 GB",
        "lm_eval.limit": "100 documents per task: the card's nine tasks in full would take hours on a T4",
    },
)

TINY = replace(
    FULL,
    name="tiny",
    description="CPU and offline: the course's tiny Mistral-architecture chat model on the course's own pairs.",
    model_id="tiny_model",  # the shipped folder data/tiny_model (made absolute by get_profile)
    dataset="data",
    heldout_pairs=0,
    max_prompt_length=192,
    bnb=None,
    dpo={**FULL.dpo, "gradient_checkpointing": False, "learning_rate": 2e-3, "max_steps": 100, "warmup_steps": 10,
         "optim": "adamw_torch", "bf16": False, "max_length": 256, "logging_steps": 5,
         "loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 1.0],
         "precompute_ref_log_probs": True, "precompute_ref_batch_size": 64},
    lm_eval={**FULL.lm_eval, "tasks": [COURSE_TASK], "metrics": {COURSE_TASK: "acc"}},
    beyond={**FULL.beyond, "variants": ["sigmoid", "sigmoid+sft", "ipo", "hinge", "robust", "sigmoid_norm", "orpo"],
            "betas": [0.01, 0.5], "answers": 48, "reference_batch_size": 64,
            "cost": "about a minute on 2 CPU cores (measured)"},
    on_policy={**FULL.on_policy, "prompts_per_round": 64, "temperature": 1.0, "max_new_tokens": 64, "rounds": 2,
               "round_steps": 16, "warmup_steps": 2, "reward_steps": 20, "reward_learning_rate": 3e-3,
               "online_steps": 4, "cost": "about a minute on 2 CPU cores (measured)"},
    audit={**FULL.audit, "dataset": "data/train_noisy.jsonl", "min_chosen_score": 0.0, "reward_steps": 20,
           "reward_learning_rate": 3e-3, "train_steps": 30, "cost": "about a minute on 2 CPU cores (measured)"},
    real_model=False,
    why={
        "model_id": "the course's tiny Mistral-architecture chat model (data/tiny_model), same module names",
        "dataset": "the course's own preference pairs in data/ (orca columns), nothing downloaded",
        "heldout_pairs": "0 split off: data/heldout.jsonl is a held-out split whose questions train never sees",
        "max_prompt_length": "192: the course's prompts are short",
        "bnb": "none: the tiny model trains in fp32 (notebook 02 shows it in 4-bit)",
        "dpo.gradient_checkpointing": "off: the tiny model's activations are a few MB; recomputing them costs time",
        "dpo.learning_rate": "2e-3 instead of 5e-5: a tiny model from a short SFT needs far larger steps",
        "dpo.max_steps": "100 instead of 200: held-out accuracy stops rising by then (benchmarks/README.md)",
        "dpo.warmup_steps": "10 instead of 100: half of a short run spent warming up would waste it",
        "dpo.optim": "plain AdamW: a paged optimizer pages GPU memory, and there is none here",
        "dpo.bf16": "off: fp32 on a CPU",
        "dpo.max_length": "256: the course's pairs are short",
        "dpo.logging_steps": "5: enough points for the curves without a long log",
        "dpo.loss_type": "sigmoid DPO plus a supervised term on the chosen answer (RPO-style): plain DPO wrecks "
        "the tiny model's text (notebook 06)",
        "dpo.loss_weights": "1.0 for each of the two losses",
        "dpo.precompute_ref_log_probs": "the reference's log-probs once before training instead of a second "
        "forward pass at every step: the same numbers, faster on a CPU",
        "dpo.precompute_ref_batch_size": "64 pairs per batch of that one pass",
        "lm_eval.tasks": "the course's own held-out pairs as an lm-eval task: the card's suite needs the hub",
    },
)

PROFILES = {p.name: p for p in (TINY, T4, FULL)}


def cuda_memory_gib() -> float:
    """Total memory of this process's GPU in GiB; 0.0 without CUDA."""
    import torch  # here, not at the top: `import helpers.profiles` stays light for scripts that only read settings

    return torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else 0.0


def native_bf16() -> bool:
    """True on Ampere (compute capability 8.0) and newer; a T4 (7.5) emulates bf16 slowly."""
    import torch  # see cuda_memory_gib

    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


def resolve_name(name: str | None = None) -> tuple[str, str]:
    """Which profile runs, and why: ``name``, else $COURSE_PROFILE, else chosen by the GPU's memory."""
    if name:
        how = "asked for explicitly"
    elif os.environ.get(PROFILE_ENV_VAR):
        name, how = os.environ[PROFILE_ENV_VAR], f"set by ${PROFILE_ENV_VAR}"
    else:
        memory = cuda_memory_gib()
        if memory == 0.0:
            return "tiny", "no CUDA GPU found, so the CPU profile"
        name = "full" if memory >= FULL_PROFILE_MIN_GIB else "t4"
        how = f"a CUDA GPU with {memory:.1f} GiB"
    name = name.strip().lower()
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r} ({how}); choose one of {', '.join(PROFILES)} "
                         f"(set ${PROFILE_ENV_VAR} or the notebook's PROFILE parameter)")
    return name, how


def fit_to_machine(profile: Profile, *, cuda: bool, bf16: bool) -> Profile:
    """The profile with what this machine changes: precision, optimizer and compute dtype, each with its reason."""
    dpo, why = dict(profile.dpo), dict(profile.why)
    bnb = dict(profile.bnb) if profile.bnb else None
    if not cuda:
        dtype, changes = "float32", {"bf16": False, "use_cpu": True}
        if dpo.get("fp16"):
            changes["fp16"] = False
        if dpo["optim"].startswith("paged_"):
            changes["optim"] = "adamw_torch"
            why.setdefault("dpo.optim", "plain AdamW: a paged optimizer pages GPU memory, and there is none here")
        for key in changes:
            why.setdefault(f"dpo.{key}", "a CPU trains in fp32: neither fp16 nor bf16 mixed precision")
    elif bf16:
        dtype, changes = "bfloat16", {}
    else:
        dtype, changes = "float16", {"bf16": False, "fp16": True}
        why.setdefault("dpo.bf16", "off: this GPU has no native bf16 (a T4), so fp16 mixed precision")
        why.setdefault("dpo.fp16", "on: this GPU has no native bf16 (a T4)")
    dpo.update(changes)
    if bnb and bnb["bnb_4bit_compute_dtype"] != dtype:
        bnb["bnb_4bit_compute_dtype"] = dtype
        why.setdefault("bnb.bnb_4bit_compute_dtype", f"{dtype}: what this machine computes in")
    return replace(profile, dpo=dpo, bnb=bnb, dtype=dtype, why=why)


def get_profile(name: str | None = None, *, allow_cpu: bool = False) -> Profile:
    """The profile called ``name`` (or chosen automatically), fitted to this machine.

    A GPU profile on a machine without CUDA is refused (``allow_cpu``: the offline stand-ins of the tests run one).
    The tiny profile's model is the folder shipped in ``data/tiny_model``.
    """
    import torch  # see cuda_memory_gib

    resolved, _ = resolve_name(name)
    profile = copy.deepcopy(PROFILES[resolved])
    cuda = torch.cuda.is_available()
    if resolved != "tiny" and not cuda and not allow_cpu:
        raise RuntimeError(f"profile {resolved!r} needs a CUDA GPU and this machine has none; on a CPU use the "
                           f"tiny profile (set ${PROFILE_ENV_VAR}=tiny or PROFILE = 'tiny')")
    if resolved == "tiny":
        profile = replace(profile, model_id=str(DATA_DIR / "tiny_model"))
    return fit_to_machine(profile, cuda=cuda, bf16=native_bf16())


def describe(name: str | None = None) -> str:
    """One line saying which profile runs and why, printed at the top of every notebook."""
    resolved, how = resolve_name(name)
    return f"profile: {resolved} ({how}) - {PROFILES[resolved].description}"
