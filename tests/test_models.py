"""helpers.models: a tokenizer the recipe can train with, 4-bit weights that stay trainable on a CPU, and the
security of every load (no remote code, no token written anywhere)."""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from helpers.models import (
    check_tokenizer,
    count_parameters,
    keep_nf4_trainable,
    largest_difference,
    load_base_model,
    load_tokenizer,
)
from helpers.profiles import REPO_ROOT


def test_a_tokenizer_with_pad_equal_to_eos_gets_a_pad_of_its_own(tokenizer, tmp_path):
    broken = copy.deepcopy(tokenizer)
    broken.pad_token = broken.eos_token
    with pytest.raises(ValueError, match="is the eos token"):
        check_tokenizer(broken, "that tokenizer")
    broken.save_pretrained(tmp_path)
    fixed = load_tokenizer(str(tmp_path))
    assert fixed.pad_token_id != fixed.eos_token_id and fixed.padding_side == "right"
    no_template = copy.deepcopy(tokenizer)
    no_template.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        check_tokenizer(no_template)


def test_parameters_are_counted_as_peft_counts_them(profile):
    model = load_base_model(profile)
    wrapped = get_peft_model(model, LoraConfig(**profile.lora))
    trainable, total = count_parameters(wrapped)
    assert (trainable, total) == wrapped.get_nb_trainable_parameters()


def lora_gradients(model, ids, random_lora):
    """The LoRA gradients of one language-modelling step (a non-zero B, so that A's gradients exist too)."""
    wrapped = random_lora(model, ["q_proj", "up_proj", "down_proj"], std=0.02, seed=0)
    wrapped.train()
    wrapped(input_ids=ids, labels=ids).loss.backward()
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in wrapped.parameters() if p.requires_grad]


def worst_relative(a, b) -> float:
    return max(((x - y).abs().max() / y.abs().max().clamp_min(1e-12)).item() for x, y in zip(a, b))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the repacking is bitsandbytes' CPU path")
def test_the_cpu_guard_keeps_the_gradient_through_4bit_weights(profile, random_lora):
    """An evaluation before training (eval mode, no gradient) makes bitsandbytes repack the 4-bit weights on an
    AVX512-BF16 CPU, after which backward through them is lost; the guard must keep the gradients intact."""
    from bitsandbytes.functional import has_avx512bf16

    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(3))
    fresh = load_base_model(profile, four_bit=True)  # no eval pass yet: nothing repacked
    reference = lora_gradients(fresh, ids, random_lora)
    guarded = load_base_model(profile, four_bit=True)  # load_base_model guards
    with torch.no_grad():
        guarded.eval()(input_ids=ids[:, :8])
    assert worst_relative(lora_gradients(guarded, ids, random_lora), reference) < 1e-5
    unguarded = load_base_model(profile, four_bit=True)
    layers = keep_nf4_trainable(unguarded)
    for module in unguarded.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = bool(has_avx512bf16())  # bitsandbytes' own default
    with torch.no_grad():
        unguarded.eval()(input_ids=ids[:, :8])
    if has_avx512bf16():  # the repacking exists only on such CPUs: there it must show, and hurt
        assert layers > 0 and worst_relative(lora_gradients(unguarded, ids, random_lora), reference) > 1e-3


def test_largest_difference_of_tensors_and_lists():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([1.5, 1.0])
    assert largest_difference(a, b) == 1.0 and largest_difference([a, a], [a, b]) == 1.0
    with pytest.raises(ValueError):
        largest_difference([a], [a, b])


def test_no_code_path_trusts_remote_code():
    pattern = re.compile(r"trust_remote_code\s*=\s*True")
    offenders = [f"{path.relative_to(REPO_ROOT)}:{n}" for folder in ("helpers", "notebooks", "solutions", "scripts")
                 for path in sorted((REPO_ROOT / folder).rglob("*")) if path.suffix in {".py", ".ipynb"}
                 for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
                 if pattern.search(line)]
    assert offenders == []


TOKEN = (re.compile(r"hf_[A-Za-z0-9]{30,}"), re.compile(r"HF_TOKEN[\"']?[ \t]*[=:][ \t]*[\"']?[A-Za-z0-9_\-]{8,}"))
SKIPPED = {".venv", ".git", ".cache", ".ruff_cache", "__pycache__", ".ipynb_checkpoints", ".whl", ".gpu"}


def test_no_hub_token_is_written_in_any_file_of_the_repository():
    fake = "hf_" + "Ab1" * 12
    assert TOKEN[0].search(f'token = "{fake}"') and TOKEN[1].search(f"HF_TOKEN={fake}")
    assert not TOKEN[1].search("HF_TOKEN=\n") and not TOKEN[1].search('os.environ.get("HF_TOKEN")')
    leaks = []
    for folder, dirs, files in os.walk(REPO_ROOT):
        dirs[:] = [d for d in dirs if d not in SKIPPED and not d.endswith(".egg-info")]
        for name in files:
            path = Path(folder) / name
            if path.suffix in {".ipynb", ".py", ".md", ".txt", ".json", ".sh", ".toml", ".yaml"} \
                    and path.stat().st_size < 20_000_000:
                text = path.read_text(encoding="utf-8", errors="replace")
                leaks += [f"{path.relative_to(REPO_ROOT)}" for pattern in TOKEN if pattern.search(text)]
    assert leaks == []
    example = (REPO_ROOT / ".env.example").read_text(encoding="utf-8")
    assert re.search(r"^HF_TOKEN=$", example, re.MULTILINE), ".env.example lists HF_TOKEN= with no value"
    assert ".env" in (REPO_ROOT / ".gitignore").read_text(encoding="utf-8").splitlines()
