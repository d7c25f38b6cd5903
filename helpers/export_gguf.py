"""Exporting the merged model to GGUF (the llama.cpp / Ollama / LM Studio format) with the ``gguf`` package only.

Two families of Hugging Face models are written, the way llama.cpp's ``convert_hf_to_gguf.py`` writes them:

- **Mistral and Llama** (the ``tiny`` model; OpenHermes-2.5's weights) as llama.cpp's ``llama`` architecture
  (the converter's ``LlamaModel``): the rows of ``q_proj`` and ``k_proj`` are permuted (:func:`permute_qk`),
  because Hugging Face applies rotary embeddings to the two *halves* of each head and llama.cpp's ``llama`` (its
  "normal" RoPE) to *adjacent pairs*.
- **Qwen2** (the ``t4`` model, Qwen2.5-0.5B-Instruct) as llama.cpp's ``qwen2`` architecture (the converter's
  ``Qwen2Model``): llama.cpp runs ``qwen2`` with its "NeoX" RoPE, which rotates the halves exactly as Hugging Face
  does, so nothing is permuted; the q/k/v biases are written as ``blk.N.attn_{q,k,v}.bias`` (llama.cpp's ``qwen2``
  requires them), and a tied head is not written at all: without ``output.weight`` llama.cpp uses
  ``token_embd.weight`` as the output matrix.

Both get llama.cpp's tensor names (``model.layers.0.self_attn.q_proj.weight`` -> ``blk.0.attn_q.weight``, from the
``gguf`` package's own map), the hyper-parameters, the byte-level BPE vocabulary (tokens, token types, merges,
special ids, the pre-tokenizer's name) and the chat template as metadata, so the file alone is enough to chat
with the model. Anything else - another architecture, rope scaling, a SentencePiece-style vocabulary such as
OpenHermes-2.5's - is refused with a message naming what was found and the converter command to use instead.

The export streams: tensor shapes are read from the safetensors headers first (the GGUF header must list every
tensor's name, shape, type and offset before any data), then each tensor is loaded, converted, written and freed
in turn. At most one tensor (and its converted copy) is in memory: for Mistral-7B the largest, the 32,000 x 4,096
embedding, is 0.5 GB in fp32, not the model's 14.5 GB; for Qwen2.5-0.5B the 151,936 x 896 embedding, 0.54 GB.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import (
    GGML_QUANT_VERSION,
    MODEL_ARCH,
    GGMLQuantizationType,
    GGUFReader,
    GGUFWriter,
    LlamaFileType,
    TokenType,
    get_tensor_name_map,
    quant_shape_to_byte_shape,
    quants,
)
from matplotlib.figure import Figure
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedConfig
from transformers.utils import logging as hf_logging

from helpers.architectures import meta_model
from helpers.merging import MERGED_DIRNAME, merge_run
from helpers.paths import run_dir
from helpers.plots import save_figure
from helpers.training import train_dpo

GGUF_DTYPES = ("f32", "f16", "q8_0")
ARCHITECTURE = "llama"  # llama.cpp's architecture for the llama-shaped models (Mistral, Llama)
LLAMA_SHAPED = ("mistral", "llama")  # Hugging Face model types that llama.cpp runs as `llama`
Q8_0_BLOCK = 32  # q8_0 stores blocks of 32 weights: 32 int8 + one fp16 scale = 34 bytes
# Qwen2's pre-tokenizer split, as its tokenizer.json states it; llama.cpp's `qwen2` pre-tokenizer (llama-vocab.cpp,
# LLAMA_VOCAB_PRE_TYPE_QWEN2) quotes this "original regex from tokenizer.json" and implements it.
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CONVERTER_COMMAND = (
    "git clone --depth 1 https://github.com/ggml-org/llama.cpp && "
    "pip install -r llama.cpp/requirements/requirements-convert_hf_to_gguf.txt && "
    "python llama.cpp/convert_hf_to_gguf.py {merged} --outtype q8_0 --outfile {out}"
)


def converter_command(merged_dir: str | Path = "MERGED_DIR", out: str | Path = "model-q8_0.gguf") -> str:
    """The shell command that converts ``merged_dir`` with llama.cpp's own converter (for what this one refuses)."""
    return CONVERTER_COMMAND.format(merged=merged_dir, out=out)


