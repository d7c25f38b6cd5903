"""helpers.architectures: the real configs against their published files and counts, and the one config builder."""

from __future__ import annotations

import json

import jinja2
import pytest
from transformers import MistralConfig, Qwen2Config

from helpers import architectures as arch

# The published config.json files, as text (huggingface.co; see docs/standins.md): an independent reference.
OPENHERMES_CONFIG_JSON = """{
  "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 32000, "hidden_act": "silu",
  "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 32768,
  "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
  "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": false,
  "torch_dtype": "bfloat16", "use_cache": false, "vocab_size": 32002
}"""
QWEN_CONFIG_JSON = """{
  "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
  "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02, "intermediate_size": 4864,
  "max_position_embeddings": 32768, "max_window_layers": 21, "model_type": "qwen2", "num_attention_heads": 14,
  "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
  "sliding_window": 32768, "tie_word_embeddings": true, "torch_dtype": "bfloat16", "use_cache": true,
  "use_sliding_window": false, "vocab_size": 151936
}"""


def _without_version(config) -> dict:
    d = config.to_dict()
    d.pop("transformers_version", None)
    return d


def test_mistral_7b_counts_its_published_parameters():
    config = arch.mistral_config(arch.MISTRAL_7B_SHAPE, vocab_size=arch.MISTRAL_7B_VOCAB)
    assert arch.parameter_count(config) == 7_241_732_096  # GGUF general.parameter_count of Mistral-7B-v0.1


def test_openhermes_adds_two_rows_to_embedding_and_head():
    count = arch.parameter_count(arch.openhermes_config())
    assert count == 7_241_732_096 + 2 * 2 * 4096 == arch.OPENHERMES_PARAMETERS


def test_qwen_counts_its_published_parameters_with_tied_embeddings():
    config = arch.qwen2_5_0_5b_config()
    model = arch.meta_model(config)
    assert arch.parameter_count(config) == 494_032_768
    assert model.lm_head.weight is model.model.embed_tokens.weight
    embedding = config.vocab_size * config.hidden_size
    assert round((494_032_768 - embedding) / 1e9, 2) == 0.36  # "0.36B non-embedding" on the model card
    attention = model.model.layers[0].self_attn
    assert attention.q_proj.bias is not None and attention.o_proj.bias is None


def test_openhermes_config_is_the_published_file():
    published = MistralConfig.from_dict(json.loads(OPENHERMES_CONFIG_JSON))
    assert _without_version(arch.openhermes_config()) == _without_version(published)


def test_qwen_config_is_the_published_file():
    published = Qwen2Config.from_dict(json.loads(QWEN_CONFIG_JSON))
    built = arch.qwen2_5_0_5b_config()
    assert _without_version(built) == _without_version(published)
    assert built.num_attention_heads // built.num_key_value_heads == 7 and built.tie_word_embeddings


def test_mistral_config_reproduces_the_tiny_models_config():
    from helpers.tiny_model import TinyRecipe, build_tokenizer, build_untrained_model

    recipe = TinyRecipe()
    tokenizer = build_tokenizer(recipe)
    today = build_untrained_model(tokenizer, recipe).config
    built = arch.mistral_config(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=recipe.num_attention_heads,
        num_key_value_heads=recipe.num_key_value_heads,
        max_position_embeddings=recipe.max_position_embeddings,
        sliding_window=None,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    expected, got = today.to_dict(), built.to_dict()
    expected.pop("architectures", None)  # set by the model class when it is built, not by the config
    got.pop("architectures", None)
    assert got == expected


@pytest.mark.parametrize(
    "kwargs",
    [
        # scripts/gpu_check.py and helpers memory tables, as they build MistralConfig today
        dict(vocab_size=32000, max_position_embeddings=32768, rope_theta=10000.0, sliding_window=None,
             tie_word_embeddings=False, **arch.MISTRAL_7B_SHAPE),
        dict(vocab_size=32002, **arch.MISTRAL_7B_SHAPE),
        dict(vocab_size=32000, max_position_embeddings=32768, rope_theta=10000.0, sliding_window=None,
             tie_word_embeddings=False, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
             num_attention_heads=8, num_key_value_heads=2, eos_token_id=5, pad_token_id=0, bos_token_id=None),
    ],
)
def test_mistral_config_equals_mistralconfig_with_the_same_arguments(kwargs):
    assert arch.mistral_config(**kwargs).to_dict() == MistralConfig(**kwargs).to_dict()


def test_a_shape_mapping_and_keywords_combine():
    config = arch.mistral_config(arch.MISTRAL_7B_SHAPE, vocab_size=100, num_hidden_layers=2)
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (4096, 2, 100)


def test_bad_shapes_and_misspelt_settings_are_refused():
    shape = dict(vocab_size=10, hidden_size=64, intermediate_size=128, num_hidden_layers=1)
    with pytest.raises(TypeError, match="num_attention_heads"):
        arch.mistral_config(**shape)
    with pytest.raises(ValueError, match="multiple of num_attention_heads"):
        arch.mistral_config(**shape, num_attention_heads=6, num_key_value_heads=2)
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        arch.qwen2_config(**shape, num_attention_heads=8, num_key_value_heads=3)
    with pytest.raises(ValueError, match="did you mean 'sliding_window'"):
        arch.mistral_config(**shape, num_attention_heads=8, num_key_value_heads=2, sliding_windwo=4)
    with pytest.raises(ValueError, match="positive integer"):
        arch.mistral_config(**{**shape, "hidden_size": 0}, num_attention_heads=8, num_key_value_heads=2)


def _render(template: str, messages, add_generation_prompt=True) -> str:
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)  # as transformers renders chat templates
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt)


def test_qwen_template_inserts_its_default_system_prompt_only_when_there_is_none():
    user = [{"role": "user", "content": "hi"}]
    assert _render(arch.QWEN2_5_CHAT_TEMPLATE, user) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    with_system = [{"role": "system", "content": "Be brief."}, *user]
    assert _render(arch.QWEN2_5_CHAT_TEMPLATE, with_system) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_openhermes_template_is_plain_chatml_and_the_tiny_models():
    from helpers.tiny_model import CHATML_TEMPLATE

    assert arch.OPENHERMES_2_5_CHAT_TEMPLATE == CHATML_TEMPLATE
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert _render(arch.OPENHERMES_2_5_CHAT_TEMPLATE, messages, False) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
    )


def test_token_tables_agree_with_the_configs():
    assert arch.OPENHERMES_2_5_ADDED_TOKENS[arch.OPENHERMES_2_5_CONFIG["eos_token_id"]] == (arch.IM_END, True)
    assert arch.OPENHERMES_2_5_SPECIAL_TOKENS_MAP["pad_token"] != arch.OPENHERMES_2_5_SPECIAL_TOKENS_MAP["eos_token"]
    first = arch.QWEN2_5_FIRST_ADDED_ID
    names = [token for token, _ in arch.QWEN2_5_ADDED_TOKENS]
    assert names.index("<|endoftext|>") + first == arch.QWEN2_5_0_5B_CONFIG["bos_token_id"] == 151643
    assert names.index(arch.IM_END) + first == arch.QWEN2_5_0_5B_CONFIG["eos_token_id"] == 151645
    assert first + len(names) == 151665 < arch.QWEN2_5_0_5B_SHAPE["vocab_size"]
    assert arch.QWEN2_5_GENERATION_CONFIG["eos_token_id"] == [151645, 151643]
