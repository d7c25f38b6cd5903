"""Memory arithmetic (notebook 02): counted from Mistral-7B built on the meta device, checked on the tiny model."""

from __future__ import annotations

import pytest
import torch

from helpers.architectures import MISTRAL_7B_VOCAB, OPENHERMES_VOCAB, meta_model
from helpers.loading import (
    TRL_DPO_HEAD_OUTPUTS,
    TRL_TOKEN_TILE,
    TRL_VOCAB_TILE,
    activation_bytes,
    format_memory_table,
    full_logits_bytes,
    log_prob_head_bytes,
    log_prob_head_saved_bytes,
    log_prob_saved_bytes,
    memory_table,
    mistral_7b_config,
    nf4_layer_bytes,
    quant_state_bytes,
    saved_tensor_bytes,
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


def test_activations_count_the_decoder_layers_only() -> None:
    """Worked by hand: 12,288 tokens; 32 checkpointed layer inputs of 4,096 bf16 values, plus one layer recomputed,
    7 x 4,096 + 3 x 1,024 + 4 x 14,336 = 89,088 bf16 values a token. No logits: TRL's head is a row of its own."""
    tokens = 8 * 1536
    assert activation_bytes(mistral_7b_config(), 8, 1536) == 32 * tokens * 4096 * 2 + tokens * 89_088 * 2
    assert activation_bytes(mistral_7b_config(), 8, 1536) == 5_410_652_160


def test_fused_head_constants_are_trls() -> None:
    """The tile sizes and outputs the memory table assumes are the ones the installed TRL uses."""
    import inspect

    from trl.kernels import chunked_logprob
    from trl.trainer import dpo_trainer, utils

    assert TRL_TOKEN_TILE == chunked_logprob.TOKEN_CHUNK_SIZE
    assert TRL_VOCAB_TILE == utils._CHUNKED_LOGPROB_CHUNK_SIZE
    init = inspect.getsource(dpo_trainer.DPOTrainer.__init__)
    assert f"outputs = {TRL_DPO_HEAD_OUTPUTS!r}".replace("'", '"') in init
    assert "fused_lm_head=True" in inspect.getsource(dpo_trainer.DPOTrainer._compute_loss)


def test_log_prob_head_of_the_recipe_by_hand() -> None:
    """Worked by hand for 8 x 1,536 = 12,288 tokens of Mistral-7B in bf16: a 4,096 x 32,768 bf16 tile, the saved
    hidden states (4,096 bf16 values + 18 bytes a token) and their gradient (4,096 values in fp32 and again in bf16)."""
    config, tokens = mistral_7b_config(), 12_288
    assert log_prob_head_saved_bytes(config, tokens) == 12_288 * (4096 * 2 + 18) == 100_884_480
    assert log_prob_head_bytes(config, tokens) == 4096 * 32768 * 2 + 100_884_480 + 12_288 * 4096 * 6 == 671_309_824
    assert full_logits_bytes(config, tokens) == 12_288 * 32_002 * 6  # a bf16 copy and an fp32 one
    assert log_prob_head_bytes(config, 100) < log_prob_head_bytes(config, tokens)  # the tile shrinks with few tokens


def test_saved_tensor_bytes_counts_each_storage_once_and_skips_parameters() -> None:
    weight = torch.nn.Parameter(torch.randn(8, 8))
    x = torch.randn(4, 8, requires_grad=True)
    counted, _ = saved_tensor_bytes(lambda: (x @ weight).exp().sum(), exclude=[weight])
    assert counted == x.numel() * 4 + 4 * 8 * 4  # mm keeps x (weight excluded), exp keeps its [4, 8] output


def test_fused_head_keeps_what_the_table_assumes_measured_on_the_tiny_model(tiny_model_path) -> None:
    from helpers.loading import load_model

    model = load_model(get_profile("tiny"), four_bit=False, source=str(tiny_model_path))
    flags = [p.requires_grad for p in model.parameters()]
    ids = torch.randint(len(model.get_input_embeddings().weight), (4, 64), generator=torch.Generator().manual_seed(0))
    measured = log_prob_saved_bytes(model, ids, labels=ids)
    scored, config = 4 * 63, model.config
    fused = log_prob_head_saved_bytes(config, scored, bytes_per_value=4)
    assert abs(measured["fused head"] - fused) <= 0.01 * fused
    assert abs(measured["full logits"] - scored * config.vocab_size * 4) <= 0.01 * measured["full logits"]
    assert measured["fused head"] * 5 < measured["full logits"]
    # the model is left as it was
    assert "forward" not in model.__dict__ and [p.requires_grad for p in model.parameters()] == flags
    assert not getattr(model, "_require_grads_hooks", [])


def test_memory_table_of_the_recipe(full_profile) -> None:
    config = mistral_7b_config()
    rows = {r.item: r for r in memory_table(config, full_profile)}
    assert rows["LoRA adapter"].bytes == 41_943_040 * 2  # TRL 1.x casts a 4-bit model's adapter to bf16
    assert rows["LoRA gradients"].bytes == 41_943_040 * 2
    assert rows["AdamW states (32-bit)"].bytes == 41_943_040 * 8
    assert rows["activations (estimate)"].bytes == activation_bytes(config, 8, 1536)
    assert rows["LM head, fused (estimate)"].bytes == log_prob_head_bytes(config, 8 * 1536)
    parts = [r for r in rows.values() if r.part_of_recipe]
    assert [r.item for r in parts][0] == "weights 4-bit NF4"
    assert rows["QLoRA training total (estimate)"].bytes == sum(r.bytes for r in parts)
    assert 8 < rows["QLoRA training total (estimate)"].gib < 24  # fits a 24 GB card on paper, well inside an A100
    assert rows["weights bf16"].gib == pytest.approx(13.49, abs=0.01)
    assert not rows["full logits, for contrast"].part_of_recipe  # TRL 1.16 never allocates them
    assert rows["full logits, for contrast"].bytes == 12_288 * 32_002 * 6
    assert rows["full fine-tuning, for contrast (estimate)"].gib > 100
    assert all("estimate" in r.item for r in rows.values() if r.item.startswith(("activations", "LM head", "QLoRA")))
    text = format_memory_table(list(rows.values()))
    assert "QLoRA training total" in text and "GiB" in text


def test_adapter_dtype_follows_the_training_precision(full_profile) -> None:
    """bf16: TRL's cast stays; fp16 (a T4) and fp32: helpers.training.prepare_trainer casts it back to fp32."""
    for precision, width in (("bf16", 2), ("fp16", 4), ("fp32", 4)):
        rows = {r.item: r for r in memory_table(mistral_7b_config(), full_profile, precision=precision)}
        assert rows["LoRA adapter"].bytes == 41_943_040 * width, precision
    with pytest.raises(ValueError, match="precision"):
        memory_table(mistral_7b_config(), full_profile, precision="int8")


def test_adapter_is_fp32_without_4bit(full_profile) -> None:
    no_4bit = full_profile.replace("quantization", load_in_4bit=False)
    rows = {r.item: r for r in memory_table(mistral_7b_config(), no_4bit)}
    assert rows["LoRA adapter"].bytes == 41_943_040 * 4
    assert "fp32" in rows["LoRA adapter"].note


def test_memory_plot_is_saved(full_profile, tmp_path) -> None:
    from helpers.plots import plot_memory_table

    rows = memory_table(mistral_7b_config(), full_profile)
    path = tmp_path / "memory.png"
    fig = plot_memory_table(rows, path)
    assert path.stat().st_size > 1000
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert len(legend) == 2 and "summed in the total" in legend[0]


def test_meta_model_builds_on_cpu_default_after_use() -> None:
    meta_model(mistral_7b_config())
    assert torch.empty(1).device.type == "cpu"  # the meta device context does not leak