@dataclass(frozen=True)
class Architecture:
    """How one family of Hugging Face models is written: llama.cpp's architecture and what differs from the rest."""

    name: str  # general.architecture, the prefix of the hyper-parameter keys ("llama.block_count")
    model_arch: MODEL_ARCH  # the gguf package's id: its tensor-name map
    permute_qk: bool  # llama.cpp's "normal" RoPE (adjacent pairs): q/k rows reordered; "NeoX" RoPE (halves): not
    qkv_bias: bool  # blk.N.attn_{q,k,v}.bias are written (and required)
    tokenizer_pre: str  # tokenizer.ggml.pre: which pre-tokenizer llama.cpp applies before the BPE merges


LLAMA = Architecture("llama", MODEL_ARCH.LLAMA, permute_qk=True, qkv_bias=False, tokenizer_pre="gpt-2")
QWEN2 = Architecture("qwen2", MODEL_ARCH.QWEN2, permute_qk=False, qkv_bias=True, tokenizer_pre="qwen2")
ARCHITECTURES = {"mistral": LLAMA, "llama": LLAMA, "qwen2": QWEN2}  # Hugging Face model_type -> how it is written


def gguf_architecture(config: dict[str, Any]) -> Architecture:
    """The llama.cpp architecture a model of this ``config.json`` is written as (see :data:`ARCHITECTURES`)."""
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"model_type {model_type!r} is not one this exporter writes (mistral and llama as llama.cpp's 'llama', "
            f"qwen2 as 'qwen2'); use llama.cpp's convert_hf_to_gguf.py, which knows every architecture: "
            f"{converter_command()}"
        )
    return ARCHITECTURES[model_type]


