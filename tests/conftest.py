"""Shared fixtures. The tests run offline: the hub variables are set before transformers is imported."""

from __future__ import annotations

import os

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_var] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from helpers.profiles import DATA_DIR  # noqa: E402

TINY_MODEL = DATA_DIR / "tiny_model"
# The test files that take longest (minutes: notebooks on the stand-ins, the tiny model's rebuild, the headless script),
# longest first. scripts/run_checks.sh runs the files in collection order on two workers (-n 2 --dist loadfile
# --no-loadscope-reorder), so the long ones start at once and the short ones fill in around them.
LONGEST_FIRST = ("test_notebooks_on_full_standin.py", "test_build_tiny_model.py", "test_notebooks_on_t4_standin.py",
                 "test_dpo_script.py", "test_gpu_acceptance.py", "test_accelerate.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Collect the longest test files first (see LONGEST_FIRST); the order inside a file is kept."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session")
def tiny_model_path() -> Path:
    """The shipped tiny chat model's folder (data/tiny_model)."""
    return TINY_MODEL


@pytest.fixture(scope="module")
def profile():
    """The tiny profile, fitted to this machine (the one every helper test runs on)."""
    from helpers.profiles import get_profile

    return get_profile("tiny")


@pytest.fixture(scope="module")
def tokenizer(profile):
    """The tiny model's tokenizer, loaded and checked the way the course loads it."""
    from helpers.models import load_tokenizer

    return load_tokenizer(profile.model_id)


@pytest.fixture(scope="module")
def tiny_model(profile):
    """The tiny model in fp32, in eval mode (a fresh copy per test module)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(profile.model_id, dtype="float32").eval()


def add_random_lora(model, targets: list[str], *, r: int = 4, std: float = 0.05, seed: int = 7):
    """``model`` wrapped with a LoRA adapter whose B is random (seeded), not zero: the adapter changes the model."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    wrapped = get_peft_model(model, LoraConfig(r=r, lora_alpha=r, target_modules=targets))
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, std)
    return wrapped


@pytest.fixture(scope="session")
def random_lora():
    """:func:`add_random_lora`, for the tests that need a model its adapter really changes."""
    return add_random_lora


@pytest.fixture(scope="session")
def other_model_path(tmp_path_factory) -> Path:
    """A second model, different from the tiny one but of its family: the tiny model with a random LoRA update
    (seeded, non-zero B) merged in and saved. Tests compare two models with it, never a model with itself."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("other-model")
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype="float32")
    wrapped = add_random_lora(model, ["q_proj", "v_proj", "down_proj"])
    wrapped.merge_and_unload().save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(TINY_MODEL).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def naive_answer_logprob():
    """The textbook answer log-likelihood, an independent reference for the course's batched scoring: one sequence,
    no padding, PyTorch's full log-softmax in float64, summed over the answer's tokens."""
    import torch

    def logprob(model, tokenizer, prompt: str, answer: str) -> float:
        prompt_ids = tokenizer(prompt)["input_ids"]
        ids = tokenizer(prompt + answer)["input_ids"]
        assert ids[: len(prompt_ids)] == prompt_ids  # ChatML prompts end in "\n": the answer starts a new token
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].double()
        log_probs = torch.log_softmax(logits, dim=-1)
        return sum(log_probs[t - 1, ids[t]].item() for t in range(len(prompt_ids), len(ids)))

    return logprob
