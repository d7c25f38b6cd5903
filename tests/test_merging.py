"""Notebook 05 and helpers/merging.py: a merge is base + adapter (checked against PEFT's unmerged model and against
W + (alpha/r)·B·A computed by hand), a QLoRA adapter merged into the dequantised NF4 weights is the model that was
trained, an adapter of another base is refused before anything is written, and nothing is pushed unless allowed."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, MistralConfig, pipeline

from helpers import merging
from helpers.models import largest_difference, load_base_model, logits_of
from helpers.profiles import get_profile

LORA = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])  # alpha/r = 2: scaling matters
NF4 = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
           bnb_4bit_compute_dtype="float32")


def random_adapter(base, folder: Path, seed: int = 3) -> Path:
    """A LoRA adapter with random non-zero B (a fresh one is zero and would merge to nothing), saved to ``folder``."""
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(**LORA))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def run_folder(profile, tokenizer, tmp_path_factory) -> Path:
    """A run folder with a random adapter, merged by merge_run as notebook 05 merges."""
    folder = tmp_path_factory.mktemp("merge") / "runs" / "tiny-main"
    random_adapter(load_base_model(profile, four_bit=False), folder / "adapter")
    merging.merge_run(profile, folder)
    return folder


def test_the_merged_model_gives_base_plus_adapter_logits(profile, tokenizer, run_folder) -> None:
    merged, _ = merging.load_merged(run_folder / "merged")
    unmerged = PeftModel.from_pretrained(load_base_model(profile, four_bit=False), str(run_folder / "adapter"))
    probes = merging.probe_inputs(tokenizer)
    base = logits_of(load_base_model(profile, four_bit=False), probes)
    assert largest_difference(logits_of(merged, probes), logits_of(unmerged, probes)) < 1e-4
    assert largest_difference(logits_of(merged, probes), base) > 1e-2  # the adapter is in there


def test_a_merged_weight_is_w_plus_scaled_b_times_a(profile, run_folder) -> None:
    saved = load_file(run_folder / "adapter" / "adapter_model.safetensors")
    key = next(k for k in saved if k.endswith("layers.1.mlp.down_proj.lora_A.weight"))
    lora_a, lora_b = saved[key], saved[key.replace("lora_A", "lora_B")]
    base = AutoModelForCausalLM.from_pretrained(profile.model_id, dtype="float32")
    expected = base.model.layers[1].mlp.down_proj.weight + LORA["lora_alpha"] / LORA["r"] * lora_b @ lora_a
    merged, _ = merging.load_merged(run_folder / "merged")
    assert torch.allclose(merged.model.layers[1].mlp.down_proj.weight, expected, atol=1e-6)


def test_the_merged_folder_holds_safetensors_tokenizer_and_profile(profile, run_folder) -> None:
    names = {p.name for p in (run_folder / "merged").iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja", "course_profile.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)
    assert not [p for p in run_folder.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


def test_an_adapter_of_another_base_is_refused_before_anything_is_written(profile, tmp_path) -> None:
    other = AutoModelForCausalLM.from_config(MistralConfig(vocab_size=2048, hidden_size=64, intermediate_size=192,
                                                           num_hidden_layers=2, num_attention_heads=4,
                                                           num_key_value_heads=2))
    folder = tmp_path / "runs" / "tiny-other"
    random_adapter(other, folder / "adapter")
    with pytest.raises(ValueError, match="trained on another base model"):
        merging.merge_run(profile, folder)
    assert not (folder / "merged").exists()
    with pytest.raises(FileNotFoundError, match="run notebook 04 first"):
        merging.check_adapter_fits(other, tmp_path / "nothing")


def test_a_qlora_adapter_merged_into_the_dequantised_weights_is_the_trained_model(profile, tokenizer,
                                                                                  tmp_path) -> None:
    qlora = profile.with_changes("bnb", **NF4)
    four_bit = load_base_model(qlora)
    adapter = random_adapter(four_bit, tmp_path / "adapter")
    probes = merging.probe_inputs(tokenizer)
    trained = logits_of(PeftModel.from_pretrained(load_base_model(qlora), str(adapter)), probes)
    into_nf4 = PeftModel.from_pretrained(merging.dequantized_base(qlora), str(adapter)).merge_and_unload()
    into_original = PeftModel.from_pretrained(load_base_model(profile, four_bit=False), str(adapter))
    assert largest_difference(logits_of(into_nf4, probes), trained) < 1e-3
    assert largest_difference(logits_of(into_original.merge_and_unload(), probes), trained) > 1e-2
    plain = AutoModelForCausalLM.from_pretrained(profile.model_id, dtype="float32").model.layers[0].self_attn.q_proj
    dequantised = merging.dequantized_base(qlora).model.layers[0].self_attn.q_proj
    error = (dequantised.weight - plain.weight).abs()
    # NF4 rounds each weight to one of 16 levels scaled by its block's largest |w|; the widest gap between two levels
    # is about 0.30 of that scale (-1 to -0.696), so no weight moves by more than half of it
    assert 0 < error.max() <= 0.16 * plain.weight.abs().max()


def test_greedy_chat_is_the_models_own_greedy_answer(profile, tokenizer, tiny_model) -> None:
    messages = [{"role": "user", "content": "What is a ladder used for?"}]
    answer = merging.chat(pipeline("text-generation", model=tiny_model, tokenizer=tokenizer), messages, sample=False)
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, return_tensors="pt")
    out = tiny_model.generate(**ids, max_new_tokens=64, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
    assert answer == tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert answer and "<|im_start|>" not in answer


def recording_api(calls: list) -> SimpleNamespace:
    return SimpleNamespace(create_repo=lambda **kw: calls.append(("create_repo", kw)),
                           upload_folder=lambda **kw: calls.append(("upload_folder", kw)))


def test_a_real_model_is_pushed_after_its_repository_is_made(monkeypatch, tmp_path) -> None:
    calls: list = []
    t4 = get_profile("t4", allow_cpu=True)
    said = merging.push_to_hub_if_allowed(t4, tmp_path, "me/model", api=recording_api(calls))
    assert [name for name, _ in calls] == ["create_repo", "upload_folder"]
    assert calls[0][1] == {"repo_id": "me/model", "repo_type": "model", "private": True, "exist_ok": True}
    assert said == "pushed to https://huggingface.co/me/model"


def test_nothing_is_pushed_without_a_real_model_a_name_or_a_token(profile, monkeypatch, tmp_path) -> None:
    calls: list = []
    monkeypatch.delenv("HF_TOKEN", raising=False)
    t4 = get_profile("t4", allow_cpu=True)
    assert merging.push_to_hub_if_allowed(profile, tmp_path, "me/model", api=recording_api(calls)).startswith(
        "not pushed: profile 'tiny'")
    assert merging.push_to_hub_if_allowed(replace(t4, real_model=False), tmp_path, "me/m", api=recording_api(calls)
                                          ).startswith("not pushed")
    assert merging.push_to_hub_if_allowed(t4, tmp_path, None, api=recording_api(calls)).startswith("not pushed")
    assert merging.push_to_hub_if_allowed(t4, tmp_path, "me/model").startswith("not pushed: set HF_TOKEN")
    assert calls == []
