"""The tiny chat model: loads offline, has Mistral's shape and module names, speaks ChatML and stops."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers.paths import DATA_DIR
from helpers.profiles import MISTRAL_LINEAR_MODULES
from helpers.tiny_model import TinyRecipe, tiny_model_dir

SYSTEM, USER = "You are a helpful assistant chatbot.", "What is a Large Language Model?"
EXPECTED_PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant chatbot.<|im_end|>\n"
    "<|im_start|>user\nWhat is a Large Language Model?<|im_end|>\n"
    "<|im_start|>assistant\n"
)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path: Path) -> Any:
    return AutoTokenizer.from_pretrained(tiny_model_path)


@pytest.fixture(scope="module")
def model(tiny_model_path: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()


def test_loads_offline(tiny_model_path: Path, tokenizer: Any, model: Any) -> None:
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE, "the tests must run with HF_HUB_OFFLINE=1"
    assert (tiny_model_path / "config.json").is_file()
    assert model.device.type == "cpu"
    assert len(tokenizer) == model.config.vocab_size


def test_mistral_architecture_with_grouped_query_attention(model: Any) -> None:
    assert type(model).__name__ == "MistralForCausalLM"
    assert model.config.architectures == ["MistralForCausalLM"]
    assert model.config.num_key_value_heads < model.config.num_attention_heads


def test_has_every_recipe_lora_target(model: Any) -> None:
    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    assert set(MISTRAL_LINEAR_MODULES) <= leaf_names
    for target in MISTRAL_LINEAR_MODULES:
        layers = [m for n, m in model.named_modules() if n.endswith(f".{target}")]
        assert len(layers) == model.config.num_hidden_layers, target
        assert all(isinstance(m, torch.nn.Linear) for m in layers), target


def test_parameter_count(model: Any) -> None:
    count = sum(p.numel() for p in model.parameters())
    assert 300_000 <= count <= 5_000_000, count


def test_save_load_round_trip_gives_identical_logits(tmp_path: Path, model: Any, tokenizer: Any) -> None:
    ids = tokenizer("Which number is larger, 12 or 7?", return_tensors="pt")["input_ids"]
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        before, after = model(ids).logits, reloaded(ids).logits
    assert before.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.equal(before, after)
    assert AutoTokenizer.from_pretrained(tmp_path)("12 or 7")["input_ids"] == tokenizer("12 or 7")["input_ids"]


def test_chat_template_renders_chatml_exactly(tokenizer: Any) -> None:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}]
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == EXPECTED_PROMPT


def test_special_tokens(tokenizer: Any) -> None:
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token is not None
    assert tokenizer.pad_token != tokenizer.eos_token
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    for token in ("<|im_start|>", "<|im_end|>"):
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        assert ids == [tokenizer.convert_tokens_to_ids(token)], token


def test_digits_are_one_token_each(tokenizer: Any) -> None:
    ids = tokenizer("12345", add_special_tokens=False)["input_ids"]
    assert len(ids) == 5
    assert tokenizer.decode(ids) == "12345"


def test_greedy_answers_stop_with_eos(model: Any, tokenizer: Any) -> None:
    rows = [json.loads(line) for line in (DATA_DIR / "heldout.jsonl").read_text(encoding="utf-8").splitlines()][:5]
    stopped = 0
    for row in rows:
        messages = [{"role": "system", "content": row["system"]}] if row["system"] else []
        messages.append({"role": "user", "content": row["question"]})
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        encoded = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**encoded, max_new_tokens=40, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        new_tokens = out[0, encoded["input_ids"].shape[1] :].tolist()
        stopped += bool(new_tokens) and new_tokens[-1] == tokenizer.eos_token_id
    assert stopped >= 4, f"only {stopped} of 5 greedy answers ended with <|im_end|>"


def test_cache_folder_is_named_by_the_recipe(tiny_model_path: Path) -> None:
    assert tiny_model_dir() == tiny_model_dir(TinyRecipe()) == tiny_model_path
    changed = tiny_model_dir(dataclasses.replace(TinyRecipe(), hidden_size=64))
    assert changed.parent == tiny_model_path.parent
    assert changed.name != tiny_model_path.name
