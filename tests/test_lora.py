"""LoRA set-up (notebook 03), against independent references: the layer names a config declares, PEFT's own
parameter count and a hand count, the dropout TRL's DPOTrainer leaves, the textbook answer log-likelihood, and the
gradient of A with B = 0."""

from __future__ import annotations

import math
import tempfile

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, GPTNeoXConfig, MistralConfig
from trl import DPOConfig, DPOTrainer

from helpers.chatml import format_orca_row, tokenize_pair
from helpers.loading import OPENHERMES_2_5_CONFIG, meta_model
from helpers.lora import (
    answer_batch,
    changed_tensors,
    dropout_rates,
    gradient_norms,
    linear_layer_names,
    trainable_by_target,
    trainable_dtypes,
)
from helpers.models import count_parameters, keep_nf4_trainable
from helpers.profiles import SEVEN_PROJECTIONS
from helpers.training import prepare_trainer

PAIRS = [
    {"system": "", "question": "Which is bigger: 8 or 66?", "chosen": "66 is larger than 8.",
     "rejected": "8 is larger than 66."},
    {"system": "Be brief.", "question": "What is a sponge used for?", "chosen": "A sponge is used for washing dishes.",
     "rejected": "I don't know."},
]


def fresh(profile):
    return AutoModelForCausalLM.from_pretrained(profile.model_id, dtype=torch.float32)


def test_linear_layer_names_are_the_decoders_projections(profile) -> None:
    assert linear_layer_names(fresh(profile)) == sorted(SEVEN_PROJECTIONS)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype="float32")
    four = AutoModelForCausalLM.from_pretrained(profile.model_id, quantization_config=config, dtype="float32")
    assert linear_layer_names(four) == sorted(SEVEN_PROJECTIONS)


def test_linear_layer_names_follow_another_architectures_names() -> None:
    neox = meta_model(GPTNeoXConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128,
                                    vocab_size=100))
    assert linear_layer_names(neox) == ["dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"]


def test_the_trainable_count_is_peft_s_and_the_hand_count(profile) -> None:
    config = fresh(profile).config
    hidden, inter = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (getattr(config, "head_dim", None) or hidden // config.num_attention_heads)
    shapes = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden), (hidden, inter), (hidden, inter),
              (inter, hidden)]
    by_hand = config.num_hidden_layers * sum(profile.lora["r"] * (i + o) for i, o in shapes)
    wrapped = get_peft_model(fresh(profile), LoraConfig(**profile.lora))
    assert count_parameters(wrapped) == wrapped.get_nb_trainable_parameters()
    assert count_parameters(wrapped)[0] == by_hand
    assert sum(trainable_by_target(wrapped).values()) == by_hand


def test_trainable_by_target_on_mistral_7b_matches_the_hand_count() -> None:
    wrapped = get_peft_model(meta_model(MistralConfig(**OPENHERMES_2_5_CONFIG)),
                             LoraConfig(r=16, lora_alpha=16, target_modules=SEVEN_PROJECTIONS), low_cpu_mem_usage=True)
    per_layer = {"q_proj": 4096 + 4096, "k_proj": 4096 + 1024, "v_proj": 4096 + 1024, "o_proj": 4096 + 4096,
                 "gate_proj": 4096 + 14336, "up_proj": 4096 + 14336, "down_proj": 14336 + 4096}
    assert trainable_by_target(wrapped) == {name: 32 * 16 * n for name, n in
                                            sorted(per_layer.items(), key=lambda item: -item[1])}


@pytest.fixture(scope="module")
def trl_wrapped(profile, tokenizer):
    """A 4-bit base wrapped by a real DPOTrainer with the recipe's LoraConfig, gradient checkpointing on."""
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype="float32")
    base = AutoModelForCausalLM.from_pretrained(profile.model_id, quantization_config=config, dtype="float32")
    keep_nf4_trainable(base)
    settings = profile.with_changes("dpo", gradient_checkpointing=True, precompute_ref_log_probs=False).dpo
    with tempfile.TemporaryDirectory() as workdir:
        trainer = DPOTrainer(model=base, args=DPOConfig(output_dir=workdir, **settings),
                             train_dataset=Dataset.from_list([format_orca_row(p, tokenizer) for p in PAIRS]),
                             processing_class=tokenizer, peft_config=LoraConfig(**profile.lora))
    return trainer


