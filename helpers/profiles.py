"""Profiles: the one object every notebook, helper and test reads its settings from.

Three profiles share one shape:

- ``full``: the NeuralHermes-2.5 recipe exactly as its model card states it (one big GPU).
- ``t4``: the same recipe shape scaled to a free Colab T4 in a workshop hour.
- ``tiny``: CPU, offline: a tiny Mistral-architecture chat model the project builds itself,
  trained on the project's own preference pairs, with hyper-parameters that learn in seconds.

Every setting where ``t4`` or ``tiny`` departs from ``full`` is listed, with the reason, in
``Profile.differences`` so a learner can see exactly what was changed and why.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from helpers.standins import standins_active  # imports no library: the profile CLI stays fast

PROFILE_ENV_VAR = "COURSE_PROFILE"
PROFILE_NAMES = ("tiny", "t4", "full")
# GPU memory from which `full` is chosen: a "40 GB" A100 reports about 39.4 GiB; 24-32 GB cards stay on `t4`.
FULL_PROFILE_MIN_GIB = 35.0

# The seven linear projections of every Mistral decoder layer: the recipe adapts all of them.
MISTRAL_LINEAR_MODULES = ("k_proj", "gate_proj", "v_proj", "up_proj", "q_proj", "o_proj", "down_proj")


@dataclass(frozen=True)
class ModelSettings:
    """Which chat model is the starting point (the DPO policy and, adapter off, its reference)."""

    name: str  # a hub id, or "tiny" for the model the project builds offline
    chat_format: str = "chatml"
    needs_gpu: bool = True


@dataclass(frozen=True)
class DataSettings:
    """Where the preference pairs come from and how many are used."""

    source: str  # "hub" or "local"
    dataset: str  # hub id (orca schema: system, question, chosen, rejected) or local folder
    formatted_twin: str | None  # the same pairs already rendered in ChatML, for reference
    heldout_pairs: int  # pairs kept out of training for evaluation
    max_train_pairs: int | None  # None = all
    shuffle_seed: int = 42


@dataclass(frozen=True)
class QuantizationSettings:
    """How the base weights are stored while training (bitsandbytes)."""

    load_in_4bit: bool
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "auto"  # "auto" = chosen from the hardware (see helpers.hardware)


@dataclass(frozen=True)
class LoraSettings:
    """The low-rank adapter: what is trained instead of the full weights."""

    r: int
    alpha: int
    dropout: float
    bias: str = "none"
    task_type: str = "CAUSAL_LM"
    target_modules: tuple[str, ...] = MISTRAL_LINEAR_MODULES


@dataclass(frozen=True)
class TrainingSettings:
    """Optimiser, schedule and batch: the TrainingArguments part of the recipe."""

    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    gradient_checkpointing: bool
    learning_rate: float
    lr_scheduler_type: str
    max_steps: int
    warmup_steps: int
    optim: str  # the recipe's optimizer on CUDA; helpers.training swaps it where it cannot run
    precision: str = "auto"  # "auto" = bf16 where the GPU has it natively, fp16 on a T4, fp32 on CPU
    logging_steps: int = 1
    save_steps: int = 50
    seed: int = 42


@dataclass(frozen=True)
class DPOSettings:
    """The DPO trainer's own settings."""

    beta: float
    max_prompt_length: int  # TRL 1.x dropped this argument; helpers.chatml filters by it instead
    max_length: int  # prompt + answer, the only length TRL 1.x still enforces
    loss_type: tuple[str, ...] = ("sigmoid",)
    loss_weights: tuple[float, ...] | None = None
    precompute_ref_log_probs: bool = False  # TRL: the reference's log-probs in one pass before training


