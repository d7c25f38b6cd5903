"""The profiles: the full profile is the model card, every other value says why, the machine fits what it must, and
every dict is accepted by the library call it is written for."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from transformers import BitsAndBytesConfig
from trl import DPOConfig

from helpers import profiles
from helpers.profiles import FULL, PROFILE_ENV_VAR, PROFILES, fit_to_machine, get_profile, resolve_name

# NeuralHermes-2.5-Mistral-7B's model card ("Training hyperparameters"), transcribed: the independent reference.
CARD_LORA = {"r": 16, "lora_alpha": 16, "lora_dropout": 0.05, "bias": "none", "task_type": "CAUSAL_LM"}
CARD_TARGETS = {"k_proj", "gate_proj", "v_proj", "up_proj", "q_proj", "o_proj", "down_proj"}
CARD_TRAINING = {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 4, "gradient_checkpointing": True,
                 "learning_rate": 5e-5, "lr_scheduler_type": "cosine", "max_steps": 200, "optim": "paged_adamw_32bit",
                 "warmup_steps": 100, "beta": 0.1, "max_length": 1536}
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without CUDA changes")


def test_full_is_the_model_card():
    for key, value in CARD_TRAINING.items():
        assert FULL.dpo[key] == value, f"full.dpo[{key!r}] is {FULL.dpo[key]!r}; the model card says {value!r}"
    assert {k: FULL.lora[k] for k in CARD_LORA} == CARD_LORA
    assert set(FULL.lora["target_modules"]) == CARD_TARGETS and len(FULL.lora["target_modules"]) == 7
    assert FULL.max_prompt_length == 1024
    assert FULL.model_id == "teknium/OpenHermes-2.5-Mistral-7B" and FULL.dataset == "Intel/orca_dpo_pairs"
    assert FULL.bnb["load_in_4bit"] and FULL.bnb["bnb_4bit_quant_type"] == "nf4"


def test_full_has_no_changes_on_an_ampere_gpu():
    fitted = fit_to_machine(FULL, cuda=True, bf16=True)
    assert fitted.changes("dpo") == {} and fitted.changes("lora") == {} and fitted.changes("bnb") == {}
    assert fitted.dtype == "bfloat16"


@pytest.mark.parametrize("name", ["tiny", "t4"])
@pytest.mark.parametrize("machine", [dict(cuda=False, bf16=False), dict(cuda=True, bf16=False),
                                     dict(cuda=True, bf16=True)], ids=["cpu", "t4-gpu", "ampere"])
def test_every_change_from_the_card_says_why(name, machine):
    fitted = fit_to_machine(PROFILES[name], **machine)
    for section in ("dpo", "lora", "bnb"):
        for key in fitted.changes(section):
            assert f"{section}.{key}" in fitted.why or section in fitted.why, f"{name}: {section}.{key} has no reason"
    for key in ("model_id", "dataset", "train_pairs", "max_prompt_length"):
        if getattr(fitted, key) != getattr(FULL, key):
            assert key in fitted.why, f"{name}: {key} differs from the card without a reason"


def test_a_t4_gets_fp16_and_an_fp16_compute_dtype():
    fitted = fit_to_machine(PROFILES["t4"], cuda=True, bf16=False)
    assert fitted.dpo["fp16"] is True and fitted.dpo["bf16"] is False
    assert fitted.bnb["bnb_4bit_compute_dtype"] == "float16" and fitted.dtype == "float16"
    assert fitted.dpo["optim"] == "paged_adamw_32bit"


def test_a_cpu_trains_in_fp32_with_plain_adamw():
    fitted = fit_to_machine(FULL, cuda=False, bf16=False)
    assert (fitted.dpo["bf16"], fitted.dpo.get("fp16", False), fitted.dpo["use_cpu"]) == (False, False, True)
    assert fitted.dpo["optim"] == "adamw_torch" and fitted.bnb["bnb_4bit_compute_dtype"] == "float32"


@cpu_only
@pytest.mark.parametrize("name", list(PROFILES))
def test_the_libraries_accept_every_dict(name, tmp_path):
    """The dicts are keyword arguments: a misspelt key would raise TypeError in the real constructors."""
    profile = get_profile(name, allow_cpu=True)
    config = DPOConfig(output_dir=str(tmp_path), **profile.dpo)
    assert config.beta == profile.dpo["beta"] and config.max_length == profile.dpo["max_length"]
    lora = LoraConfig(**profile.lora)
    assert lora.r == 16 and set(lora.target_modules) == CARD_TARGETS
    if profile.bnb:
        bnb = BitsAndBytesConfig(**profile.bnb)
        assert bnb.load_in_4bit and bnb.bnb_4bit_compute_dtype == torch.float32


def test_with_changes_changes_only_what_it_is_asked():
    changed = FULL.with_changes("dpo", max_steps=20)
    assert changed.dpo["max_steps"] == 20 and FULL.dpo["max_steps"] == 200
    assert {k: v for k, v in changed.dpo.items() if k != "max_steps"} == {k: v for k, v in FULL.dpo.items()
                                                                             if k != "max_steps"}
    with pytest.raises(ValueError, match="unknown profile section"):
        FULL.with_changes("training", max_steps=1)


def test_the_profile_is_chosen_by_name_then_environment_then_gpu(monkeypatch):
    monkeypatch.setenv(PROFILE_ENV_VAR, "t4")
    assert resolve_name() == ("t4", f"set by ${PROFILE_ENV_VAR}")
    assert resolve_name("full")[0] == "full"
    monkeypatch.delenv(PROFILE_ENV_VAR)
    for memory, expected in ((15.0, "t4"), (39.4, "full"), (0.0, "tiny")):
        monkeypatch.setattr(profiles, "cuda_memory_gib", lambda memory=memory: memory)
        assert resolve_name()[0] == expected, f"{memory} GiB should choose {expected}"
    monkeypatch.setenv(PROFILE_ENV_VAR, "huge")
    with pytest.raises(ValueError, match="tiny, t4, full"):
        resolve_name()


@cpu_only
def test_a_gpu_profile_on_a_cpu_is_refused_naming_the_cpu_profile():
    with pytest.raises(RuntimeError, match="tiny"):
        get_profile("full")


def test_the_tiny_profile_loads_the_shipped_model(profile):
    assert profile.model_id == str(profiles.DATA_DIR / "tiny_model")
    assert not profile.real_model and profile.bnb is None