def test_trls_qlora_path_calls_no_prepare_model_for_kbit_training() -> None:
    """Notebook 03 says so: read TRL 1.16's own source."""
    import inspect

    import trl.trainer.dpo_trainer as dpo_trainer

    source = inspect.getsource(dpo_trainer)
    assert "prepare_model_for_kbit_training" not in source
    assert "param.data = param.data.to(torch.bfloat16)" in source and "enable_input_require_grads()" in source


def test_dpo_trainer_switches_lora_dropout_off_and_casts_the_4bit_adapter_to_bf16(profile, trl_wrapped) -> None:
    layers = fresh(profile).config.num_hidden_layers * len(SEVEN_PROJECTIONS)
    assert dropout_rates(get_peft_model(fresh(profile), LoraConfig(**profile.lora))) == {0.05: layers}
    assert dropout_rates(trl_wrapped.model) == {0.0: layers}
    assert trainable_dtypes(trl_wrapped.model) == ["bfloat16"]  # TRL's QLoRA cast
    prepare_trainer(trl_wrapped, progress=False)
    assert trainable_dtypes(trl_wrapped.model) == ["float32"]  # the course's, for fp32 training


def test_dropout_stays_when_the_trainer_is_told_to_keep_it(profile, tokenizer) -> None:
    settings = profile.with_changes("dpo", precompute_ref_log_probs=False, disable_dropout=False).dpo
    with tempfile.TemporaryDirectory() as workdir:
        trainer = DPOTrainer(model=fresh(profile), args=DPOConfig(output_dir=workdir, **settings),
                             train_dataset=Dataset.from_list([format_orca_row(p, tokenizer) for p in PAIRS]),
                             processing_class=tokenizer, peft_config=LoraConfig(**profile.lora))
    assert set(dropout_rates(trainer.model)) == {0.05}


def test_answer_batch_loss_is_the_textbook_mean_answer_log_likelihood(profile, tokenizer, tiny_model,
                                                                     naive_answer_logprob) -> None:
    pairs = [format_orca_row(p, tokenizer) for p in PAIRS]
    prompts, answers = [p["prompt"] for p in pairs], [p["chosen"] for p in pairs]
    batch = answer_batch(tokenizer, prompts, answers)
    for row, (prompt, answer) in enumerate(zip(prompts, answers)):
        kept = batch["labels"][row][batch["labels"][row] != -100].tolist()
        assert kept == tokenize_pair(tokenizer, prompt, answer)[1]
        assert batch["attention_mask"][row].sum() == sum(map(len, tokenize_pair(tokenizer, prompt, answer)))
    with torch.no_grad():
        loss = tiny_model(**batch).loss.item()
    counts = [len(tokenize_pair(tokenizer, p, a)[1]) for p, a in zip(prompts, answers)]
    total = sum(naive_answer_logprob(tiny_model, tokenizer, p, a) for p, a in zip(prompts, answers))
    assert loss == pytest.approx(-total / sum(counts), rel=1e-4)


def test_the_first_step_moves_only_b_and_no_step_moves_the_base(profile, tokenizer) -> None:
    torch.manual_seed(0)
    wrapped = get_peft_model(fresh(profile), LoraConfig(**{**profile.lora, "lora_dropout": 0.0}))
    pairs = [format_orca_row(p, tokenizer) for p in PAIRS]
    batch = answer_batch(tokenizer, [p["prompt"] for p in pairs], [p["chosen"] for p in pairs])
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    matrices = len(SEVEN_PROJECTIONS) * wrapped.config.num_hidden_layers
    wrapped.train()
    for step in (1, 2):
        before = {name: param.detach().clone() for name, param in wrapped.named_parameters()}
        optimizer.zero_grad()
        wrapped(**batch).loss.backward()
        grads = {part: [p.grad.flatten() for n, p in wrapped.named_parameters() if f".{part}." in n]
                 for part in ("lora_A", "lora_B")}
        norms = gradient_norms(wrapped)
        for part, found in grads.items():  # the reference: one vector of all the part's gradients
            assert math.isclose(norms[part], torch.cat(found).norm().item(), rel_tol=1e-5, abs_tol=1e-12)
        optimizer.step()
        changed = changed_tensors(wrapped, before)
        assert changed["base"] == 0
        if step == 1:  # B = 0: dL/dA = scaling * B^T dL/dh x^T is exactly zero
            assert norms["lora_A"] == 0.0 and changed == {"lora_A": 0, "lora_B": matrices, "base": 0}
        else:
            assert norms["lora_A"] > 0 and changed == {"lora_A": matrices, "lora_B": matrices, "base": 0}