def permute_qk(weights: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` of a q/k projection ([n_head * head_dim, hidden] -> same shape).

    Hugging Face's rotary embedding rotates dimension ``i`` of a head with dimension ``i + head_dim/2``
    (``rotate_half``); llama.cpp's ``llama`` rotates ``2i`` with ``2i + 1``. Inside each head the rows are reordered
    from ``[x0..x(d/2-1), y0..y(d/2-1)]`` to ``[x0, y0, x1, y1, ...]``. ``k_proj`` has ``n_head_kv`` heads
    under grouped-query attention. Only the ``llama`` architecture needs it (:attr:`Architecture.permute_qk`).
    """
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    head_half = weights.shape[0] // n_head // 2
    return weights.reshape(n_head, 2, head_half, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def unpermute_qk(weights: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """The inverse of :func:`permute_qk` (what a GGUF loader does to get Hugging Face's layout back)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    head_half = weights.shape[0] // n_head // 2
    return weights.reshape(n_head, head_half, 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


# --- reading the merged folder without loading the model --------------------------------------------------


def read_config(merged_dir: str | Path) -> dict[str, Any]:
    """``config.json`` of a saved model, refused unless this exporter can write it (see :data:`ARCHITECTURES`).

    Refused: other model types, rope scaling (llama.cpp needs extra keys for it), biases in a llama-shaped model
    (llama.cpp's ``llama`` has none) and Qwen2's sliding-window attention (llama.cpp's ``qwen2`` has none).
    """
    path = Path(merged_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{merged_dir} holds no config.json: not a saved model (run notebooks 04 and 05)")
    config = json.loads(path.read_text())
    try:
        architecture = gguf_architecture(config)
    except ValueError as error:
        raise ValueError(f"{merged_dir}: {error}") from None
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(
            f"{merged_dir}: rope scaling {rope!r} is not handled by this exporter; use {converter_command()}"
        )
    if architecture is LLAMA and (config.get("attention_bias") or config.get("mlp_bias")):
        raise ValueError(f"{merged_dir}: biases in attention or MLP are not handled by this exporter")
    if architecture is QWEN2 and config.get("use_sliding_window"):
        raise ValueError(
            f"{merged_dir}: Qwen2 with use_sliding_window=true: llama.cpp's qwen2 attends to the whole context, so "
            "the file would not compute what the model does"
        )
    return config


def rope_theta(config: dict[str, Any]) -> float:
    """The rotary base frequency, from ``rope_parameters`` (transformers 5) or ``rope_theta`` (older configs)."""
    rope = config.get("rope_parameters") or {}
    return float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))


def head_dim(config: dict[str, Any]) -> int:
    """Width of one attention head (``head_dim``, else hidden size / heads)."""
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def safetensors_files(merged_dir: str | Path) -> dict[str, Path]:
    """Each tensor name of a saved model and the safetensors file holding it (one file, or an index of shards)."""
    merged_dir = Path(merged_dir)
    index = merged_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: merged_dir / file for name, file in weight_map.items()}
    single = merged_dir / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"{merged_dir} holds no model.safetensors (nor an index of shards)")
    with safe_open(single, framework="pt") as f:
        return {name: single for name in f.keys()}


def read_tensor(merged_dir: str | Path, name: str) -> np.ndarray:
    """One tensor of a saved model as float32 numpy, read alone from whichever safetensors file holds it."""
    with safe_open(safetensors_files(merged_dir)[name], framework="pt") as f:
        return f.get_tensor(name).to(torch.float32).numpy()


@dataclass(frozen=True)
class TensorPlan:
    """One tensor of the export: where it comes from, its GGUF name, shape (rows, columns), type and size."""

    hf_name: str
    gguf_name: str
    shape: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType
    nbytes: int
    file: Path


def gguf_tensor_type(shape: Sequence[int], dtype: str):
    """The GGML type of one tensor, as llama.cpp chooses it: 1-D tensors (norms, biases) stay f32 in every file;
    2-D weights take the requested type, and q8_0 falls back to f16 when a row is not a multiple of 32."""
    if dtype not in GGUF_DTYPES:
        raise ValueError(f"dtype must be one of {GGUF_DTYPES}, not {dtype!r}")
    if len(shape) == 1 or dtype == "f32":
        return GGMLQuantizationType.F32
    if dtype == "q8_0" and shape[-1] % Q8_0_BLOCK == 0:
        return GGMLQuantizationType.Q8_0
    return GGMLQuantizationType.F16


def tensor_nbytes(shape: Sequence[int], qtype) -> int:
    """Bytes a tensor of ``shape`` takes in GGML type ``qtype`` (q8_0: 34 bytes per 32 weights)."""
    return int(np.prod(quant_shape_to_byte_shape(tuple(shape), qtype)))


def tensor_plan(merged_dir: str | Path, dtype: str) -> list[TensorPlan]:
    """What the export writes, tensor by tensor, from the safetensors headers alone (no weight is loaded).

    A tied head (``tie_word_embeddings``) is left out even if the folder holds ``lm_head.weight``: the model uses the
    embedding matrix as its head, and llama.cpp does the same when ``output.weight`` is absent. For ``qwen2`` every
    layer's q/k/v biases must be there: llama.cpp refuses a qwen2 file without them.
    """
    config = read_config(merged_dir)
    architecture = gguf_architecture(config)
    name_map = get_tensor_name_map(architecture.model_arch, config["num_hidden_layers"])
    tied = bool(config.get("tie_word_embeddings"))
    plan = []
    files = safetensors_files(merged_dir)
    for hf_name in sorted(files, key=_tensor_order):
        if tied and hf_name == "lm_head.weight":
            continue
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"{merged_dir}: no llama.cpp name for tensor {hf_name!r}")
        with safe_open(files[hf_name], framework="pt") as f:
            shape = tuple(f.get_slice(hf_name).get_shape())
        qtype = gguf_tensor_type(shape, dtype)
        plan.append(TensorPlan(hf_name, gguf_name, shape, qtype, tensor_nbytes(shape, qtype), files[hf_name]))
    if architecture.qkv_bias:
        written = {t.gguf_name for t in plan}
        missing = [
            f"blk.{layer}.attn_{kind}.bias"
            for layer in range(config["num_hidden_layers"])
            for kind in "qkv"
            if f"blk.{layer}.attn_{kind}.bias" not in written
        ]
        if missing:
            raise ValueError(
                f"{merged_dir}: llama.cpp's {architecture.name} needs the q/k/v biases of every layer; "
                f"{len(missing)} are missing, e.g. {missing[0]}"
            )
    return plan


def _tensor_order(name: str) -> tuple[int, int, str]:
    """Embeddings first, then the layers in numeric order, then the final norm and the head (llama.cpp's order)."""
    parts = name.split(".")
    if "layers" in parts:
        return (1, int(parts[parts.index("layers") + 1]), name)
    return (0 if "embed" in name else 2, 0, name)


def planned_tensor_bytes(config: PreTrainedConfig, dtype: str) -> int:
    """Bytes of tensor data in a GGUF of type ``dtype`` for the model ``config`` describes, without any weight.

    The parameter shapes come from the model built on PyTorch's meta device (tied weights counted once, as the file
    stores them once); each takes :func:`gguf_tensor_type`'s type: parameters x bytes per type. The metadata
    (vocabulary, merges, template) and the alignment padding come on top.
    """
    return sum(
        tensor_nbytes(tuple(p.shape), gguf_tensor_type(tuple(p.shape), dtype)) for p in meta_model(config).parameters()
    )


# --- the vocabulary -----------------------------------------------------------------------------------------


@dataclass
class GGUFVocab:
    """The tokenizer as llama.cpp stores it: token strings by id, their types, the BPE merges, special ids."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    special_ids: dict[str, int]  # bos / eos / unk / pad -> id, only those the tokenizer (or config.json) has
    chat_template: str | None
    pre: str = "gpt-2"  # tokenizer.ggml.pre: the pre-tokenizer llama.cpp applies


def looks_special(token: str) -> bool:
    """convert_hf_to_gguf's ``does_token_look_special``: added tokens llama.cpp treats as CONTROL even when the
    tokenizer does not flag them special (``<|fim_prefix|>`` in Qwen2.5: ``<|...|>``, ``<pad>``, ``<unused..>``)."""
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<｜") and token.endswith("｜>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def qwen2_pre_tokenizer(tokenizer) -> str:
    """``"qwen2"`` when the tokenizer splits text exactly as Qwen2's does (llama.cpp's ``qwen2`` pre-tokenizer), else
    a ``ValueError`` saying what it does instead.

    llama.cpp's converter recognises a pre-tokenizer by hashing the token ids of a test text, which only works for
    tokenizers it has seen; here the split itself is compared: the regex :data:`QWEN2_SPLIT_REGEX`, isolated, then
    byte-level mapping without GPT-2's own regex.
    """
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    pre = backend.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    ok = (
        len(steps) == 2
        and steps[0].get("type") == "Split"
        and steps[0].get("pattern", {}).get("Regex") == QWEN2_SPLIT_REGEX
        and steps[0].get("behavior") == "Isolated"
        and steps[1].get("type") == "ByteLevel"
        and steps[1].get("use_regex") is False
    )
    if not ok:
        raise ValueError(
            f"this Qwen2 model's tokenizer does not split text as Qwen2's does (pre-tokenizer {pre!r}); "
            f"llama.cpp would tokenize it differently. Use {converter_command()}"
        )
    return "qwen2"


def gguf_vocab(tokenizer, vocab_size: int, *, config: dict[str, Any] | None = None) -> GGUFVocab:
    """Tokens, token types and merges of a byte-level BPE tokenizer, as llama.cpp's ``_set_vocab_gpt2`` writes them.

    Every added token that is special, or looks special (:func:`looks_special`), is a CONTROL token: llama.cpp
    matches it whole in text and hides it when printing (``<|im_start|>``, ``<|im_end|>``, ``<pad>``). Other added
    tokens (Qwen2.5's ``<tool_call>``) are USER_DEFINED; ids the tokenizer does not use up to the model's
    ``vocab_size`` are padded as UNUSED ``[PAD<id>]``. Special ids come from the tokenizer, and those it lacks from
    ``config.json`` (``config``), in the order of gguf's ``SpecialVocab``: that is where Qwen2.5's bos id (its
    ``<|endoftext|>``) comes from. ``config`` also chooses the architecture, hence ``tokenizer.ggml.pre``
    ("gpt-2" for llama-shaped models, "qwen2" for Qwen2, checked against the tokenizer's own split).
    """
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend["model"]
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        fallback = " with byte fallback (SentencePiece-like)" if model.get("byte_fallback") else ""
        kind = f"{model.get('type')!r}{fallback}"
        raise ValueError(
            "only byte-level BPE tokenizers (GPT-2 style, llama.cpp's 'gpt2' model) are handled here; "
            f"this one is {kind}, which llama.cpp stores as its 'llama' tokenizer model (scores, <0xNN> byte tokens). "
            f"Use llama.cpp's convert_hf_to_gguf.py for it: {converter_command()}"
        )
    architecture = gguf_architecture(config) if config is not None else LLAMA
    pre = qwen2_pre_tokenizer(tokenizer) if architecture is QWEN2 else architecture.tokenizer_pre
    vocab = tokenizer.get_vocab()
    if len(vocab) > vocab_size:
        raise ValueError(f"the tokenizer has {len(vocab)} tokens but the model only {vocab_size} embeddings")
    by_id = {index: token for token, index in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(TokenType.UNUSED)
        elif index in added:
            tokens.append(by_id[index])
            control = added[index].special or looks_special(by_id[index])
            types.append(TokenType.CONTROL if control else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[index])
            types.append(TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    special = {}
    for name in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if token_id is None and config is not None:
            from_config = config.get(f"{name}_token_id")
            token_id = from_config if isinstance(from_config, int) and 0 <= from_config < vocab_size else None
        if token_id is not None:
            special[name] = token_id
    return GGUFVocab(tokens, [int(t) for t in types], merges, special, tokenizer.chat_template, pre)


def check_exportable(merged_dir: str | Path) -> Architecture:
    """Everything :func:`export_gguf` refuses, checked up front without loading a weight; returns the architecture.

    Raises ``FileNotFoundError`` (no saved model) or ``ValueError`` naming the model type, tensor or tokenizer that
    cannot be written, and the llama.cpp converter command that handles it.
    """
    config = read_config(merged_dir)
    tensor_plan(merged_dir, "f32")
    gguf_vocab(AutoTokenizer.from_pretrained(merged_dir), config["vocab_size"], config=config)
    return gguf_architecture(config)


# --- the export ---------------------------------------------------------------------------------------------


def _file_type(dtype: str):
    return {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "q8_0": LlamaFileType.MOSTLY_Q8_0}[dtype]


def _write_llama_parameters(writer, config: dict[str, Any]) -> None:
    """llama.cpp's llama keys, as the converter's ``LlamaModel`` writes them."""
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config.get("num_key_value_heads") or config["num_attention_heads"])
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))
    writer.add_rope_dimension_count(head_dim(config))
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])


def _write_qwen2_parameters(writer, config: dict[str, Any]) -> None:
    """llama.cpp's qwen2 keys, as the converter's ``Qwen2Model`` writes them (its generic ``TextModel`` keys).

    No ``rope.dimension_count`` and no ``vocab_size``: llama.cpp takes the rotary width from the head width and
    the vocabulary size from the token list. The head width is written only when ``config.json`` states one.
    """
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config.get("num_key_value_heads") or config["num_attention_heads"])
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    if config.get("head_dim"):
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])


def _write_metadata(writer, config: dict[str, Any], vocab: GGUFVocab, dtype: str, name: str) -> None:
    """The architecture's hyper-parameters, the file type and the tokenizer."""
    writer.add_name(name)
    writer.add_file_type(_file_type(dtype))
    writer.add_quantization_version(GGML_QUANT_VERSION)
    if gguf_architecture(config) is QWEN2:
        _write_qwen2_parameters(writer, config)
    else:
        _write_llama_parameters(writer, config)
    # the tokenizer: byte-level BPE ("gpt2") with the pre-tokenizer split llama.cpp must apply before the merges
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    setters = {
        "bos": writer.add_bos_token_id,
        "eos": writer.add_eos_token_id,
        "unk": writer.add_unk_token_id,
        "pad": writer.add_pad_token_id,
    }
    for key, token_id in vocab.special_ids.items():
        setters[key](token_id)
    writer.add_add_bos_token(False)  # ChatML prompts carry no BOS; the template writes every control token
    writer.add_add_eos_token(False)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


def _convert(weights: np.ndarray, qtype) -> np.ndarray:
    """One float32 tensor in the GGML type of the file (q8_0 through gguf's own reference quantiser)."""
    if qtype == GGMLQuantizationType.F32:
        return np.ascontiguousarray(weights, dtype=np.float32)
    if qtype == GGMLQuantizationType.F16:
        return np.ascontiguousarray(weights.astype(np.float16))
    return quants.quantize(np.ascontiguousarray(weights, dtype=np.float32), qtype)


def export_gguf(merged_dir: str | Path, out_path: str | Path, dtype: str = "f16", *, name: str | None = None) -> Path:
    """Write the merged model in ``merged_dir`` as one GGUF file of type ``dtype`` ("f32", "f16" or "q8_0").

    Mistral and Llama become llama.cpp's ``llama`` (q/k permuted), Qwen2 its ``qwen2`` (see the module docstring);
    anything else is refused before a byte is written. Streams tensor by tensor, writes to a temporary name beside
    ``out_path`` and renames it at the end, so an interrupted export never leaves a truncated file under the final
    name. Returns ``out_path``.
    """
    merged_dir, out_path = Path(merged_dir), Path(out_path)
    config = read_config(merged_dir)
    architecture = gguf_architecture(config)
    plan = tensor_plan(merged_dir, dtype)
    vocab = gguf_vocab(AutoTokenizer.from_pretrained(merged_dir), config["vocab_size"], config=config)
    n_head, n_head_kv = config["num_attention_heads"], config.get("num_key_value_heads")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    writer = GGUFWriter(tmp, architecture.name)
    try:
        _write_metadata(writer, config, vocab, dtype, name or merged_dir.parent.name or merged_dir.name)
        # 1. the header lists every tensor (name, shape, type, offset) before any data: from the plan alone
        for t in plan:
            if t.qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
                float_type = np.float32 if t.qtype == GGMLQuantizationType.F32 else np.float16
                writer.add_tensor_info(t.gguf_name, t.shape, np.dtype(float_type), t.nbytes)
            else:
                byte_shape = quant_shape_to_byte_shape(t.shape, t.qtype)
                writer.add_tensor_info(t.gguf_name, byte_shape, np.dtype(np.uint8), t.nbytes, raw_dtype=t.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        # 2. then the data, one tensor at a time, in the same order
        for t in plan:
            with safe_open(t.file, framework="pt") as f:
                weights = f.get_tensor(t.hf_name).to(torch.float32).numpy()
            if architecture.permute_qk and t.gguf_name.endswith("attn_q.weight"):
                weights = permute_qk(weights, n_head, n_head)
            elif architecture.permute_qk and t.gguf_name.endswith("attn_k.weight"):
                weights = permute_qk(weights, n_head, n_head_kv)
            data = _convert(weights, t.qtype)
            if data.nbytes != t.nbytes:
                raise RuntimeError(f"{t.gguf_name}: {data.nbytes} bytes converted, {t.nbytes} announced in the header")
            writer.write_tensor_data(data)
            del weights, data
        writer.close()
        tmp.replace(out_path)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    return out_path


# --- reading it back ------------------------------------------------------------------------------------------


def gguf_metadata(path: str | Path, keys: Sequence[str] | None = None) -> dict[str, Any]:
    """Metadata of a GGUF file as plain python values (read with ``gguf.GGUFReader``); all keys, or only ``keys``."""
    reader = GGUFReader(path)
    wanted = reader.fields if keys is None else {k: reader.fields[k] for k in keys if k in reader.fields}
    return {key: field.contents() for key, field in wanted.items() if not key.startswith("GGUF.")}


def gguf_tensor_types(path: str | Path) -> dict[str, str]:
    """The GGML type name of every tensor in a GGUF file, e.g. ``{"blk.0.attn_q.weight": "Q8_0"}``."""
    return {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}


def special_token_types(path: str | Path, tokenizer) -> dict[str, str]:
    """The token type the GGUF file gives each added special token of ``tokenizer`` (all should be CONTROL)."""
    meta = gguf_metadata(path, ["tokenizer.ggml.tokens", "tokenizer.ggml.token_type"])
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    found = {}
    for index, token in tokenizer.added_tokens_decoder.items():
        if token.special:
            found[token.content] = TokenType(types[index]).name if tokens[index] == token.content else "MISSING"
    return found


def load_gguf_model(path: str | Path, dtype: torch.dtype = torch.float32):
    """The model transformers rebuilds from a GGUF file (eval mode, weights dequantised to ``dtype``), no tokenizer.

    ``AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)`` reads the hyper-parameters into a config,
    dequantises every tensor with ``gguf`` and, for the ``llama`` architecture, un-permutes q/k (``qwen2`` tensors
    are used as they are). Its per-tensor progress bar (text on stderr) is kept out of the output.
    """
    path = Path(path)
    with contextlib.redirect_stderr(io.StringIO()):  # "Converting and de-quantizing GGUF tensors..." bar
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    model.eval()
    return model


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32):
    """The model (:func:`load_gguf_model`) and the tokenizer transformers rebuilds from a GGUF file's metadata."""
    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return load_gguf_model(path, dtype), tokenizer


def load_reference(merged_dir: str | Path):
    """The merged model (fp32, CPU, eval mode) and its tokenizer from safetensors: what every GGUF is compared with.

    Always fp32 on the CPU, whatever the machine, so that an f32 GGUF can be checked for bit-identical logits.
    """
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Loading weights": one line per load in a notebook
    try:
        model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32, use_safetensors=True)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
    model.eval()
    return model, AutoTokenizer.from_pretrained(merged_dir)


@torch.no_grad()
def rounded_copy(model, dtype: str):
    """A copy of ``model`` whose weights are rounded exactly as a GGUF file of type ``dtype`` stores them.

    Each tensor goes through :func:`gguf_tensor_type` and gguf's own quantise/dequantise; q/k permutation only
    reorders rows and both f16 and q8_0 round row by row, so the permutation does not change the rounding. A tied
    embedding is one parameter, rounded once, as the file stores it once. Logits of this copy equal those of the
    model reloaded from the GGUF file bit for bit when the file holds exactly these weights and the loader computes
    exactly as the original class does.
    """
    rounded = copy.deepcopy(model)
    for parameter in rounded.parameters():
        weights = parameter.detach().to(torch.float32).cpu().numpy()
        qtype = gguf_tensor_type(weights.shape, dtype)
        restored = quants.dequantize(_convert(weights, qtype), qtype).reshape(weights.shape)
        parameter.copy_(torch.from_numpy(np.ascontiguousarray(restored)).to(parameter.dtype))
    return rounded


def find_or_build_merged(profile, run_id: str, *, build_if_missing: bool, steps: int = 5) -> Path:
    """The run folder whose ``merged/`` the export reads: ``<profile>-<run_id>`` when notebooks 04 and 05 made it.

    When it is missing: with ``build_if_missing`` a short run (``steps`` DPO steps, merged) is trained through
    :func:`helpers.training.train_dpo` and :func:`helpers.merging.merge_run` into ``<profile>-<run_id>-short`` - a
    folder of its own, so a later run of notebooks 04-05 is never mixed with it - and that folder is returned; without
    it, a ``FileNotFoundError`` says what to run.
    """
    folder = run_dir(profile.name, run_id)
    if (folder / MERGED_DIRNAME / "config.json").exists():
        return folder
    if not build_if_missing:
        raise FileNotFoundError(
            f"{folder / MERGED_DIRNAME} does not exist: run notebook 04 (training) and 05 (merging) with "
            f"RUN_ID={run_id!r} first, or set BUILD_IF_MISSING = True to train a short run here"
        )
    short = run_dir(profile.name, f"{run_id}-short")
    if not (short / MERGED_DIRNAME / "config.json").exists():
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # trainer logs
            train_dpo(profile, short, progress=False, max_steps=steps)
            merge_run(profile, short, overwrite=True)
    return short


def token_id_table(reference, other, texts: Sequence[str]) -> list[tuple[str, int, bool]]:
    """Rows ``(text, number of tokens, same ids?)``: each text tokenised by both tokenizers, without extras."""
    rows = []
    for text in texts:
        a = reference(text, add_special_tokens=False)["input_ids"]
        b = other(text, add_special_tokens=False)["input_ids"]
        rows.append((text, len(a), a == b))
    return rows


@torch.no_grad()
def prompt_logits(model, tokenizer, prompts: Sequence[str]) -> list[torch.Tensor]:
    """The logits ([tokens, vocab], float32) of each prompt on its own, without padding (tokenised without extras)."""
    model.eval()
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        out.append(model(input_ids=ids).logits[0].float())
    return out


def folder_size(folder: str | Path, pattern: str = "*.safetensors") -> int:
    """Bytes of the files matching ``pattern`` in ``folder`` (the weights of a saved model)."""
    return sum(p.stat().st_size for p in Path(folder).glob(pattern))


def plot_file_sizes(sizes: dict[str, int], path: str | Path | None = None):
    """A bar chart of file sizes in MB (e.g. safetensors folder vs each GGUF type), saved as PNG when ``path``."""
    fig = Figure(figsize=(6, 3))
    ax = fig.subplots()
    names, megabytes = list(sizes), [v / 1e6 for v in sizes.values()]
    bars = ax.bar(names, megabytes, color=["#8c8c8c"] + ["#4c72b0"] * (len(names) - 1))
    for bar, value in zip(bars, megabytes):
        ax.annotate(f"{value:.2f}", (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("MB")
    ax.set_title("Model files: safetensors folder vs GGUF")
    ax.margins(y=0.15)
    fig.tight_layout()
    save_figure(fig, path)
    return fig
