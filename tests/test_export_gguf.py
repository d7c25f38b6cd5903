"""helpers/export_gguf.py (notebook 09) against independent references: the q/k permutation against a case worked
by hand and against transformers' own inverse; the files' bytes against gguf's quantiser; what gguf's own GGUFReader
reads back against the Hugging Face tokenizer's own ids, types and flags; what transformers' GGUF loader rebuilds
against the merged model (logits, every weight, token ids).

Three models: the tiny model with a random LoRA update merged in (conftest's ``other_model_path``: byte-level BPE,
written as ``llama``), and the offline stand-ins of OpenHermes-2.5 (sentencepiece-style BPE with byte fallback, two
bf16 shards: ``llama`` with llama.cpp's ``llama`` tokenizer model) and Qwen2.5-0.5B (``qwen2``, tied head, biases),
built by ``standins.build`` (cached in .cache/standins).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGUFReader, TokenType
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

from helpers import export_gguf as gx
from helpers.models import largest_difference
from helpers.profiles import DATA_DIR, get_profile
from standins.build import OPENHERMES_ID, QWEN_ID, build_standins, snapshot_dir

PROMPTS = ["<|im_start|>user\nWhich is bigger: 8 or 66?<|im_end|>\n<|im_start|>assistant\n",
           "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHow do I make tea?<|im_end|>\n"
           "<|im_start|>assistant\nBoil water.<|im_end|>\n"]


def heldout_texts() -> list[str]:
    """Questions and chosen answers of the course's held-out pairs: ordinary text, digits, markdown, code."""
    rows = [json.loads(line) for line in (DATA_DIR / "heldout.jsonl").read_text().splitlines() if line.strip()]
    return [row[column] for row in rows for column in ("question", "chosen")]


@pytest.fixture(scope="module")
def standins_home() -> Path:
    return build_standins()


@pytest.fixture(scope="module")
def models(other_model_path, standins_home) -> dict[str, Path]:
    return {"tiny": other_model_path, "openhermes": snapshot_dir(standins_home, OPENHERMES_ID),
            "qwen2": snapshot_dir(standins_home, QWEN_ID)}


@pytest.fixture(scope="module")
def exported(models, tmp_path_factory) -> dict[str, dict[str, Path]]:
    """Every model in every type, written once for the module."""
    out = tmp_path_factory.mktemp("gguf")
    return {name: {dtype: gx.export_gguf(folder, out / f"{name}-{dtype}.gguf", dtype) for dtype in gx.GGUF_DTYPES}
            for name, folder in models.items()}


# --- the q/k permutation ----------------------------------------------------------------------------------------


