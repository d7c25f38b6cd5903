"""The ``full`` profile is the NeuralHermes-2.5 recipe: rendered into a LoraConfig and a DPOConfig, every
hyper-parameter of the model card's table comes out as the card states it. No weights are loaded.

On this CPU machine ``dpo_config`` would swap paged AdamW for plain AdamW and pick fp32, so the tests pretend
to be on an Ampere GPU (bf16) by patching the hardware checks, test the keyword arguments
(``helpers.training.dpo_config_kwargs``), and build the DPOConfig from them with ``use_cpu=True`` only because
transformers refuses bf16 on a machine without a GPU.
"""

from __future__ import annotations

import dataclasses

import pytest

from helpers import hardware, training
from helpers.lora import lora_config
from helpers.profiles import get_profile

# NeuralHermes-2.5-Mistral-7B's model card, "Training hyperparameters"
CARD_LORA = {
    "r": 16,
    "lora_alpha": 16,
    "lora_dropout": 0.05,
    "bias": "none",
    "task_type": "CAUSAL_LM",
    "target_modules": {"k_proj", "gate_proj", "v_proj", "up_proj", "q_proj", "o_proj", "down_proj"},
}
CARD_TRAINING = {
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 4,
    "gradient_checkpointing": True,
    "learning_rate": 5e-5,
    "lr_scheduler_type": "cosine",
    "max_steps": 200,
    "optim": "paged_adamw_32bit",
    "warmup_steps": 100,
}
CARD_DPO = {"beta": 0.1, "max_length": 1536}
CARD_MAX_PROMPT_LENGTH = 1024
CARD_MODEL = "teknium/OpenHermes-2.5-Mistral-7B"


@pytest.fixture
def full():
    return get_profile("full", check_hardware=False)


@pytest.fixture(autouse=True)
def no_weights(monkeypatch):
    """Any attempt to load a model fails the test: the recipe's config is checked without weights."""
    import transformers

    def refuse(*_args, **_kwargs):
        raise AssertionError("a model was loaded; the recipe's config must be checked without weights")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def _pretend_gpu(monkeypatch, *, bf16: bool) -> None:
    """Make helpers see a CUDA GPU: Ampere or newer (native bf16) or a T4 (no native bf16)."""
    for module in (training, hardware):
        monkeypatch.setattr(module, "cuda_available", lambda: True)
    monkeypatch.setattr(hardware, "native_bf16", lambda: bf16)


def _value(x):
    return getattr(x, "value", x)  # enums (OptimizerNames, SchedulerType, TaskType) -> their string


def test_full_profile_is_the_card(full):
    assert full.model.name == CARD_MODEL
    assert full.quantization.load_in_4bit and full.quantization.quant_type == "nf4"
    assert full.dpo.max_prompt_length == CARD_MAX_PROMPT_LENGTH and full.dpo.loss_type == ("sigmoid",)
    assert full.data.dataset == "Intel/orca_dpo_pairs" and full.differences == {}


def test_lora_config_is_the_card(full):
    config = lora_config(full)
    for key, expected in CARD_LORA.items():
        got = getattr(config, key)
        got = set(got) if key == "target_modules" else _value(got)
        assert got == expected, f"LoraConfig.{key} = {got!r}, the card says {expected!r}"


def test_dpo_config_kwargs_on_an_ampere_gpu_are_the_card(full, monkeypatch, tmp_path):
    _pretend_gpu(monkeypatch, bf16=True)
    kwargs = training.dpo_config_kwargs(full, tmp_path)
    for key, expected in {**CARD_TRAINING, **CARD_DPO}.items():
        assert kwargs[key] == expected, f"{key} = {kwargs[key]!r}, the card says {expected!r}"
    assert kwargs["bf16"] is True and kwargs["fp16"] is False and kwargs["use_cpu"] is False
    assert kwargs["loss_type"] == ["sigmoid"] and kwargs["loss_weights"] is None
    assert kwargs["gradient_checkpointing_kwargs"] == {"use_reentrant": False}
    assert "max_prompt_length" not in kwargs  # TRL 1.x has no such argument; the profile keeps it


def test_dpo_config_built_from_the_card(full, monkeypatch, tmp_path):
    from trl import DPOConfig

    _pretend_gpu(monkeypatch, bf16=True)
    kwargs = training.dpo_config_kwargs(full, tmp_path)
    # transformers refuses bf16 without a GPU unless use_cpu: the only field changed to build it here
    config = DPOConfig(**{**kwargs, "use_cpu": True})
    for key, expected in {**CARD_TRAINING, **CARD_DPO}.items():
        assert _value(getattr(config, key)) == expected, f"DPOConfig.{key} = {getattr(config, key)!r}"
    assert config.bf16 and not config.fp16
    assert "max_prompt_length" not in {f.name for f in dataclasses.fields(DPOConfig)}


def test_on_a_t4_the_same_recipe_runs_in_fp16(full, monkeypatch, tmp_path):
    _pretend_gpu(monkeypatch, bf16=False)
    kwargs = training.dpo_config_kwargs(full, tmp_path)
    assert kwargs["fp16"] is True and kwargs["bf16"] is False
    assert kwargs["optim"] == "paged_adamw_32bit"


def test_on_this_cpu_the_config_is_adapted_and_says_so(full, tmp_path):
    if hardware.cuda_available():  # pragma: no cover - the CPU suite
        pytest.skip("this machine has a CUDA GPU")
    config = training.dpo_config(full, tmp_path)
    assert _value(config.optim) == "adamw_torch"  # paged optimizers page GPU memory
    assert not config.bf16 and not config.fp16 and config.use_cpu
    for key in ("per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "max_steps"):
        assert getattr(config, key) == CARD_TRAINING[key]


def test_overrides_replace_single_fields(full, monkeypatch, tmp_path):
    _pretend_gpu(monkeypatch, bf16=True)
    kwargs = training.dpo_config_kwargs(full, tmp_path, max_steps=3, save_strategy="no")
    assert kwargs["max_steps"] == 3 and kwargs["save_strategy"] == "no" and kwargs["learning_rate"] == 5e-5
