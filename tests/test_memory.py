"""Memory arithmetic (notebook 02): counted from Mistral-7B built on the meta device, checked on the tiny model."""

from __future__ import annotations

import pytest
import torch

from helpers.architectures import MISTRAL_7B_VOCAB, OPENHERMES_VOCAB, meta_model
from helpers.loading import (
    activation_bytes,
    format_memory_table,
    memory_table,
    mistral_7b_config,
    nf4_layer_bytes,
    quant_state_bytes,
    weight_bytes,
)
from helpers.profiles import get_profile

MISTRAL_7B_PARAMETERS = 7_241_732_096  # Mistral-7B-v0.1, vocabulary 32,000
LINEAR_PARAMETERS = 6_979_321_856  # the 7 projections x 32 layers


@pytest.fixture(scope="module")
def mistral():
    return meta_model(mistral_7b_config(MISTRAL_7B_VOCAB))


@pytest.fixture(scope="module")
def full_profile():
    return get_profile("full", check_hardware=False)


def test_meta_mistral_has_no_storage_and_the_published_parameter_count(mistral) -> None:
    assert all(p.is_meta for p in mistral.parameters())
    assert sum(p.numel() for p in mistral.parameters()) == MISTRAL_7B_PARAMETERS


def test_openhermes_vocabulary_adds_two_embedding_rows_in_and_out() -> None:
    model = meta_model(mistral_7b_config(OPENHERMES_VOCAB))
    assert sum(p.numel() for p in model.parameters()) == MISTRAL_7B_PARAMETERS + 2 * 2 * 4096


def test_full_and_half_precision_weights(mistral) -> None:
    assert weight_bytes(mistral, 32) == 4 * MISTRAL_7B_PARAMETERS
    assert weight_bytes(mistral, 16) == 2 * MISTRAL_7B_PARAMETERS


def test_four_bit_linear_layers_are_about_an_eighth_of_fp32(mistral) -> None:
    rest = MISTRAL_7B_PARAMETERS - LINEAR_PARAMETERS
    linear_4bit = weight_bytes(mistral, 4, unquantized_bits=32) - 4 * rest
    ratio = linear_4bit / (4 * LINEAR_PARAMETERS)
    assert 1 / 8 < ratio < 1 / 8 * 1.04  # 4 bits per weight + about 0.13 bits of scales
    assert weight_bytes(mistral, 4, double_quant=False) > weight_bytes(mistral, 4)


def test_eight_bit_is_between(mistral) -> None:
    assert weight_bytes(mistral, 4) < weight_bytes(mistral, 8) < weight_bytes(mistral, 16)


def test_unsupported_width_is_refused(mistral) -> None:
    with pytest.raises(ValueError, match="32, 16, 8 or 4"):
        weight_bytes(mistral, 2)


def _bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


@pytest.mark.parametrize("shape", [(4096, 4096), (1000, 333), (64, 64)])
@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_bytes_per_layer_are_what_bitsandbytes_stores(shape, double_quant) -> None:
    """The reference is bitsandbytes itself: quantise a real matrix and count every tensor it keeps."""
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(torch.randn(*shape), quant_type="nf4", compress_statistics=double_quant)
    stored = _bytes(packed) + _bytes(state.absmax) + _bytes(state.code)
    if state.offset is not None:
        stored += _bytes(state.offset)
    if state.state2 is not None:
        stored += _bytes(state.state2.absmax) + _bytes(state.state2.code)
    assert nf4_layer_bytes(shape[0] * shape[1], double_quant=double_quant) == stored


def test_formula_matches_the_really_quantized_tiny_model(tiny_model_path) -> None:
    from helpers.loading import load_model

    profile = get_profile("tiny")
    four = load_model(profile, four_bit=True, source=str(tiny_model_path))
    full = load_model(profile, four_bit=False, source=str(tiny_model_path))
    buffers = sum(b.numel() * b.element_size() for b in full.buffers())
    stored = four.get_memory_footprint() + quant_state_bytes(four)
    assert stored == weight_bytes(full, 4, unquantized_bits=32) + buffers
    assert quant_state_bytes(four) > 0 and quant_state_bytes(full) == 0


def test_checkpointing_saves_activation_memory() -> None:
    config = mistral_7b_config()
    with_ckpt = activation_bytes(config, 8, 1536, checkpointing=True)
    without = activation_bytes(config, 8, 1536, checkpointing=False)
    assert with_ckpt < without / 4
    assert activation_bytes(config, 16, 1536) > with_ckpt


def test_memory_table_of_the_recipe(full_profile) -> None:
    rows = {r.item: r for r in memory_table(mistral_7b_config(), full_profile)}
    assert rows["LoRA adapter"].bytes == 41_943_040 * 2  # TRL 1.x casts a 4-bit model's adapter to bf16
    assert rows["LoRA gradients"].bytes == 41_943_040 * 2
    assert rows["AdamW states (32-bit)"].bytes == 41_943_040 * 8
    parts = [r for r in rows.values() if r.part_of_recipe]
    assert [r.item for r in parts][0] == "weights 4-bit NF4"
    assert rows["QLoRA training total"].bytes == sum(r.bytes for r in parts)
    assert 8 < rows["QLoRA training total"].gib < 24  # fits a 24 GB card on paper, well inside an A100
    assert rows["weights bf16"].gib == pytest.approx(13.49, abs=0.01)
    assert rows["full fine-tuning, for contrast"].gib > 100
    text = format_memory_table(list(rows.values()))
    assert "QLoRA training total" in text and "GiB" in text


def test_adapter_is_fp32_without_4bit(full_profile) -> None:
    no_4bit = full_profile.replace("quantization", load_in_4bit=False)
    rows = {r.item: r for r in memory_table(mistral_7b_config(), no_4bit)}
    assert rows["LoRA adapter"].bytes == 41_943_040 * 4
    assert "fp32" in rows["LoRA adapter"].note


def test_memory_plot_is_saved(full_profile, tmp_path) -> None:
    from helpers.plots import plot_memory_table

    rows = memory_table(mistral_7b_config(), full_profile)
    path = tmp_path / "memory.png"
    plot_memory_table(rows, path)
    assert path.stat().st_size > 1000


def test_meta_model_builds_on_cpu_default_after_use() -> None:
    meta_model(mistral_7b_config())
    assert torch.empty(1).device.type == "cpu"  # the meta device context does not leak
