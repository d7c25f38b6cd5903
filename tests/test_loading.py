"""Loading (notebook 02): the tokenizer checks, the NF4 config, and the tiny model really loaded in 4-bit on CPU."""

from __future__ import annotations

import math

import pytest
import torch

from helpers.loading import (
    bnb_config,
    check_tokenizer,
    load_model,
    max_logit_difference,
    model_source,
    quantized_layer_names,
)
from helpers.profiles import MISTRAL_LINEAR_MODULES, get_profile

TINY_LAYERS = 4  # helpers.tiny_model.TinyRecipe.num_hidden_layers


@pytest.fixture(scope="module")
def models(profile, tiny_model_path):
    four = load_model(profile, four_bit=True, source=str(tiny_model_path))
    full = load_model(profile, four_bit=False, source=str(tiny_model_path))
    return four, full


def test_model_source_of_tiny_is_the_built_folder(profile, tiny_model_path) -> None:
    assert model_source(profile) == str(tiny_model_path)
    assert model_source(get_profile("full", check_hardware=False)) == "teknium/OpenHermes-2.5-Mistral-7B"


def test_bnb_config_is_nf4_double_quant_with_profile_compute_dtype(profile) -> None:
    config = bnb_config(profile)
    assert config.load_in_4bit and not config.load_in_8bit
    assert config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_use_double_quant is True
    assert config.bnb_4bit_compute_dtype == torch.float32  # tiny: "float32" on CPU


def test_tokenizer_is_chatml_with_separate_pad(tokenizer) -> None:
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.padding_side == "right"


def test_pad_equal_to_eos_is_refused(tokenizer) -> None:
    import copy

    broken = copy.deepcopy(tokenizer)
    broken.pad_token = broken.eos_token
    with pytest.raises(ValueError, match="SFT collator masks every pad position"):
        check_tokenizer(broken, "broken tokenizer")


def test_four_bit_quantizes_every_decoder_projection_and_nothing_else(models) -> None:
    four, _ = models
    names = quantized_layer_names(four)
    assert len(names) == TINY_LAYERS * len(MISTRAL_LINEAR_MODULES)
    assert {n.rsplit(".", 1)[-1] for n in names} == set(MISTRAL_LINEAR_MODULES)
    assert four.lm_head.weight.dtype == torch.float32  # the output head stays unquantised
    assert four.model.embed_tokens.weight.dtype == torch.float32


def test_full_precision_model_has_no_4bit_layers(models) -> None:
    _, full = models
    assert quantized_layer_names(full) == []
    assert all(p.dtype == torch.float32 for p in full.parameters())


def test_four_bit_footprint_is_smaller(models) -> None:
    four, full = models
    assert four.get_memory_footprint() < 0.5 * full.get_memory_footprint()


def test_four_bit_logits_differ_a_little(models, tokenizer) -> None:
    four, full = models
    messages = [{"role": "user", "content": "What is a sponge used for?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    diff = max_logit_difference(four, full, ids["input_ids"])
    # measured 0.92 on the tiny model (logits up to ~15): NF4 rounding moves them, it does not scramble them
    assert math.isfinite(diff) and 0.0 < diff < 5.0


def test_four_bit_model_computes_with_the_weights_bitsandbytes_dequantizes(models, tiny_model_path, profile,
                                                                           tokenizer) -> None:
    """The independent reference: an fp32 model whose linear weights are bitsandbytes' own dequantisation of its
    NF4 weights gives the 4-bit model's logits (to float rounding); the original weights do not."""
    import bitsandbytes.functional as bnbf

    four, full = models
    dequantized = load_model(profile, four_bit=False, source=str(tiny_model_path))
    layers = dict(four.named_modules())
    with torch.no_grad():
        for name in quantized_layer_names(four):
            weight = layers[name].weight
            target = dequantized.get_submodule(name).weight
            target.copy_(bnbf.dequantize_4bit(weight.data, weight.quant_state).to(target.dtype))
    ids = tokenizer("<|im_start|>user\nWhat is a key used for?<|im_end|>\n", return_tensors="pt")["input_ids"]
    assert max_logit_difference(four, dequantized, ids) < 1e-4
    assert max_logit_difference(four, full, ids) > 1e-2


def test_loading_bar_setting_is_restored(profile, tiny_model_path) -> None:
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled()
    load_model(profile, four_bit=False, source=str(tiny_model_path), progress=not before)
    assert hf_logging.is_progress_bar_enabled() == before
