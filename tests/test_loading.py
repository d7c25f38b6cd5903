"""4-bit loading and the memory table (notebook 02), each against an independent reference: bitsandbytes' own
``quantize_4bit`` and a model it really loaded, Mistral AI's published parameter count, PEFT's own adapter count,
and the tensors autograd really keeps (counted with ``saved_tensors_hooks`` on the tiny model)."""

from __future__ import annotations

import dataclasses

import bitsandbytes.functional as bnbf
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, MistralConfig, Qwen2Config
from trl.trainer.utils import add_fused_lm_head

from helpers.loading import (
    OPENHERMES_2_5_CONFIG,
    activation_bytes,
    head_saved_bytes,
    lora_parameters,
    memory_table,
    meta_model,
    nf4_layer_bytes,
    plot_memory_table,
    quant_state_bytes,
    quantized_layer_names,
    weight_bytes,
)
from helpers.models import keep_nf4_trainable, largest_difference, logits_of
from helpers.profiles import FULL, SEVEN_PROJECTIONS

MISTRAL_7B_PARAMETERS = 7_241_732_096  # mistralai/Mistral-7B-v0.1 as published (vocabulary 32,000)
SEQUENCES, LENGTH = 4, 64  # the measured batch: 2 pairs (chosen + rejected) of 64 tokens


def four_bit(model_id: str, dtype: str = "float32", double_quant: bool = True):
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                                bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(model_id, quantization_config=config, dtype=dtype)
    keep_nf4_trainable(model)
    return model


@pytest.fixture(scope="module")
def model_4bit(profile):
    return four_bit(profile.model_id)


