"""Exporting the merged model to GGUF, the one file llama.cpp, Ollama and LM Studio load (notebook 09), with the
``gguf`` package alone, as llama.cpp's ``convert_hf_to_gguf.py`` writes it: Mistral/Llama as llama.cpp's ``llama``
architecture (q/k rows permuted), Qwen2 as ``qwen2``; a byte-level BPE vocabulary as its ``gpt2`` tokenizer model, a
sentencepiece-style one (byte fallback, OpenHermes-2.5's) as its ``llama`` model. The export streams one tensor at a
time. Tensor layouts, token types and where this differs from the converter: docs/gguf_internals.md.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType, TokenType
from safetensors import safe_open
from tokenizers import pre_tokenizers
from transformers import AutoTokenizer
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_SPLIT

from helpers.data import prepare_data
from helpers.merging import merge_run
from helpers.models import load_tokenizer
from helpers.profiles import Profile
from helpers.runs import display_path, run_dir
from helpers.training import train_dpo

GGUF_DTYPES = ("f32", "f16", "q8_0")
Q8_0_BLOCK = 32  # q8_0 stores blocks of 32 weights: one fp16 scale and 32 int8 values, 34 bytes
ARCHITECTURES = {"mistral": "llama", "llama": "llama", "qwen2": "qwen2"}  # Hugging Face model_type -> llama.cpp's
CONVERTER = "python llama.cpp/convert_hf_to_gguf.py MERGED_DIR --outtype q8_0 --outfile model-q8_0.gguf"


def permute_qk(weights: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` of a q or k projection ([heads * head_dim, hidden], same shape back).

    Inside each head the rows go from Hugging Face's halves ``[x0..x(d/2-1), y0..y(d/2-1)]`` to llama.cpp's adjacent
    pairs ``[x0, y0, x1, y1, ...]``: its ``llama`` rotary embedding rotates ``2i`` with ``2i+1``, Hugging Face ``i``
    with ``i + d/2``. A k projection has ``n_head_kv`` heads (grouped-query attention).
    """
    heads = n_head_kv if n_head_kv is not None and n_head_kv != n_head else n_head
    halves = weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
    return halves.swapaxes(1, 2).reshape(weights.shape)


