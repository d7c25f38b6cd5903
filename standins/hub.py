"""The GPU profiles' hub models as published: their config.json, generation_config.json and tokenizer conventions,
transcribed so that the stand-ins (standins.build) follow them. Where each value was confirmed, and what could not be,
is listed in docs/standins.md."""

from __future__ import annotations

from typing import Any

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

