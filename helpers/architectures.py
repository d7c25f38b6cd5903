"""The real configurations of the chat models the course uses, in one place, and one config builder per family.

Two base models appear in the profiles: ``teknium/OpenHermes-2.5-Mistral-7B`` (``full``, a Mistral-7B fine-tune
with ChatML's two tokens added to the vocabulary) and ``Qwen/Qwen2.5-0.5B-Instruct`` (``t4``). Their published
``config.json``, ``generation_config.json`` and tokenizer conventions are transcribed here, so the course can build
them on PyTorch's ``meta`` device (count parameters, size memory) and :mod:`helpers.standins` can build offline
stand-ins that follow them. Where each value was confirmed, and what could not be, is listed in docs/standins.md.

:func:`mistral_config` is the one place a ``MistralConfig`` is built for a given shape (the tiny model, the
benchmark models, the GPU check and the 7B memory tables all use it); :func:`qwen2_config` does the same for
Qwen2. Both check the shape (heads divide the width, key/value heads divide the heads) and refuse unknown
settings, which ``transformers`` would otherwise store silently.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import Any

import torch
from transformers import AutoModelForCausalLM, MistralConfig, PreTrainedConfig, Qwen2Config

OPENHERMES_ID = "teknium/OpenHermes-2.5-Mistral-7B"
QWEN2_5_0_5B_ID = "Qwen/Qwen2.5-0.5B-Instruct"
MISTRAL_7B_ID = "mistralai/Mistral-7B-v0.1"

SHAPE_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
)
# config.json keys that describe the file, not the model: dropped before building a config object
_FILE_ONLY_KEYS = ("model_type", "transformers_version", "_name_or_path")
# legacy names transformers 5 still accepts (and converts): rope_theta -> rope_parameters, torch_dtype -> dtype
_LEGACY_KEYS = frozenset({"rope_theta", "rope_scaling", "torch_dtype"})

# ------------------------------------------------------------------------------------------ Mistral-7B / OpenHermes

IM_END, IM_START = "<|im_end|>", "<|im_start|>"

MISTRAL_7B_SHAPE: dict[str, int] = {  # mistralai/Mistral-7B-v0.1, kept unchanged by OpenHermes-2.5
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
}
MISTRAL_7B_VOCAB = 32000  # Mistral-7B-v0.1's sentencepiece vocabulary: <unk>=0, <s>=1, </s>=2, 256 byte tokens, ...
OPENHERMES_VOCAB = 32002  # + <|im_end|> = 32000 and <|im_start|> = 32001, added after the base vocabulary

# teknium/OpenHermes-2.5-Mistral-7B config.json as published (the keys a MistralConfig takes).
OPENHERMES_2_5_CONFIG: dict[str, Any] = {
    "architectures": ["MistralForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": 32000,  # <|im_end|>, not Mistral's </s> = 2
    "hidden_act": "silu",
    **MISTRAL_7B_SHAPE,
    "initializer_range": 0.02,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": False,
    "vocab_size": OPENHERMES_VOCAB,
}
OPENHERMES_2_5_GENERATION_CONFIG: dict[str, Any] = {
    "_from_model_config": True,
    "bos_token_id": 1,
    "eos_token_id": 32000,
}

# OpenHermes-2.5's tokenizer: Mistral's sentencepiece BPE (byte fallback, "▁" word starts, <s> prepended) with the
# two ChatML tokens added; special_tokens_map.json as published.
OPENHERMES_2_5_SPECIAL_TOKENS_MAP: dict[str, str] = {
    "bos_token": "<s>",
    "eos_token": IM_END,
    "pad_token": "</s>",  # a pad token IS set, and it is not the eos token
    "unk_token": "<unk>",
}
OPENHERMES_2_5_ADDED_TOKENS: dict[int, tuple[str, bool]] = {  # id -> (content, special)
    0: ("<unk>", True),
    1: ("<s>", True),
    2: ("</s>", True),
    32000: (IM_END, True),
    32001: (IM_START, False),
}
OPENHERMES_2_5_TOKENIZER: dict[str, Any] = {  # tokenizer_config.json settings (besides the tokens above)
    "tokenizer_class": "LlamaTokenizer",
    "add_bos_token": True,
    "add_eos_token": False,
    "legacy": True,
    "clean_up_tokenization_spaces": False,
    "spaces_between_special_tokens": False,
    "use_default_system_prompt": True,
    "model_max_length": 1000000000000000019884624838656,  # transformers' "no limit" value
}
# OpenHermes-2.5's chat template (plain ChatML: no default system prompt, no bos).
OPENHERMES_2_5_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# ------------------------------------------------------------------------------------------ Qwen2.5-0.5B-Instruct

QWEN2_5_0_5B_SHAPE: dict[str, int] = {
    "vocab_size": 151936,  # the embedding rows; the tokenizer has 151,665 tokens (the rest is padding)
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
}
# Qwen/Qwen2.5-0.5B-Instruct config.json as published (the keys a Qwen2Config takes).
QWEN2_5_0_5B_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,  # <|endoftext|>
    "eos_token_id": 151645,  # <|im_end|>
    "hidden_act": "silu",
    **QWEN2_5_0_5B_SHAPE,
    "initializer_range": 0.02,
    "max_position_embeddings": 32768,
    "max_window_layers": 21,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,  # unused: use_sliding_window is false (transformers stores None)
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
}
QWEN2_5_GENERATION_CONFIG: dict[str, Any] = {
    "bos_token_id": 151643,
    "pad_token_id": 151643,
    "do_sample": True,
    "eos_token_id": [151645, 151643],  # <|im_end|> ends a turn, <|endoftext|> a document
    "repetition_penalty": 1.1,
    "temperature": 0.7,
    "top_p": 0.8,
    "top_k": 20,
}
QWEN2_5_FIRST_ADDED_ID = 151643  # the byte-level BPE vocabulary has ids 0 .. 151642
# The tokens added after the BPE vocabulary, in id order from 151643: (content, special).
QWEN2_5_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    (IM_START, True),
    (IM_END, True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)
QWEN2_5_TOKENIZER: dict[str, Any] = {  # tokenizer_config.json settings (besides the tokens above)
    "tokenizer_class": "Qwen2Tokenizer",
    "add_bos_token": False,
    "add_prefix_space": False,
    "bos_token": None,
    "eos_token": IM_END,
    "pad_token": "<|endoftext|>",
    "unk_token": None,
    "clean_up_tokenization_spaces": False,
    "errors": "replace",
    "model_max_length": 131072,
    "split_special_tokens": False,
    "additional_special_tokens": [token for token, special in QWEN2_5_ADDED_TOKENS[1:14]],
}
QWEN2_5_DEFAULT_SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
# Qwen2.5-Instruct's chat template: ChatML with tool calls, and its default system prompt when there is none.
QWEN2_5_CHAT_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""  # noqa: E501  (the template's own lines, kept verbatim)

# Parameter counts, as published (GGUF metadata, model cards) and as counted here on the meta device.
PUBLISHED_PARAMETERS: dict[str, int] = {
    MISTRAL_7B_ID: 7_241_732_096,  # vocabulary 32,000
    QWEN2_5_0_5B_ID: 494_032_768,  # "0.49B (0.36B non-embedding)", tied embeddings counted once
}
# OpenHermes-2.5 adds two rows to the input embedding and two to the untied output head: 2 x 2 x 4096.
OPENHERMES_PARAMETERS = PUBLISHED_PARAMETERS[MISTRAL_7B_ID] + 2 * 2 * MISTRAL_7B_SHAPE["hidden_size"]


# ------------------------------------------------------------------------------------------ building configs


def _known_keys(config_class: type[PreTrainedConfig]) -> frozenset[str]:
    """The settings ``config_class`` defines (its dataclass fields) plus the legacy names it converts."""
    return frozenset(f.name for f in dataclasses.fields(config_class)) | _LEGACY_KEYS


def _build(
    config_class: type[PreTrainedConfig],
    builder: str,
    shape: Mapping[str, Any] | None,
    explicit: Mapping[str, int | None],
    overrides: Mapping[str, Any],
) -> PreTrainedConfig:
    """Merge ``shape``, the explicit shape keywords and ``overrides``; check them; build ``config_class``."""
    values: dict[str, Any] = {k: v for k, v in dict(shape or {}).items() if k not in _FILE_ONLY_KEYS}
    values.update({k: v for k, v in explicit.items() if v is not None})
    values.update(overrides)
    missing = [k for k in SHAPE_KEYS if values.get(k) is None]
    if missing:
        raise TypeError(f"{builder}() needs the shape values {', '.join(missing)} (keywords or a shape mapping)")
    known = _known_keys(config_class)
    unknown = sorted(k for k in values if k not in known)
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(
            f"{builder}(): unknown {config_class.__name__} setting(s) {', '.join(hints)}; transformers would "
            "store them silently and the model would not use them"
        )
    for key in SHAPE_KEYS:
        if not isinstance(values[key], int) or isinstance(values[key], bool) or values[key] < 1:
            raise ValueError(f"{builder}(): {key} must be a positive integer, not {values[key]!r}")
    heads, kv_heads, hidden = values["num_attention_heads"], values["num_key_value_heads"], values["hidden_size"]
    if heads % kv_heads:
        raise ValueError(
            f"{builder}(): num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads}): "
            "grouped-query attention shares each key/value head among the same number of query heads"
        )
    if values.get("head_dim") is None and hidden % heads:
        raise ValueError(
            f"{builder}(): hidden_size ({hidden}) must be a multiple of num_attention_heads ({heads}), "
            "or give head_dim explicitly"
        )
    return config_class(**values)


def mistral_config(
    shape: Mapping[str, Any] | None = None,
    /,
    *,
    vocab_size: int | None = None,
    hidden_size: int | None = None,
    intermediate_size: int | None = None,
    num_hidden_layers: int | None = None,
    num_attention_heads: int | None = None,
    num_key_value_heads: int | None = None,
    **overrides: Any,
) -> MistralConfig:
    """A ``MistralConfig`` of the given shape: the one builder behind every Mistral-shaped model in the course.

    The six shape values come from ``shape`` (e.g. :data:`MISTRAL_7B_SHAPE`, which has all but the vocabulary),
    from the keywords, or both (keywords win). Every other setting is ``MistralConfig``'s default unless given in
    ``overrides`` (``max_position_embeddings=512, sliding_window=None, bos_token_id=None, ...``), so a call with
    the same arguments as ``MistralConfig(...)`` gives the same config. Misspelt settings raise ``ValueError``;
    for Mistral-7B's own values use :func:`openhermes_config` or pass ``**OPENHERMES_2_5_CONFIG``.
    """
    explicit = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
    }
    return _build(MistralConfig, "mistral_config", shape, explicit, overrides)


def qwen2_config(
    shape: Mapping[str, Any] | None = None,
    /,
    *,
    vocab_size: int | None = None,
    hidden_size: int | None = None,
    intermediate_size: int | None = None,
    num_hidden_layers: int | None = None,
    num_attention_heads: int | None = None,
    num_key_value_heads: int | None = None,
    **overrides: Any,
) -> Qwen2Config:
    """A ``Qwen2Config`` of the given shape, built and checked like :func:`mistral_config`."""
    explicit = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
    }
    return _build(Qwen2Config, "qwen2_config", shape, explicit, overrides)


def openhermes_config(**overrides: Any) -> MistralConfig:
    """OpenHermes-2.5-Mistral-7B's real config (vocabulary 32,002, Mistral-7B's shape), optionally changed."""
    return mistral_config(OPENHERMES_2_5_CONFIG, **overrides)


def qwen2_5_0_5b_config(**overrides: Any) -> Qwen2Config:
    """Qwen2.5-0.5B-Instruct's real config (tied embeddings, 14 query / 2 key-value heads), optionally changed."""
    return qwen2_config(QWEN2_5_0_5B_CONFIG, **overrides)


def meta_model(config: PreTrainedConfig) -> torch.nn.Module:
    """The causal LM of ``config`` on PyTorch's meta device: every module and shape, no weights, no memory."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def parameter_count(config: PreTrainedConfig) -> int:
    """The number of parameters of the model ``config`` describes (tied weights counted once), without memory."""
    return sum(p.numel() for p in meta_model(config).parameters())