@dataclass(frozen=True)
class Profile:
    """A complete, named set of settings for one run of the course."""

    name: str
    description: str
    model: ModelSettings
    data: DataSettings
    quantization: QuantizationSettings
    lora: LoraSettings
    training: TrainingSettings
    dpo: DPOSettings
    differences: dict[str, str] = field(default_factory=dict)  # setting -> why it differs from full

    def to_dict(self) -> dict[str, Any]:
        """The profile as plain JSON-ready data (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def to_json(self) -> str:
        """The profile as indented JSON, as printed by ``python -m helpers profile NAME``."""
        return json.dumps(self.to_dict(), indent=2)

    def replace(self, section: str, **changes: Any) -> Profile:
        """A copy with some settings of one section changed, e.g. ``p.replace("training", max_steps=10)``."""
        if section not in {"model", "data", "quantization", "lora", "training", "dpo"}:
            raise ValueError(f"unknown profile section {section!r}")
        updated = dataclasses.replace(getattr(self, section), **changes)
        return dataclasses.replace(self, **{section: updated})


FULL = Profile(
    name="full",
    description="The NeuralHermes-2.5-Mistral-7B recipe exactly as its model card states it (one A100-class GPU).",
    model=ModelSettings(name="teknium/OpenHermes-2.5-Mistral-7B"),
    data=DataSettings(
        source="hub",
        dataset="Intel/orca_dpo_pairs",
        formatted_twin="mlabonne/chatml_dpo_pairs",
        heldout_pairs=200,
        max_train_pairs=None,
    ),
    quantization=QuantizationSettings(load_in_4bit=True),
    lora=LoraSettings(r=16, alpha=16, dropout=0.05),
    training=TrainingSettings(
        per_device_train_batch_size=4,
        gradient_accumulation_steps=4,
        gradient_checkpointing=True,
        learning_rate=5e-5,
        lr_scheduler_type="cosine",
        max_steps=200,
        warmup_steps=100,
        optim="paged_adamw_32bit",
        logging_steps=1,
        save_steps=50,
    ),
    dpo=DPOSettings(beta=0.1, max_prompt_length=1024, max_length=1536),
)

T4 = Profile(
    name="t4",
    description="The recipe's shape on a free Colab T4 (16 GB, fp16) in about a workshop hour.",
    model=ModelSettings(name="Qwen/Qwen2.5-0.5B-Instruct"),
    data=dataclasses.replace(FULL.data, max_train_pairs=2000),
    quantization=FULL.quantization,
    lora=FULL.lora,
    training=dataclasses.replace(FULL.training, max_steps=100, warmup_steps=10, save_steps=25),
    dpo=dataclasses.replace(FULL.dpo, max_prompt_length=512, max_length=768),
    differences={
        "model.name": "a 0.5B ChatML chat model instead of 7B: it fits a T4 with room for activations",
        "data.max_train_pairs": "2,000 of the ~12,900 pairs: 100 steps x 16 pairs use 1,600 of them",
        "training.max_steps": "100 instead of 200 so the run ends inside a workshop hour",
        "training.warmup_steps": "10 instead of 100: the seed warms up for half its run, too long for 100 steps",
        "training.save_steps": "25: a checkpoint every quarter of the run (Colab sessions get cut)",
        "dpo.max_prompt_length": "512 instead of 1024: activation memory on 16 GB",
        "dpo.max_length": "768 instead of 1536: activation memory on 16 GB",
        "training.precision": "fp16 (a T4 has no native bf16; chosen by helpers.hardware)",
    },
)

TINY = Profile(
    name="tiny",
    description="CPU and offline: a tiny Mistral-architecture chat model built by the project, on its own data.",
    model=ModelSettings(name="tiny", needs_gpu=False),
    data=DataSettings(
        source="local",
        dataset="data",
        formatted_twin=None,
        heldout_pairs=0,  # the local data ships its own held-out split
        max_train_pairs=None,
    ),
    quantization=QuantizationSettings(load_in_4bit=False, compute_dtype="float32"),
    lora=LoraSettings(r=16, alpha=16, dropout=0.05),
    training=TrainingSettings(
        per_device_train_batch_size=4,
        gradient_accumulation_steps=4,
        gradient_checkpointing=False,
        learning_rate=2e-3,
        lr_scheduler_type="cosine",
        max_steps=100,
        warmup_steps=10,
        optim="adamw_torch",
        precision="fp32",
        logging_steps=5,
        save_steps=50,
    ),
    dpo=DPOSettings(
        beta=0.1,
        max_prompt_length=192,
        max_length=256,
        loss_type=("sigmoid", "sft"),
        loss_weights=(1.0, 1.0),
        precompute_ref_log_probs=True,
    ),
    differences={
        "model.name": "a tiny Mistral-architecture chat model built offline (helpers.tiny_model), same module names",
        "data.source": "the project's own preference pairs in data/ (orca schema), nothing downloaded",
        "data.dataset": "the local folder data/ instead of the hub data set",
        "data.formatted_twin": "none: the local pairs are formatted by helpers.chatml, there is no pre-formatted twin",
        "data.heldout_pairs": "0 split off: data/heldout.jsonl is a held-out split with questions never seen in train",
        "quantization.compute_dtype": "float32: CPU arithmetic, bit-for-bit reproducible",
        "quantization.load_in_4bit": "off for training: 4-bit on CPU is slow; notebook 02 shows it in 4-bit",
        "training.gradient_checkpointing": "off: tiny activations are a few MB; recomputing them only costs time",
        "training.learning_rate": "2e-3 instead of 5e-5: a tiny randomly-initialised model needs far larger steps",
        "training.max_steps": "100 instead of 200: held-out accuracy stops rising by step 100 (0.881 at 100 and "
        "at 200 steps, measured)",
        "training.warmup_steps": "10 instead of 100: the run is short, half of it warming up would waste it",
        "training.optim": "plain AdamW: paged optimizers page GPU memory, there is none on CPU",
        "training.precision": "fp32: CPU, and bit-for-bit reproducible",
        "training.logging_steps": "5: enough points for the curves without a long log",
        "dpo.max_prompt_length": "192: the tiny data's prompts are short",
        "dpo.max_length": "256: the tiny data's pairs are short",
        "dpo.loss_weights": "1.0 for each of the two losses (the recipe has one loss, no weights)",
        "dpo.precompute_ref_log_probs": "on: the reference's log-probs once, before training, instead of a second "
        "forward pass every step; the same numbers, about 1.4x the steps per second on CPU (measured)",
        "dpo.loss_type": "sigmoid DPO plus a supervised term on the chosen answer (RPO-style): plain DPO "
        "collapses the tiny model's text (see notebook 06)",
    },
)

PROFILES: dict[str, Profile] = {p.name: p for p in (TINY, T4, FULL)}


def resolve_profile_name(name: str | None = None) -> tuple[str, str]:
    """Which profile to run and why: an explicit name, else $COURSE_PROFILE, else by hardware."""
    if name:
        how = "asked for explicitly"
    elif os.environ.get(PROFILE_ENV_VAR):
        name, how = os.environ[PROFILE_ENV_VAR], f"set by ${PROFILE_ENV_VAR}"
    else:
        from helpers.hardware import cuda_available, gpu_total_memory_gib  # torch: only when the hardware decides

        if not cuda_available():
            return "tiny", "no CUDA GPU found, so the CPU profile"
        memory = gpu_total_memory_gib()
        name = "full" if memory >= FULL_PROFILE_MIN_GIB else "t4"
        how = f"a CUDA GPU with {memory:.1f} GiB found ({'at least' if name == 'full' else 'under'} " \
              f"{FULL_PROFILE_MIN_GIB:.0f} GiB)"
    name = name.strip().lower()
    if name not in PROFILES:
        raise ValueError(
            f"unknown profile {name!r} ({how}); choose one of {', '.join(PROFILE_NAMES)} "
            f"(set ${PROFILE_ENV_VAR} or pass profile=...)"
        )
    return name, how


# What a GPU profile changes when it runs on a CPU, on the offline stand-ins (helpers.standins): everything else of
# the recipe stays, 4-bit NF4 and gradient checkpointing included. Keys start with "cpu." (not profile settings).
CPU_STANDIN_DIFFERENCES = {
    "cpu.model.name": "an offline stand-in served under the real hub id: the real architecture at tiny width, "
    "random weights (helpers.standins)",
    "cpu.data.dataset": "an offline stand-in of Intel/orca_dpo_pairs, a few hundred generated rows in its columns",
    "cpu.training.precision": "fp32: a CPU trains in neither fp16 nor bf16 mixed precision",
    "cpu.training.optim": "adamw_torch: paged optimizers page GPU memory (helpers.training.optimizer_name)",
    "cpu.quantization.compute_dtype": "float32; the 4-bit NF4 weights stay, with bitsandbytes' CPU repacking "
    "forbidden (helpers.loading.forbid_cpu_nf4_packing)",
    "cpu.lm_eval": "the course's own task instead of the card's suite, whose data sets cannot be fetched offline",
}


def get_profile(name: str | None = None, *, check_hardware: bool = True) -> Profile:
    """The profile called ``name`` (or the one chosen automatically); refuses a GPU profile on a CPU machine.

    The one exception: with the offline stand-ins switched on (``$COURSE_STANDINS=1``, :mod:`helpers.standins`) a
    GPU profile runs on a CPU, for tests; its ``differences`` then also list, under ``cpu.*``, what the CPU changes.
    """
    from helpers.hardware import cuda_available  # imports torch: not at the top, the profile CLI stays fast

    resolved, _ = resolve_profile_name(name)
    profile = PROFILES[resolved]
    if check_hardware and profile.model.needs_gpu and not cuda_available():
        if standins_active():
            return dataclasses.replace(profile, differences={**profile.differences, **CPU_STANDIN_DIFFERENCES})
        raise RuntimeError(
            f"profile {resolved!r} needs a CUDA GPU and this machine has none; "
            f"use profile 'tiny' on CPU (set ${PROFILE_ENV_VAR}=tiny)"
        )
    return profile


def describe_profile(name: str | None = None) -> str:
    """One line saying which profile runs and why, printed at the top of every notebook."""
    resolved, how = resolve_profile_name(name)
    return f"profile: {resolved} ({how}) - {PROFILES[resolved].description}"