def read_config(merged_dir: str | Path) -> dict[str, Any]:
    """``config.json`` of a saved model, refused (``ValueError`` naming what was found) unless it can be written:
    a model type of :data:`ARCHITECTURES`, no rope scaling, no biases in a ``llama``, no sliding window in a Qwen2
    (llama.cpp's ``qwen2`` attends to the whole context)."""
    path = Path(merged_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{display_path(merged_dir)} holds no config.json: run notebooks 04 and 05 first")
    config = json.loads(path.read_text())
    architecture, rope = ARCHITECTURES.get(config.get("model_type")), config.get("rope_parameters") or {}
    problem = None
    if architecture is None:
        problem = f"model_type {config.get('model_type')!r} (this exporter writes {', '.join(ARCHITECTURES)})"
    elif rope.get("rope_type", "default") != "default" or config.get("rope_scaling"):
        problem = f"rope scaling {rope or config['rope_scaling']}"
    elif architecture == "llama" and (config.get("attention_bias") or config.get("mlp_bias")):
        problem = "biases in attention or MLP"
    elif architecture == "qwen2" and config.get("use_sliding_window"):
        problem = "Qwen2 with use_sliding_window"
    if problem:
        raise ValueError(f"{display_path(merged_dir)}: {problem} is not handled here; llama.cpp's converter "
                         f"knows every model it runs: {CONVERTER}")
    return config


def safetensors_files(merged_dir: str | Path) -> dict[str, Path]:
    """Each tensor of a saved model and the safetensors file that holds it (one file, or an index of shards)."""
    merged_dir = Path(merged_dir)
    index = merged_dir / "model.safetensors.index.json"
    if index.is_file():
        return {name: merged_dir / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    with safe_open(merged_dir / "model.safetensors", framework="pt") as f:
        return {name: merged_dir / "model.safetensors" for name in f.keys()}


def read_tensor(merged_dir: str | Path, name: str) -> np.ndarray:
    """One tensor of a saved model as float32 numpy, read alone from the file that holds it."""
    with safe_open(safetensors_files(merged_dir)[name], framework="pt") as f:
        return f.get_tensor(name).to(torch.float32).numpy()


@dataclass(frozen=True)
class TensorPlan:
    """One tensor of the export: where it comes from, its GGUF name, shape, GGML type and bytes in the file."""

    hf_name: str
    gguf_name: str
    shape: tuple[int, ...]
    qtype: GGMLQuantizationType
    nbytes: int
    file: Path


def gguf_tensor_type(shape: tuple[int, ...], dtype: str) -> GGMLQuantizationType:
    """The GGML type of one tensor as llama.cpp chooses it: 1-D tensors (norms, biases) f32 in every file; 2-D
    weights the file's type, q8_0 falling back to f16 where a row is not a multiple of 32."""
    if dtype not in GGUF_DTYPES:
        raise ValueError(f"dtype must be one of {GGUF_DTYPES}, not {dtype!r}")
    if len(shape) == 1 or dtype == "f32":
        return GGMLQuantizationType.F32
    if dtype == "q8_0" and shape[-1] % Q8_0_BLOCK == 0:
        return GGMLQuantizationType.Q8_0
    return GGMLQuantizationType.F16


def tensor_plan(merged_dir: str | Path, dtype: str) -> list[TensorPlan]:
    """What the export writes, tensor by tensor, from the safetensors headers alone (no weight loaded): embedding,
    blocks in order, final norm, head. A tied head is left out (llama.cpp then uses the embedding as the head); a
    ``qwen2`` file must have every layer's q/k/v biases."""
    config = read_config(merged_dir)
    architecture, layers = ARCHITECTURES[config["model_type"]], config["num_hidden_layers"]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[architecture.upper()], layers)
    files = safetensors_files(merged_dir)
    plan = []
    order = {name: (2 * (name.split(".")[1] in ("norm", "weight")) + name.startswith("lm_head"), -1, name)
             if ".layers." not in name else (1, int(name.split(".")[2]), name) for name in files}
    for hf_name in sorted(files, key=order.get):  # embedding, blocks in order, final norm, head
        if hf_name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"{display_path(merged_dir)}: no llama.cpp name for the tensor {hf_name!r}")
        with safe_open(files[hf_name], framework="pt") as f:
            shape = tuple(f.get_slice(hf_name).get_shape())
        qtype = gguf_tensor_type(shape, dtype)
        nbytes = int(np.prod(gguf.quant_shape_to_byte_shape(shape, qtype)))
        plan.append(TensorPlan(hf_name, gguf_name, shape, qtype, nbytes, files[hf_name]))
    written = {t.gguf_name for t in plan}
    missing = [f"blk.{i}.attn_{kind}.bias" for i in range(layers) for kind in "qkv"
               if architecture == "qwen2" and f"blk.{i}.attn_{kind}.bias" not in written]
    if missing:
        raise ValueError(f"{display_path(merged_dir)}: llama.cpp's qwen2 needs the q/k/v biases of every layer; "
                         f"{len(missing)} are missing, e.g. {missing[0]}")
    return plan


@dataclass
class GGUFVocab:
    """The tokenizer as llama.cpp stores it: its tokenizer model, token strings by id, their types, and the merges
    (``gpt2``) or scores (``llama``) that say in which order pieces join; ids, flags and template in ``special``."""

    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (sentencepiece-style BPE)
    pre: str  # tokenizer.ggml.pre: the split llama.cpp applies before merging ("gpt-2", "qwen2", "default")
    tokens: list[str]
    token_types: list[int]  # gguf.TokenType values
    merges: list[str]  # gpt2 only
    scores: list[float]  # llama only: the higher score joins first
    special: gguf.SpecialVocab  # bos/eos/unk/pad ids, add_bos/add_eos, chat template, read by gguf from the folder


