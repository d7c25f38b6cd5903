"""LoRA set-up (notebook 03): the recipe's config, the target layers, what trains, and what one step changes."""

from __future__ import annotations

import pytest
import torch

from helpers.lora import (
    answer_batch,
    count_parameters,
    dropout_rates,
    linear_layer_names,
    lora_config,
    lora_scalings,
    lora_training_steps,
    trainable_dtypes,
)
from helpers.profiles import MISTRAL_LINEAR_MODULES, get_profile

TINY_LAYERS = 4


def _fp32_model(profile, tiny_model_path):
    from helpers.loading import load_model

    return load_model(profile, four_bit=False, source=str(tiny_model_path))


def test_lora_config_is_the_recipe() -> None:
    config = lora_config(get_profile("full", check_hardware=False))
    assert (config.r, config.lora_alpha, config.lora_dropout, config.bias) == (16, 16, 0.05, "none")
    assert config.task_type == "CAUSAL_LM"
    assert set(config.target_modules) == set(MISTRAL_LINEAR_MODULES)


def test_linear_layers_found_are_the_recipe_targets(profile, tiny_model_path) -> None:
    assert linear_layer_names(_fp32_model(profile, tiny_model_path)) == sorted(MISTRAL_LINEAR_MODULES)


def test_mistral_7b_lora_has_41_943_040_trainable_parameters_by_peft() -> None:
    from peft import get_peft_model

    from helpers.architectures import MISTRAL_7B_VOCAB, meta_model
    from helpers.loading import mistral_7b_config

    model = meta_model(mistral_7b_config(MISTRAL_7B_VOCAB))
    assert linear_layer_names(model) == sorted(MISTRAL_LINEAR_MODULES)
    wrapped = get_peft_model(model, lora_config(get_profile("full", check_hardware=False)))
    trainable, total = count_parameters(wrapped)
    assert trainable == 41_943_040
    assert total == 7_241_732_096 + 41_943_040
    assert lora_scalings(wrapped) == dict.fromkeys(sorted(MISTRAL_LINEAR_MODULES), 1.0)


def _pairs(profile, tokenizer, count: int = 4):
    from datasets import Dataset

    from helpers.chatml import format_orca_row
    from helpers.data import load_preference_data

    rows = load_preference_data(profile)["train"].select(range(count))
    return Dataset.from_list([format_orca_row(row, tokenizer) for row in rows])


def test_trl_qlora_path_has_no_prepare_model_for_kbit_training() -> None:
    """What notebook 03 teaches about TRL 1.16's QLoRA path, read from the installed source."""
    import inspect

    from trl.trainer import dpo_trainer

    source = inspect.getsource(dpo_trainer)
    assert "prepare_model_for_kbit_training" not in source
    init = inspect.getsource(dpo_trainer.DPOTrainer.__init__)
    for step in ("get_peft_model(model, peft_config", "model.enable_input_require_grads()",
                 "param.data.to(torch.bfloat16)", "disable_dropout_in_model(model)"):
        assert step in init, step


def test_four_bit_base_wrapped_by_dpo_trainer_trains_only_lora(profile, tokenizer, tiny_model_path, tmp_path) -> None:
    """TRL wraps, enables input gradients, casts the adapter to bf16 and leaves the norms alone (no fp32 cast as
    prepare_model_for_kbit_training would do); the course's prepare_trainer then casts the adapter to fp32 on CPU."""
    from peft import get_peft_model
    from trl import DPOTrainer

    from helpers.loading import load_model
    from helpers.training import dpo_config, prepare_trainer

    fp32 = get_peft_model(_fp32_model(profile, tiny_model_path), lora_config(profile))
    bf16_compute = profile.replace("quantization", compute_dtype="bfloat16")
    four = load_model(bf16_compute, four_bit=True, source=str(tiny_model_path))
    trainer = DPOTrainer(
        model=four,
        ref_model=None,
        args=dpo_config(profile, tmp_path, gradient_checkpointing=True, precompute_ref_log_probs=False,
                        precompute_ref_batch_size=None, disable_tqdm=True),
        train_dataset=_pairs(profile, tokenizer),
        processing_class=tokenizer,
        peft_config=lora_config(profile),
    )
    wrapped = trainer.model
    assert count_parameters(wrapped) == count_parameters(fp32)
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * TINY_LAYERS * len(MISTRAL_LINEAR_MODULES)
    assert trainable_dtypes(wrapped) == ["bfloat16"]  # TRL's QLoRA cast
    norms = {p.dtype for n, p in wrapped.named_parameters() if "norm" in n}
    assert norms == {torch.bfloat16}, "the norms keep the compute dtype: nothing casts them to fp32"
    assert wrapped.get_input_embeddings()(torch.tensor([[0]])).requires_grad  # enable_input_require_grads
    assert set(dropout_rates(wrapped)) == {0.0}
    prepare_trainer(trainer, profile, progress=False)
    assert trainable_dtypes(wrapped) == ["float32"]  # fp32 training on CPU