@pytest.fixture(scope="module")
def small_profile(profile):
    """The tiny profile with the measured batch's shape."""
    return profile.with_changes("dpo", per_device_train_batch_size=SEQUENCES // 2, max_length=LENGTH)


def saved_bytes(fn, exclude) -> int:
    """What autograd keeps for backward while ``fn()`` runs (each storage once), the tensors of ``exclude`` left out."""
    skip, seen = {t.untyped_storage().data_ptr() for t in exclude}, {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in skip:
            seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(seen.values())


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return torch.randint(5, 1000, (SEQUENCES, LENGTH), generator=torch.Generator().manual_seed(0))


# --- what bitsandbytes stores ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1024, 4096), (14336, 8), (1000, 333), (64, 64), (3, 5)])
@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_layer_bytes_are_what_bitsandbytes_quantize_4bit_keeps(shape, double_quant) -> None:
    packed, state = bnbf.quantize_4bit(torch.randn(shape), quant_type="nf4", compress_statistics=double_quant)
    tensors = [packed, state.absmax, state.code]
    if double_quant:
        tensors += [state.offset, state.state2.absmax, state.state2.code]
    assert nf4_layer_bytes(shape[0] * shape[1], double_quant) == sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize(("dtype", "bits"), [("float32", 32), ("bfloat16", 16)])
@pytest.mark.parametrize("double_quant", [True, False])
def test_weight_bytes_in_4bit_are_what_a_model_loaded_by_bitsandbytes_holds(profile, tiny_model, dtype, bits,
                                                                            double_quant) -> None:
    loaded = four_bit(profile.model_id, dtype, double_quant)
    held = loaded.get_memory_footprint(return_buffers=False) + quant_state_bytes(loaded)
    assert weight_bytes(tiny_model, 4, unquantized_bits=bits, double_quant=double_quant) == held
    assert weight_bytes(tiny_model, 32) == tiny_model.get_memory_footprint(return_buffers=False)


def test_the_seven_projections_are_4bit_and_nothing_else(model_4bit, tiny_model) -> None:
    names = quantized_layer_names(model_4bit)
    assert len(names) == tiny_model.config.num_hidden_layers * 7
    assert {n.rsplit(".", 1)[-1] for n in names} == set(SEVEN_PROJECTIONS)
    assert model_4bit.lm_head.weight.dtype == model_4bit.model.embed_tokens.weight.dtype == torch.float32
    assert quantized_layer_names(tiny_model) == []


def test_the_4bit_model_computes_with_the_weights_bitsandbytes_dequantizes(model_4bit, profile, tiny_model,
                                                                            tokenizer) -> None:
    dequantized = AutoModelForCausalLM.from_pretrained(profile.model_id, dtype=torch.float32)
    with torch.no_grad():
        for name in quantized_layer_names(model_4bit):
            weight = model_4bit.get_submodule(name).weight
            dequantized.get_submodule(name).weight.copy_(bnbf.dequantize_4bit(weight.data, weight.quant_state))
    ids = tokenizer("<|im_start|>user\nWhat is a key used for?<|im_end|>\n", return_tensors="pt")["input_ids"]
    assert largest_difference(logits_of(model_4bit, ids), logits_of(dequantized, ids)) < 1e-4
    assert largest_difference(logits_of(model_4bit, ids), logits_of(tiny_model, ids)) > 1e-2  # it did round


# --- Mistral-7B on the meta device ---------------------------------------------------------------------------------


def test_the_meta_mistral_has_the_published_parameter_count_and_no_storage() -> None:
    base = meta_model(MistralConfig(**{**OPENHERMES_2_5_CONFIG, "vocab_size": 32000, "eos_token_id": 2}))
    assert sum(p.numel() for p in base.parameters()) == MISTRAL_7B_PARAMETERS
    assert all(p.is_meta for p in base.parameters())
    openhermes = meta_model(MistralConfig(**OPENHERMES_2_5_CONFIG))
    assert openhermes.num_parameters() == MISTRAL_7B_PARAMETERS + 2 * 4096 * 2  # two tokens, embeddings and head


def test_the_config_agrees_with_the_stand_ins_transcription_and_qwen_with_its_published_count() -> None:
    from standins.hub import OPENHERMES_2_5_CONFIG as TRANSCRIBED  # test support: the other copy of config.json

    assert {key: TRANSCRIBED[key] for key in OPENHERMES_2_5_CONFIG} == OPENHERMES_2_5_CONFIG
    qwen = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)  # notebook 02, exercise 3
    assert meta_model(qwen).num_parameters() == 494_032_768  # Qwen2.5-0.5B as published
    assert torch.zeros(1).device.type == "cpu", "meta_model must leave the default device as it was"


@pytest.mark.parametrize("which", ["tiny model", "Mistral-7B on the meta device"])
def test_lora_parameters_are_what_peft_trains(which, tiny_model) -> None:
    model = tiny_model if which == "tiny model" else meta_model(MistralConfig(**OPENHERMES_2_5_CONFIG))
    expected = lora_parameters(model, FULL.lora)
    wrapped = get_peft_model(model, LoraConfig(**FULL.lora), low_cpu_mem_usage=True)
    try:
        assert expected == wrapped.get_nb_trainable_parameters()[0]
    finally:
        wrapped.unload()
    if which != "tiny model":
        assert expected == 41_943_040  # by hand: 32 layers x 16 x (2(4096+4096) + 2(4096+1024) + 3(4096+14336))


# --- the table's rows against measured tensors ------------------------------------------------------------------


def rows_of(model, profile, **dpo) -> dict:
    return {row.item: row for row in memory_table(model, profile.with_changes("dpo", **dpo), precision="fp32")}


def test_the_weight_and_adapter_rows_are_what_is_really_held(tiny_model, small_profile) -> None:
    rows = rows_of(tiny_model, small_profile)
    assert rows["weights fp32"].bytes == tiny_model.get_memory_footprint(return_buffers=False)
    loaded = four_bit(small_profile.model_id, "float32")  # precision fp32: the rest is kept in 32 bits
    assert rows["weights 4-bit NF4"].bytes == loaded.get_memory_footprint(return_buffers=False) + quant_state_bytes(
        loaded)
    wrapped = get_peft_model(AutoModelForCausalLM.from_pretrained(small_profile.model_id, dtype=torch.float32),
                             LoraConfig(**small_profile.lora))
    adapter = sum(p.numel() * p.element_size() for p in wrapped.parameters() if p.requires_grad)
    assert rows["LoRA adapter"].bytes == rows["LoRA gradients"].bytes == adapter  # fp32: 4 bytes each
    assert rows["AdamW states"].bytes == 2 * adapter  # two fp32 moments per parameter
    total = sum(rows[name].bytes for name in ("weights 4-bit NF4", "LoRA adapter", "LoRA gradients", "AdamW states",
                                              "activations (estimate)", "LM head, fused (estimate)"))
    assert rows["QLoRA training total (estimate)"].bytes == total


@pytest.fixture(scope="module")
def lora_model(profile):
    """The tiny model wrapped with the recipe's adapter, dropout off (as DPOTrainer sets it), in training mode."""
    wrapped = get_peft_model(AutoModelForCausalLM.from_pretrained(profile.model_id, dtype=torch.float32),
                             LoraConfig(**{**profile.lora, "lora_dropout": 0.0}))
    return wrapped.train()


def decoder_saved_bytes(model, batch) -> int:
    decoder = model.get_base_model().model
    return saved_bytes(lambda: decoder(input_ids=batch).last_hidden_state.sum(), list(model.parameters()))


def test_the_activation_estimate_is_what_autograd_keeps(lora_model, batch, small_profile) -> None:
    """Without checkpointing: within 10% of the measured decoder. Checkpointed, the estimate is a peak: the layer
    inputs kept through the forward (measured) plus one layer's activations while it is recomputed."""
    config, layers = lora_model.config, lora_model.config.num_hidden_layers
    plain = decoder_saved_bytes(lora_model, batch)
    estimate = rows_of(lora_model.get_base_model(), small_profile, gradient_checkpointing=False)
    assert estimate["activations (estimate)"].bytes == pytest.approx(plain, rel=0.10)
    assert activation_bytes(config, SEQUENCES, LENGTH, checkpointing=False, bytes_per_value=4) == estimate[
        "activations (estimate)"].bytes
    lora_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora_model.enable_input_require_grads()
    try:
        kept = decoder_saved_bytes(lora_model, batch)
    finally:
        lora_model.gradient_checkpointing_disable()
        lora_model.disable_input_require_grads()
    checkpointed = rows_of(lora_model.get_base_model(), small_profile, gradient_checkpointing=True)
    assert kept < plain / 4, "checkpointing should keep far less"
    assert checkpointed["activations (estimate)"].bytes == pytest.approx(kept + plain / layers, rel=0.10)


def test_the_fused_head_keeps_what_the_table_says_and_the_logits_way_a_row_per_token(profile, batch) -> None:
    """TRL 1.16's fused LM head, called as DPOTrainer calls it, against the logits + log_softmax way."""
    model = AutoModelForCausalLM.from_pretrained(profile.model_id, dtype=torch.float32)
    params = list(model.parameters())
    for param in params:
        param.requires_grad_(False)  # frozen, as the base under LoRA; the embeddings' output requires grad
    model.enable_input_require_grads()
    decoder = saved_bytes(lambda: model.model(input_ids=batch).last_hidden_state.sum(), params)
    targets = batch[:, 1:]

    def logits_way():
        log_probs = model(input_ids=batch).logits[:, :-1].float().log_softmax(-1)
        return log_probs.gather(-1, targets.unsqueeze(-1)).sum()

    full = saved_bytes(logits_way, params) - decoder
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    fused = saved_bytes(lambda: model(input_ids=batch, labels=batch, fused_lm_head=True).log_probs.sum(), params)
    scored = SEQUENCES * (LENGTH - 1)  # on a CPU TRL scores every position after the first
    assert fused - decoder == pytest.approx(head_saved_bytes(model.config, scored, 4), rel=0.01)
    assert full == pytest.approx(scored * model.config.vocab_size * 4, rel=0.01)  # an fp32 logits row per token


def test_the_recipes_table_adds_up(profile) -> None:
    rows = {r.item: r for r in memory_table(meta_model(MistralConfig(**OPENHERMES_2_5_CONFIG)), FULL)}
    assert rows["weights fp32"].bytes == 4 * (MISTRAL_7B_PARAMETERS + 16384)
    assert rows["LoRA adapter"].bytes == 2 * 41_943_040  # bf16 under the card's bf16
    assert rows["AdamW states"].bytes == 8 * 41_943_040  # paged_adamw_32bit: two fp32 moments
    assert rows["full logits, for contrast"].bytes == 2 * 4 * 1536 * 32002 * (2 + 4)
    with pytest.raises(ValueError, match="bf16, fp16 or fp32"):
        memory_table(meta_model(MistralConfig(**OPENHERMES_2_5_CONFIG)), dataclasses.replace(FULL), precision="fp8")


# --- the figure ---------------------------------------------------------------------------------------------------


def test_the_memory_plot_legend_covers_no_bar_label(tmp_path) -> None:
    """Issue 17: the legend covered the full-fine-tuning bar's label ("113.57" read as "3.57")."""
    rows = memory_table(meta_model(MistralConfig(**OPENHERMES_2_5_CONFIG)), FULL)
    fig = plot_memory_table(rows, tmp_path / "memory.png", title="memory")
    renderer = FigureCanvasAgg(fig).get_renderer()
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent(renderer)
    labels = [t for t in ax.texts if t.get_text()]
    assert [t.get_text() for t in labels][0] == f"{rows[-1].bytes / 2**30:.2f}"  # bottom bar: full fine-tuning
    for text in [*labels, ax.xaxis.label, *ax.get_yticklabels()]:
        assert not legend.overlaps(text.get_window_extent(renderer)), f"the legend covers {text.get_text()!r}"
        assert text.get_window_extent(renderer).x1 <= fig.bbox.x1, f"{text.get_text()!r} runs off the figure"
    assert not legend.overlaps(ax.get_window_extent(renderer)), "the legend sits on the bars"
    assert (tmp_path / "memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