def looks_special(token: str) -> bool:
    """The converter's ``does_token_look_special``: an added token it makes CONTROL even when not flagged special."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token[:2], token[-2:]) in (("<|", "|>"),
            ("<｜", "｜>")) or (token.startswith("<unused") and token.endswith(">")))


def merge_scores(tokenizer, tokens: list[str]) -> list[float]:
    """A score per token that keeps the BPE merge order: minus the rank of the first merge that makes the token;
    tokens no merge makes (characters, bytes, special and added tokens) score below every merge.

    llama.cpp's ``llama`` tokenizer joins the adjacent pair whose joined token scores highest; gguf's
    ``LlamaHfVocab`` writes -1000.0 for every token, which loses the order.
    """
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    rank: dict[str, int] = {}
    for index, merge in enumerate(merges):
        rank.setdefault("".join(merge.split(" ") if isinstance(merge, str) else merge), index)
    return [float(-rank.get(token, len(merges))) for token in tokens]


def gguf_vocab(merged_dir: str | Path) -> GGUFVocab:
    """The tokenizer of a saved model as the converter's ``_set_vocab_gpt2`` or ``_set_vocab_llama_hf`` writes it,
    special ids, add-BOS flag and chat template from gguf's ``SpecialVocab``.

    Byte-level BPE -> ``gpt2``: added tokens that are special or look special CONTROL, other added ones
    USER_DEFINED, unused embedding rows UNUSED ``[PAD<id>]``, the merges; Qwen2's split checked against
    transformers' own. BPE with byte fallback -> ``llama``: gguf's ``LlamaHfVocab`` gives tokens and types (special
    ids CONTROL, ``<0xXX>`` BYTE, added non-special USER_DEFINED), :func:`merge_scores` the scores. Else ValueError.
    """
    merged_dir = Path(merged_dir)
    config = read_config(merged_dir)
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    kind = (backend["model"]["type"], bool(backend["model"].get("byte_fallback")))
    logging.getLogger("gguf.vocab").setLevel(logging.ERROR)  # SpecialVocab warns on templates it half-parses
    special = gguf.SpecialVocab(merged_dir, load_merges=kind == ("BPE", False), n_vocab=config["vocab_size"])
    for flag in ("bos", "eos"):  # a tokenizer that says nothing adds nothing: a ChatML template writes every token
        special.add_special_token.setdefault(flag, False)
    if kind == ("BPE", True):
        listed = list(gguf.LlamaHfVocab(merged_dir).all_tokens())
        tokens, types = [text.decode("utf-8") for text, _, _ in listed], [int(type_) for _, _, type_ in listed]
        if tokens != tokenizer.convert_ids_to_tokens(list(range(len(tokens)))) or len(tokens) != config["vocab_size"]:
            raise ValueError(f"{len(tokens)} tokens that are not ids 0..{config['vocab_size'] - 1} of the model's "
                             f"embeddings; use llama.cpp's converter: {CONVERTER}")
        return GGUFVocab("llama", "default", tokens, types, [], merge_scores(tokenizer, tokens), special)
    if kind != ("BPE", False):
        raise ValueError(f"a {kind[0]} tokenizer is not handled here; llama.cpp's converter: {CONVERTER}")
    pre = backend.get("pre_tokenizer") or {}
    split = [(s.get("type"), s.get("pattern", {}).get("Regex", s.get("use_regex")), s.get("behavior"))
             for s in pre.get("pretokenizers", [pre])]
    qwen2 = ARCHITECTURES[config["model_type"]] == "qwen2"
    if qwen2 and split != [("Split", QWEN2_SPLIT, "Isolated"), ("ByteLevel", False, None)]:
        raise ValueError(f"this Qwen2 tokenizer does not split text as Qwen2's does ({pre}); llama.cpp would "
                         f"tokenize it differently. Use llama.cpp's converter: {CONVERTER}")
    vocab, added = tokenizer.get_vocab(), tokenizer.added_tokens_decoder
    if len(vocab) > config["vocab_size"]:
        raise ValueError(f"the tokenizer has {len(vocab)} tokens but the model only {config['vocab_size']} rows")
    by_id = {index: token for token, index in vocab.items()}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(config["vocab_size"])]
    types = [int(TokenType.UNUSED if i not in by_id else TokenType.NORMAL if i not in added else TokenType.CONTROL
                 if added[i].special or looks_special(token) else TokenType.USER_DEFINED)
             for i, token in enumerate(tokens)]
    merges, special.merges = special.merges, []  # written beside the tokens, not by SpecialVocab
    return GGUFVocab("gpt2", "qwen2" if qwen2 else "gpt-2", tokens, types, merges, [], special)


def _write_metadata(writer: gguf.GGUFWriter, config: dict[str, Any], vocab: GGUFVocab, dtype: str, name: str) -> None:
    """The hyper-parameters as the converter's ``LlamaModel`` or ``Qwen2Model`` writes them, then the tokenizer."""
    writer.add_name(name)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config.get("num_key_value_heads") or config["num_attention_heads"])
    rope = config.get("rope_parameters") or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    llama = ARCHITECTURES[config["model_type"]] == "llama"
    if llama:  # qwen2: llama.cpp takes the rotary width from the heads, the vocabulary size from the tokens
        writer.add_rope_dimension_count(head_dim)
        writer.add_vocab_size(config["vocab_size"])
    if llama or config.get("head_dim"):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    if vocab.scores:
        writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.token_types)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    vocab.special.add_to_gguf(writer, quiet=True)