def test_dpo_trainer_switches_lora_dropout_off(profile, tokenizer, tiny_model_path, tmp_path) -> None:
    from peft import get_peft_model

    from helpers.training import build_trainer

    adapters = TINY_LAYERS * len(MISTRAL_LINEAR_MODULES)
    peft_only = get_peft_model(_fp32_model(profile, tiny_model_path), lora_config(profile))
    assert dropout_rates(peft_only) == {0.05: adapters}  # PEFT alone: the recipe's lora_dropout
    for disable, rates in ((True, {0.0: adapters}), (False, {0.05: adapters})):
        trainer = build_trainer(profile, _fp32_model(profile, tiny_model_path), tokenizer, _pairs(profile, tokenizer),
                                tmp_path / str(disable), progress=False, disable_dropout=disable,
                                precompute_ref_log_probs=False, precompute_ref_batch_size=None)
        assert dropout_rates(trainer.model) == rates, disable


def test_one_step_changes_only_lora_b_then_a(profile, tokenizer, tiny_model_path) -> None:
    from peft import get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(_fp32_model(profile, tiny_model_path), lora_config(profile))
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    prompts = ["<|im_start|>user\nWhat is a sponge used for?<|im_end|>\n<|im_start|>assistant\n"]
    batch = answer_batch(tokenizer, prompts, ["A sponge is used for washing dishes.<|im_end|>"])
    first, second = lora_training_steps(model, batch, steps=2)
    matrices = TINY_LAYERS * len(MISTRAL_LINEAR_MODULES)
    # step 1: B starts at zero, so A's gradient (which goes through B) is exactly zero; only B moves
    assert first.grad_norm_lora_A == 0.0 and first.grad_norm_lora_B > 0.0
    assert (first.changed_lora_A, first.changed_lora_B, first.changed_base) == (0, matrices, 0)
    # step 2: B is no longer zero, so A gets a gradient and moves too
    assert second.grad_norm_lora_A > 0.0
    assert (second.changed_lora_A, second.changed_lora_B, second.changed_base) == (matrices, matrices, 0)
    for name, param in model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(param.detach(), base_before[name]), f"base weight {name} changed"
    assert "lora_B" in str(first)


def test_answer_batch_masks_prompt_and_padding(tokenizer) -> None:
    batch = answer_batch(tokenizer, ["<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"] * 2, ["Hello.", "Hi"])
    prompt_len = len(tokenizer("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")["input_ids"])
    assert (batch["labels"][:, :prompt_len] == -100).all()
    assert batch["labels"].shape == batch["input_ids"].shape
    assert batch["attention_mask"][1].sum() < batch["attention_mask"][0].sum()


def test_steps_without_adapter_are_refused(profile, tiny_model_path, tokenizer) -> None:
    model = _fp32_model(profile, tiny_model_path)
    for param in model.parameters():
        param.requires_grad_(False)
    batch = answer_batch(tokenizer, ["a"], ["b"])
    with pytest.raises(ValueError, match="get_peft_model"):
        lora_training_steps(model, batch)