def test_permute_matches_a_case_worked_by_hand():
    # one head of 8: HF pairs (0,4) (1,5) (2,6) (3,7) must end up side by side, as llama.cpp's llama rotates them
    rows = np.arange(8, dtype=np.float32)[:, None] * np.ones((1, 3), dtype=np.float32)  # 3 columns move with the row
    assert gx.permute_qk(rows, 1)[:, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    assert (gx.permute_qk(rows, 1) == gx.permute_qk(rows, 1)[:, :1]).all()  # whole rows move, columns untouched
    # k of a GQA model: 4 query heads, 2 key heads of 4 -> each key head [a0 a1 b0 b1] -> [a0 b0 a1 b1]
    assert gx.permute_qk(rows, 4, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    # permuted as 4 heads of 2 (n_head instead of n_head_kv) it would stay as it is: the GQA case matters
    assert gx.permute_qk(rows, 4)[:, 0].tolist() == list(range(8))


@pytest.mark.parametrize(("n_head", "n_head_kv", "rows"), [(8, 8, 128), (8, 2, 32)])
def test_transformers_loader_undoes_the_permutation(n_head, n_head_kv, rows):
    weights = np.random.default_rng(0).standard_normal((rows, 64)).astype(np.float32)
    back = LlamaTensorProcessor()._reverse_permute_weights(gx.permute_qk(weights, n_head, n_head_kv), n_head,
                                                            n_head_kv)
    assert np.array_equal(back, weights)
    assert not np.array_equal(gx.permute_qk(weights, n_head, n_head_kv), weights)


# --- the tensors in the file --------------------------------------------------------------------------------------


def test_q8_0_tensors_are_gguf_quantised_permuted_weights(models, exported):
    """Each tensor's bytes in the q8_0 file are gguf's own quantisation of the right safetensors tensor, permuted
    for q/k; 1-D tensors are the float32 weights themselves."""
    folder, config = models["tiny"], gx.read_config(models["tiny"])
    plan = {t.gguf_name: t for t in gx.tensor_plan(folder, "q8_0")}
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    tensors = GGUFReader(exported["tiny"]["q8_0"]).tensors
    assert sorted(t.name for t in tensors) == sorted(plan)
    for tensor in tensors:
        weights = gx.read_tensor(folder, plan[tensor.name].hf_name)
        if tensor.name.endswith("attn_q.weight"):
            weights = gx.permute_qk(weights, heads, heads)
        elif tensor.name.endswith("attn_k.weight"):
            weights = gx.permute_qk(weights, heads, kv_heads)
        if weights.ndim == 1:
            assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
            assert np.array_equal(np.asarray(tensor.data), weights), tensor.name
            continue
        assert tensor.tensor_type == gguf.GGMLQuantizationType.Q8_0, tensor.name
        expected = gguf.quants.quantize(weights, gguf.GGMLQuantizationType.Q8_0)
        assert np.array_equal(np.asarray(tensor.data).reshape(expected.shape), expected), tensor.name
        # and within half a step of the weights, d = max|w| / 127 per block of 32, plus the scale's own fp16
        # rounding (relative 2^-11) times at most 127 steps
        restored = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type).reshape(weights.shape)
        step = np.repeat(np.abs(weights.reshape(-1, 32)).max(axis=1) / 127, 32).reshape(weights.shape)
        assert (np.abs(restored - weights) <= step * (0.5 + 127 * 2**-11) + 1e-12).all(), tensor.name


def test_file_sizes_are_the_plans(models, exported):
    for name, files in exported.items():
        for dtype, path in files.items():
            planned = sum(t.nbytes for t in gx.tensor_plan(models[name], dtype))
            assert sum(int(t.n_bytes) for t in GGUFReader(path).tensors) == planned, (name, dtype)


@pytest.mark.parametrize("name", ["tiny", "openhermes", "qwen2"])
def test_read_back_by_transformers(models, exported, name):
    """f32 gives the merged model's logits bit for bit (the same fp32 computation on the same weights); every file
    holds exactly the merged weights rounded as its type stores them; the rounding moves logits by little."""
    folder = models[name]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = [tokenizer(prompt, return_tensors="pt")["input_ids"] for prompt in PROMPTS]
    with torch.no_grad():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        reference = [model(input_ids=row).logits[0] for row in ids]
        scale = max(logits.abs().max().item() for logits in reference)
        for dtype, path in exported[name].items():
            with contextlib.redirect_stderr(io.StringIO()):
                back = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
            assert type(back).__name__ == ("Qwen2ForCausalLM" if name == "qwen2" else "LlamaForCausalLM")
            difference = largest_difference(reference, [back.eval()(input_ids=row).logits[0] for row in ids])
            assert gx.rounding_residue(back, folder, dtype) == 0.0, dtype
            assert difference <= {"f32": 0.0, "f16": 1e-2 * scale, "q8_0": 1e-1 * scale}[dtype], (dtype, difference)


def test_qwen2_layout_biases_and_tied_head(models, exported):
    reader = GGUFReader(exported["qwen2"]["q8_0"])
    names = {t.name: t for t in reader.tensors}
    config = gx.read_config(models["qwen2"])
    assert "output.weight" not in names and config["tie_word_embeddings"]
    for layer in range(config["num_hidden_layers"]):
        for kind in "qkv":
            assert names[f"blk.{layer}.attn_{kind}.bias"].tensor_type == gguf.GGMLQuantizationType.F32
    meta = gx.gguf_metadata(exported["qwen2"]["q8_0"])
    assert meta["general.architecture"] == "qwen2" and "qwen2.rope.dimension_count" not in meta
    assert meta["qwen2.attention.head_count_kv"] == config["num_key_value_heads"]


# --- the vocabulary -----------------------------------------------------------------------------------------------


def test_a_sentencepiece_style_vocabulary_is_written_not_refused(models):
    vocab = gx.gguf_vocab(models["openhermes"])  # was: ValueError "only byte-level BPE tokenizers ..."
    assert (vocab.model, vocab.pre, vocab.merges) == ("llama", "default", [])


def test_llama_vocabulary_as_gguf_reads_it(models, exported):
    """Tokens, types, ids and flags of the OpenHermes stand-in's file against its Hugging Face tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(models["openhermes"])
    fields = GGUFReader(exported["openhermes"]["f16"]).fields
    meta = {key: field.contents() for key, field in fields.items()}
    n = len(tokenizer)
    assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.pre"] == "default"
    assert meta["tokenizer.ggml.tokens"] == tokenizer.convert_ids_to_tokens(list(range(n)))
    assert len(meta["tokenizer.ggml.scores"]) == n and "tokenizer.ggml.merges" not in meta
    added = tokenizer.added_tokens_decoder
    expected = [TokenType.BYTE if re.fullmatch(r"<0x[0-9A-F]{2}>", token) else TokenType.CONTROL
                if i in tokenizer.all_special_ids else TokenType.USER_DEFINED if i in added else TokenType.NORMAL
                for i, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(n))))]
    assert meta["tokenizer.ggml.token_type"] == [int(t) for t in expected]
    types = dict(zip(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"], strict=True))
    assert sum(t == TokenType.BYTE for t in types.values()) == 256
    assert [types[t] for t in ("<unk>", "<s>", "</s>", "<|im_end|>", "<|im_start|>")] == [
        TokenType.CONTROL] * 4 + [TokenType.USER_DEFINED]
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"],
            meta["tokenizer.ggml.unknown_token_id"], meta["tokenizer.ggml.padding_token_id"]) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id, tokenizer.pad_token_id)
    assert meta["tokenizer.ggml.add_bos_token"] is (tokenizer("hi")["input_ids"][0] == tokenizer.bos_token_id) is True
    assert meta["tokenizer.chat_template"] == tokenizer.chat_template


def test_llama_vocabulary_read_back_gives_the_same_ids(models, exported):
    tokenizer = AutoTokenizer.from_pretrained(models["openhermes"])
    path = exported["openhermes"]["f32"]
    rebuilt = gx.load_gguf_tokenizer(path)
    texts = heldout_texts() + PROMPTS + ["émoji 🙂, ünïcode, 中文 \t  x1y22z333", "<s></s><unk><|im_end|>"]
    assert [rebuilt(t)["input_ids"] for t in texts] == [tokenizer(t)["input_ids"] for t in texts]
    # transformers' own reader puts "▁" at the start only: text after a special token differs, plain text does not
    as_read = gx.load_gguf_tokenizer(path, llama_cpp_spaces=False)
    assert as_read(PROMPTS[0])["input_ids"] != tokenizer(PROMPTS[0])["input_ids"]
    assert as_read(texts[0])["input_ids"] == tokenizer(texts[0])["input_ids"]


def test_the_converters_placeholder_scores_lose_the_merge_order(models, tmp_path, monkeypatch):
    """What gguf's LlamaHfVocab writes (-1000.0 for every token) tokenises differently: the scores carry the order."""
    monkeypatch.setattr(gx, "merge_scores", lambda tokenizer, tokens: [-1000.0] * len(tokens))
    path = gx.export_gguf(models["openhermes"], tmp_path / "placeholder.gguf", "f16")
    tokenizer, rebuilt = AutoTokenizer.from_pretrained(models["openhermes"]), gx.load_gguf_tokenizer(path)
    texts = heldout_texts()
    differ = sum(rebuilt(t)["input_ids"] != tokenizer(t)["input_ids"] for t in texts)
    assert differ > len(texts) // 10, f"only {differ} of {len(texts)} texts differ"


def test_byte_level_vocabularies(models, exported):
    tiny = AutoTokenizer.from_pretrained(models["tiny"])
    meta = gx.gguf_metadata(exported["tiny"]["f16"])
    merges = json.loads(tiny.backend_tokenizer.to_str())["model"]["merges"]
    assert meta["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in merges]
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("gpt2", "gpt-2")
    control = {tiny.convert_ids_to_tokens(i) for i, t in tiny.added_tokens_decoder.items() if t.special}
    types = dict(zip(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"], strict=True))
    assert {t for t, kind in types.items() if kind == TokenType.CONTROL} == control | {"<|im_start|>"}
    qwen, config = AutoTokenizer.from_pretrained(models["qwen2"]), gx.read_config(models["qwen2"])
    meta = gx.gguf_metadata(exported["qwen2"]["f16"])
    types = meta["tokenizer.ggml.token_type"]
    assert meta["tokenizer.ggml.pre"] == "qwen2" and meta["tokenizer.ggml.bos_token_id"] == config["bos_token_id"]
    assert sum(t == TokenType.UNUSED for t in types) == config["vocab_size"] - len(qwen)
    vocab = qwen.get_vocab()
    assert types[vocab["<|fim_prefix|>"]] == TokenType.CONTROL and not qwen.added_tokens_decoder[
        vocab["<|fim_prefix|>"]].special  # looks special: CONTROL, as the converter's does_token_look_special
    assert types[vocab["<tool_call>"]] == TokenType.USER_DEFINED
    rebuilt = gx.load_gguf_tokenizer(exported["qwen2"]["f16"])
    texts = heldout_texts()[:60] + PROMPTS
    assert [rebuilt(t)["input_ids"] for t in texts] == [qwen(t)["input_ids"] for t in texts]


# --- refusals, interruptions, the missing merged model ------------------------------------------------------------


def _copy_with_config(source: Path, target: Path, **changes) -> Path:
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, **changes}))
    return target


@pytest.mark.parametrize("changes", [{"model_type": "gemma"}, {"rope_scaling": {"type": "linear", "factor": 2.0}},
                                     {"attention_bias": True}])
def test_refuses_what_it_cannot_write_and_names_the_converter(models, tmp_path, changes):
    folder = _copy_with_config(models["tiny"], tmp_path / "model", **changes)
    with pytest.raises(ValueError, match="convert_hf_to_gguf"):
        gx.export_gguf(folder, tmp_path / "out.gguf", "f16")
    assert not (tmp_path / "out.gguf").exists()


def test_refuses_qwen2_with_sliding_window_or_without_biases(models, tmp_path):
    folder = _copy_with_config(models["qwen2"], tmp_path / "window", use_sliding_window=True)
    with pytest.raises(ValueError, match="sliding"):
        gx.tensor_plan(folder, "f16")
    with pytest.raises(ValueError, match="biases"):
        _plan_without_biases(models, tmp_path)


def _plan_without_biases(models, tmp_path):
    """The Qwen stand-in with its q/k/v biases removed from the index of tensors."""
    folder = tmp_path / "no-bias"
    shutil.copytree(models["qwen2"], folder)
    tensors = {k: v for k, v in load_file(folder / "model.safetensors").items() if not k.endswith("proj.bias")}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return gx.tensor_plan(folder, "f16")


def test_an_interrupted_export_leaves_no_file(models, tmp_path, monkeypatch):
    calls = []

    def failing(weights, qtype):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return np.ascontiguousarray(weights, dtype=np.float32)

    monkeypatch.setattr(gx, "_convert", failing)
    with pytest.raises(KeyboardInterrupt):
        gx.export_gguf(models["tiny"], tmp_path / "model.gguf", "f32")
    assert list(tmp_path.iterdir()) == []


def test_a_missing_merged_model_says_what_to_run(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_OUTPUT_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="notebooks 04 and 05"):
        gx.find_or_build_merged(get_profile("tiny"), "nothing-here", build_if_missing=False)