def _convert(weights: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """A float32 tensor in the file's GGML type (q8_0 through gguf's own reference quantiser)."""
    if qtype == GGMLQuantizationType.F32:
        return np.ascontiguousarray(weights, dtype=np.float32)
    if qtype == GGMLQuantizationType.F16:
        return np.ascontiguousarray(weights.astype(np.float16))
    return gguf.quants.quantize(np.ascontiguousarray(weights, dtype=np.float32), qtype)


def export_gguf(merged_dir: str | Path, out_path: str | Path, dtype: str = "f16", *, name: str | None = None) -> Path:
    """Write the model saved in ``merged_dir`` as one GGUF file of type ``dtype`` ("f32", "f16" or "q8_0").

    The header lists every tensor before any data: the infos come from :func:`tensor_plan`, then each tensor is
    read, permuted (q/k of a ``llama`` file), converted, written and freed in turn. Written under a temporary name
    and renamed when complete, so an interrupted export leaves no truncated file. Returns ``out_path``.
    """
    merged_dir, out_path = Path(merged_dir), Path(out_path)
    config = read_config(merged_dir)
    plan, vocab = tensor_plan(merged_dir, dtype), gguf_vocab(merged_dir)
    permute = ARCHITECTURES[config["model_type"]] == "llama"
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(tmp, ARCHITECTURES[config["model_type"]])
    try:
        _write_metadata(writer, config, vocab, dtype, name or merged_dir.parent.name)
        for t in plan:
            if t.qtype == GGMLQuantizationType.Q8_0:  # raw bytes: 34 per block of 32 weights
                shape = gguf.quant_shape_to_byte_shape(t.shape, t.qtype)
                writer.add_tensor_info(t.gguf_name, shape, np.dtype(np.uint8), t.nbytes, raw_dtype=t.qtype)
            else:
                float_type = np.float32 if t.qtype == GGMLQuantizationType.F32 else np.float16
                writer.add_tensor_info(t.gguf_name, t.shape, np.dtype(float_type), t.nbytes)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in plan:
            with safe_open(t.file, framework="pt") as f:
                weights = f.get_tensor(t.hf_name).to(torch.float32).numpy()
            if permute and t.gguf_name.endswith(("attn_q.weight", "attn_k.weight")):
                weights = permute_qk(weights, heads, kv_heads if t.gguf_name.endswith("attn_k.weight") else heads)
            data = _convert(weights, t.qtype)
            if data.nbytes != t.nbytes:
                raise RuntimeError(f"{t.gguf_name}: {data.nbytes} bytes converted, {t.nbytes} announced in the header")
            writer.write_tensor_data(data)
        writer.close()
        tmp.replace(out_path)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    return out_path


def gguf_metadata(path: str | Path) -> dict[str, Any]:
    """A GGUF file's metadata as plain python values, read with ``gguf.GGUFReader`` (nothing dequantised)."""
    fields = gguf.GGUFReader(path).fields
    return {key: field.contents() for key, field in fields.items() if not key.startswith("GGUF.")}


def load_gguf_tokenizer(path: str | Path, *, llama_cpp_spaces: bool = True):
    """The tokenizer transformers rebuilds from a GGUF file's metadata (``from_pretrained(folder, gguf_file=name)``).

    For a ``llama`` vocabulary transformers builds a non-legacy Llama tokenizer: "▁" before the first piece of text
    only. llama.cpp ("prefix with space if previous is special", llama-vocab.cpp) and OpenHermes-2.5's own legacy
    tokenizer put it before every piece of text that follows a special token: ``llama_cpp_spaces`` does the same.
    """
    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if llama_cpp_spaces and gguf_metadata(path)["tokenizer.ggml.model"] == "llama":
        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always", split=False)
    return tokenizer


@torch.no_grad()
def rounding_residue(model, merged_dir: str | Path, dtype: str) -> float:
    """The largest difference between ``model``'s weights (read back from a GGUF file of type ``dtype``) and the
    merged model's, rounded as that type stores them (gguf's own quantise and dequantise): 0.0 when the file holds
    exactly the merged weights, each in its place, changed by nothing but its type's rounding. One tensor at a time."""
    parameters, worst = dict(model.named_parameters()), 0.0  # a tied head is one parameter, stored once
    for name in safetensors_files(merged_dir):
        if name in parameters:
            weights = read_tensor(merged_dir, name)
            qtype = gguf_tensor_type(weights.shape, dtype)
            rounded = gguf.quants.dequantize(_convert(weights, qtype), qtype).reshape(weights.shape)
            worst = max(worst, float(np.abs(parameters[name].detach().float().cpu().numpy() - rounded).max()))
    return worst


def find_or_build_merged(profile: Profile, run_id: str, *, build_if_missing: bool, steps: int = 5) -> Path:
    """The run folder whose ``merged/`` is exported: ``<profile>-<run_id>`` when notebooks 04 and 05 made it.

    Missing, with ``build_if_missing``: ``steps`` DPO steps (``helpers.training.train_dpo``) merged by
    ``helpers.merging.merge_run`` into ``<profile>-<run_id>-short``, a folder of its own that a later run of notebooks
    04-05 never mixes with. Without it, a ``FileNotFoundError`` says what to run.
    """
    folder = run_dir(profile.name, run_id)
    if (folder / "merged" / "config.json").is_file():
        return folder
    if not build_if_missing:
        raise FileNotFoundError(f"{display_path(folder / 'merged')} does not exist: run notebooks 04 and 05 with "
                                f"RUN_ID={run_id!r} first, or set BUILD_IF_MISSING = True")
    short = run_dir(profile.name, f"{run_id}-short")
    if not (short / "merged" / "config.json").is_file():
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # trainer logs
            data = prepare_data(profile, load_tokenizer(profile.model_id))
            train_dpo(profile, short, data, progress=False, max_steps=steps, save_strategy="no")
            merge_run(profile, short)
    return short

