"""GGUF export (helpers.export_gguf): round trips through transformers' GGUF loader, tokenizer, metadata.

Two merged models are built here, so the tests do not depend on the notebooks having run:

- the tiny Mistral (the `tiny` profile): the tiny base + a LoRA adapter with seeded random B, merged by
  helpers.merging; written as llama.cpp's `llama` (q/k permuted);
- a Qwen2 (the `t4` profile's Qwen2.5-0.5B-Instruct): the offline stand-in's snapshot folder (helpers.standins,
  loaded by path: nothing is activated) with seeded random q/k/v biases and a seeded random LoRA update merged in;
  written as llama.cpp's `qwen2` (not permuted, biases, tied head left out).

The references are independent of the exporter: transformers' own GGUF loader (logits, tokenizer, config), the
gguf package's reader (tensors bit for bit) and its SpecialVocab (what llama.cpp's converter writes for special
ids and merges), the Hugging Face tokenizer's own ids, and tensor names spelled out by hand. The course's own t4
path (train, merge, export on the stand-ins) runs once in a subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor, load_gguf_checkpoint
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from helpers import export_gguf as gx
from helpers import standins
from helpers.architectures import qwen2_5_0_5b_config
from helpers.loading import largest_difference
from helpers.lora import lora_config
from helpers.merging import merge_adapter
from helpers.paths import REPO_ROOT
from helpers.profiles import get_profile
from helpers.tiny_model import build_tiny_model

PROMPTS = [
    "<|im_start|>user\nWhich is bigger: 8 or 66?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHow do I make tea?<|im_end|>\n",
    "Plain text with digits 3.14159 and  two spaces.",
]
TEXTS = PROMPTS + [
    "<|im_start|>assistant\nCertainly, 42.<|im_end|>\n<pad><unk>",
    "x1y22z333 - 12 345 6789",
    "  leading spaces\tand a tab\nand newlines\n\n",
    "unicode: émoji 🙂 ünïcode 中文",
    "<|im_end|><|im_start|>",
]
# Largest logit difference allowed, as a fraction of the largest |logit|. Per weight, f16 rounds to 11 significant
# bits (relative error <= 2^-11 = 4.9e-4) and q8_0 to 1/127 of its 32-weight block's largest value (error <= 1/254
# = 3.9e-3 of it); through 4 layers and the head the logits inherit errors of that order. Measured on this fixture
# (largest |logit| 15.2): f16 0.0081 (5.4e-4 of it), q8_0 0.154 (1.0e-2). The bounds are about 8x and 10x the
# per-weight bounds, i.e. 7x and 4x the measured values.
MAX_RELATIVE_LOGIT_DIFF = {"f16": 4e-3, "q8_0": 4e-2}


@pytest.fixture(scope="module")
def merged_dir(tmp_path_factory, tiny_model_path):
    """A merged tiny model: base + an adapter whose B matrices are seeded random (so the merge changes weights)."""
    profile = get_profile("tiny")
    folder = tmp_path_factory.mktemp("gguf")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    torch.manual_seed(0)  # PEFT draws the A matrices from the global generator
    wrapped = get_peft_model(base, lora_config(profile))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in wrapped.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    wrapped.save_pretrained(folder / "adapter")
    merge_adapter(profile, folder / "adapter", folder / "merged")
    return folder / "merged"


@pytest.fixture(scope="module")
def merged(merged_dir):
    return gx.load_reference(merged_dir)


@pytest.fixture(scope="module")
def exported(merged_dir, tmp_path_factory):
    """The merged model exported once per type: {"f32": path, "f16": path, "q8_0": path}."""
    out = tmp_path_factory.mktemp("gguf-files")
    return {dtype: gx.export_gguf(merged_dir, out / f"tiny-{dtype}.gguf", dtype) for dtype in gx.GGUF_DTYPES}


def test_permute_is_llama_cpp_and_transformers_undoes_it():
    weights = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)  # 2 heads of 4 dims, 3 inputs
    permuted = gx.permute_qk(weights, 2, 2)
    # inside each head the halves are interleaved: rows [0, 1 | 2, 3] -> [0, 2, 1, 3]
    assert permuted[:, 0].tolist() == [0, 6, 3, 9, 12, 18, 15, 21]
    assert np.array_equal(gx.unpermute_qk(permuted, 2, 2), weights)
    undone = LlamaTensorProcessor()._reverse_permute_weights(permuted, 2, 2)
    assert np.array_equal(undone, weights), "transformers' GGUF loader must undo exactly llama.cpp's permutation"
    k = np.random.default_rng(0).normal(size=(64, 128)).astype(np.float32)  # k_proj: 2 kv heads of 32
    assert np.array_equal(LlamaTensorProcessor()._reverse_permute_weights(gx.permute_qk(k, 4, 2), 4, 2), k)


def test_plan_names_shapes_and_types(merged_dir):
    plan = {t.gguf_name: t for t in gx.tensor_plan(merged_dir, "q8_0")}
    assert plan["token_embd.weight"].hf_name == "model.embed_tokens.weight"
    assert plan["blk.0.attn_q.weight"].hf_name == "model.layers.0.self_attn.q_proj.weight"
    assert plan["blk.3.ffn_down.weight"].shape == (128, 384)
    assert plan["output_norm.weight"].qtype.name == "F32"  # 1-D tensors stay f32
    assert plan["blk.0.attn_k.weight"].qtype.name == "Q8_0"
    assert plan["blk.0.attn_k.weight"].nbytes == 64 * 128 // 32 * 34
    assert gx.gguf_tensor_type((16, 100), "q8_0").name == "F16", "rows not a multiple of 32 fall back to f16"
    with pytest.raises(ValueError, match="dtype must be one of"):
        gx.gguf_tensor_type((16, 128), "q4_0")


def _assert_f32_identical(model, tokenizer, path: Path, prompts: list[str]):
    """The f32 file reloaded by transformers gives the merged model's logits bit for bit; returns the reload."""
    reloaded, reloaded_tokenizer = gx.load_gguf(path)
    original = gx.prompt_logits(model, tokenizer, prompts)
    for a, b in zip(original, gx.prompt_logits(reloaded, reloaded_tokenizer, prompts)):
        assert torch.equal(a, b), f"f32 logits differ by {(a - b).abs().max().item()}"
    return reloaded


def _assert_rounding_only(model, tokenizer, path: Path, dtype: str, prompts: list[str]) -> None:
    """A rounded file reloaded gives exactly what rounding the weights the same way gives - nothing else is lost or
    changed - and differs from the merged model by less than that type's bound."""
    reloaded, reloaded_tokenizer = gx.load_gguf(path)
    from_file = gx.prompt_logits(reloaded, reloaded_tokenizer, prompts)
    assert largest_difference(gx.prompt_logits(gx.rounded_copy(model, dtype), tokenizer, prompts), from_file) == 0
    original = gx.prompt_logits(model, tokenizer, prompts)
    scale = max(logits.abs().max().item() for logits in original)
    difference = largest_difference(original, from_file)
    assert 0 < difference < MAX_RELATIVE_LOGIT_DIFF[dtype] * scale, f"{dtype}: {difference} for logits up to {scale}"


def test_f32_round_trip_is_bit_identical(merged, exported):
    reloaded = _assert_f32_identical(*merged, exported["f32"], PROMPTS)
    assert reloaded.config.model_type == "llama"


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_f16_and_q8_0_differ_only_by_rounding(merged, exported, dtype):
    _assert_rounding_only(*merged, exported[dtype], dtype, PROMPTS)


def test_file_types_and_sizes(merged_dir, exported):
    weights = gx.folder_size(merged_dir)
    sizes = {dtype: path.stat().st_size for dtype, path in exported.items()}
    assert weights < sizes["f32"] < weights * 1.05, "f32 GGUF: the same weights plus metadata"
    assert sizes["f16"] < 0.55 * sizes["f32"] and sizes["q8_0"] < 0.3 * sizes["f32"]
    types = gx.gguf_tensor_types(exported["q8_0"])
    assert len(types) == 2 + 1 + 4 * 9
    assert {types[n] for n in types if n.endswith("norm.weight")} == {"F32"}
    assert {types[n] for n in types if not n.endswith("norm.weight")} == {"Q8_0"}
    assert set(gx.gguf_tensor_types(exported["f32"]).values()) == {"F32"}


def test_tokenizer_ids_identical(merged, exported):
    _, tokenizer = merged
    _, reloaded = gx.load_gguf(exported["f16"])
    rows = gx.token_id_table(tokenizer, reloaded, TEXTS)
    assert all(same for _, _, same in rows), [text for text, _, same in rows if not same]
    assert reloaded.eos_token == "<|im_end|>" and reloaded.pad_token == "<pad>"
    messages = [{"role": "user", "content": "hi"}]
    assert reloaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    )


def test_vocabulary_and_special_tokens_in_file(merged, exported):
    _, tokenizer = merged
    path = exported["q8_0"]
    specials = ("<pad>", "<unk>", "<|im_start|>", "<|im_end|>")
    assert gx.special_token_types(path, tokenizer) == dict.fromkeys(specials, "CONTROL")
    meta = gx.gguf_metadata(path)
    vocab = tokenizer.get_vocab()
    assert meta["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get), "the file's tokens are the vocabulary by id"
    types = meta["tokenizer.ggml.token_type"]
    assert sum(t == 3 for t in types) == 4 and sum(t == 1 for t in types) == len(vocab) - 4
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert meta["tokenizer.ggml.merges"] == [" ".join(m) for m in merges]
    assert meta["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert meta["tokenizer.ggml.padding_token_id"] == tokenizer.pad_token_id
    assert meta["tokenizer.ggml.add_bos_token"] is False


def test_chat_template_and_llama_metadata(merged, exported):
    model, tokenizer = merged
    meta = gx.gguf_metadata(exported["f16"])
    assert meta["tokenizer.chat_template"] == tokenizer.chat_template
    config = model.config
    expected = {
        "general.architecture": "llama",
        "general.file_type": 1,
        "llama.context_length": config.max_position_embeddings,
        "llama.embedding_length": config.hidden_size,
        "llama.block_count": config.num_hidden_layers,
        "llama.feed_forward_length": config.intermediate_size,
        "llama.attention.head_count": config.num_attention_heads,
        "llama.attention.head_count_kv": config.num_key_value_heads,
        "llama.rope.dimension_count": config.hidden_size // config.num_attention_heads,
        "llama.vocab_size": config.vocab_size,
        "tokenizer.ggml.model": "gpt2",
    }
    assert {k: meta[k] for k in expected} == expected
    assert meta["llama.rope.freq_base"] == pytest.approx(10000.0)
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(config.rms_norm_eps)


def test_interrupted_export_leaves_nothing(merged_dir, tmp_path, monkeypatch):
    calls = []
    original = gx._convert

    def failing_convert(weights, qtype):
        calls.append(weights.shape)
        if len(calls) == 3:  # the third tensor: header and two tensors are already on disk
            raise RuntimeError("disk full")
        return original(weights, qtype)

    monkeypatch.setattr(gx, "_convert", failing_convert)
    target = tmp_path / "model.gguf"
    with pytest.raises(RuntimeError, match="disk full"):
        gx.export_gguf(merged_dir, target, "f16")
    assert list(tmp_path.iterdir()) == [], "no file, not even the temporary one, after a failed export"


def test_streams_one_tensor_at_a_time(merged_dir, tmp_path, monkeypatch):
    """Every tensor is read alone from safetensors (get_tensor), never the whole state dict."""
    reads = []
    real = gx.safe_open

    class CountingOpen:
        def __init__(self, *args, **kwargs):
            self.inner = real(*args, **kwargs)

        def __enter__(self):
            self.handle = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def get_tensor(self, name):
            reads.append(name)
            return self.handle.get_tensor(name)

        def __getattr__(self, name):
            return getattr(self.handle, name)

    monkeypatch.setattr(gx, "safe_open", CountingOpen)  # the exporter's own reference
    gx.export_gguf(merged_dir, tmp_path / "model.gguf", "f32")
    assert sorted(reads) == sorted(gx.safetensors_files(merged_dir)), "each tensor read exactly once"


def test_refuses_what_it_cannot_export(merged_dir, tmp_path):
    def relabelled(name: str, **changes) -> str:
        other = tmp_path / name
        shutil.copytree(merged_dir, other)
        config = json.loads((other / "config.json").read_text())
        (other / "config.json").write_text(json.dumps({**config, **changes}))
        return other

    with pytest.raises(ValueError, match=r"model_type 'gemma2' is not one this exporter writes.*convert_hf_to_gguf"):
        gx.export_gguf(relabelled("gemma", model_type="gemma2"), tmp_path / "gemma.gguf", "f16")
    # a "qwen2" without q/k/v biases: llama.cpp's qwen2 loader requires blk.N.attn_{q,k,v}.bias
    with pytest.raises(ValueError, match=r"q/k/v biases of every layer; 12 are missing, e\.g\. blk\.0\.attn_q\.bias"):
        gx.export_gguf(relabelled("qwen", model_type="qwen2"), tmp_path / "qwen.gguf", "f16")
    with pytest.raises(ValueError, match="rope scaling"):
        rope = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
        gx.export_gguf(relabelled("rope", rope_parameters=rope), tmp_path / "rope.gguf", "f16")
    with pytest.raises(FileNotFoundError, match="run notebooks 04 and 05"):
        gx.export_gguf(tmp_path / "missing", tmp_path / "x.gguf", "f16")
    assert not list(tmp_path.glob("*.gguf")), "a refused export writes nothing"


# --- Qwen2 (the t4 profile's Qwen2.5-0.5B-Instruct), written as llama.cpp's `qwen2` --------------------------------

QWEN_PROMPTS = [
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nWhich is bigger: 8 or 66?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nHow do I make tea?<|im_end|>\n<|im_start|>assistant\nBoil water, then",
    "Plain text with digits 3.14159 and  two spaces.",
]
QWEN_TEXTS = QWEN_PROMPTS + [
    "<|im_start|>assistant\nCertainly, 42.<|im_end|>\n<|endoftext|>",
    "<tool_call>\n{\"name\": \"f\"}\n</tool_call><|fim_prefix|>x<|fim_suffix|>",
    "x1y22z333 - 12 345 6789",
    "  leading spaces\tand a tab\nand newlines\n\n",
    "unicode: émoji 🙂 ünïcode 中文",
    "It's, they're, WE'LL: contractions",
]


def gguf_name(hf_name: str) -> str:
    """llama.cpp's name of a Qwen2 tensor, spelled out by hand (the exporter uses the gguf package's map)."""
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf_name in fixed:
        return fixed[hf_name]
    _, _, layer, *rest = hf_name.split(".")
    part = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
            "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
            "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}[".".join(rest[:-1])]
    return f"blk.{layer}.{part}.{rest[-1]}"


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    """A merged Qwen2 from the t4 stand-in: seeded random q/k/v biases (the stand-in's are zero, which would hide a
    lost or misplaced bias) and a LoRA update with seeded random B merged in; tied embeddings, fp32 safetensors."""
    snapshot = standins.snapshot_dir(standins.build_standins(), standins.QWEN_ID)
    base = AutoModelForCausalLM.from_pretrained(snapshot, dtype=torch.float32)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in base.named_parameters():
            if name.endswith(".bias"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    torch.manual_seed(0)  # PEFT draws the A matrices from the global generator
    wrapped = get_peft_model(base, lora_config(get_profile("t4", check_hardware=False)))
    with torch.no_grad():
        for name, parameter in wrapped.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    folder = tmp_path_factory.mktemp("qwen") / "merged"
    wrapped.merge_and_unload().save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(snapshot).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def qwen(qwen_dir):
    return gx.load_reference(qwen_dir)


@pytest.fixture(scope="module")
def qwen_files(qwen_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen-gguf")
    return {dtype: gx.export_gguf(qwen_dir, out / f"qwen-{dtype}.gguf", dtype) for dtype in gx.GGUF_DTYPES}


def test_qwen2_is_written_as_llama_cpp_qwen2(qwen_dir, qwen_files):
    assert gx.check_exportable(qwen_dir) is gx.QWEN2 and not gx.QWEN2.permute_qk
    meta = gx.gguf_metadata(qwen_files["f16"], ["general.architecture", "general.file_type"])
    assert meta == {"general.architecture": "qwen2", "general.file_type": 1}


def test_qwen2_tensors_are_the_safetensors_bit_for_bit(qwen_dir, qwen_files):
    """f32: every tensor, biases included, is the merged weight itself under llama.cpp's name - not permuted
    (llama.cpp's qwen2 uses the NeoX rotation, Hugging Face's own) - and the tied head is not written."""
    hf = load_file(qwen_dir / "model.safetensors")
    assert "lm_head.weight" not in hf and json.loads((qwen_dir / "config.json").read_text())["tie_word_embeddings"]
    in_file = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(qwen_files["f32"]).tensors}
    assert set(in_file) == {gguf_name(name) for name in hf}, "exactly the model's tensors, and no output.weight"
    assert {name for name in in_file if name.endswith(".bias")} == {
        f"blk.{i}.attn_{kind}.bias" for i in range(2) for kind in "qkv"
    }
    for name, weights in hf.items():
        assert np.array_equal(in_file[gguf_name(name)], weights.numpy()), f"{name} differs in the file"


def test_qwen2_plan_types(qwen_dir, tmp_path):
    types = {t.gguf_name: t.qtype.name for t in gx.tensor_plan(qwen_dir, "q8_0")}
    assert types["blk.0.attn_q.bias"] == types["output_norm.weight"] == "F32", "1-D tensors stay f32"
    # the stand-in is 112 wide (not a multiple of 32): those rows fall back to f16; down_proj's 608 = 19 x 32 do not
    assert types["blk.0.ffn_down.weight"] == "Q8_0"
    assert types["token_embd.weight"] == types["blk.0.attn_q.weight"] == "F16"
    # a tied head saved anyway (as some tools do) is still left out: the model computes with the embedding
    with_head = tmp_path / "with-head"
    shutil.copytree(qwen_dir, with_head)
    tensors = load_file(with_head / "model.safetensors")
    save_file({**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"].clone()},
              with_head / "model.safetensors", metadata={"format": "pt"})
    assert "output.weight" not in {t.gguf_name for t in gx.tensor_plan(with_head, "f16")}


def test_qwen2_f32_round_trip_is_bit_identical(qwen, qwen_files):
    reloaded = _assert_f32_identical(*qwen, qwen_files["f32"], QWEN_PROMPTS)
    assert type(reloaded).__name__ == "Qwen2ForCausalLM" and reloaded.config.tie_word_embeddings
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr(), "head tied again"


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_qwen2_f16_and_q8_0_differ_only_by_rounding(qwen, qwen_files, dtype):
    # measured: f16 2.4e-4 and q8_0 6.7e-4 of the largest |logit| (0.82); q8_0 only on down_proj here (see above)
    _assert_rounding_only(*qwen, qwen_files[dtype], dtype, QWEN_PROMPTS)


def test_qwen2_hyperparameters_read_back_by_transformers(qwen_dir, qwen_files):
    """transformers' own GGUF parser turns the file's qwen2.* keys back into the merged model's config."""
    config = json.loads((qwen_dir / "config.json").read_text())
    parsed = load_gguf_checkpoint(str(qwen_files["q8_0"]))["config"]
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "max_position_embeddings", "vocab_size"):
        assert parsed[key] == config[key], key
    assert parsed["model_type"] == "qwen2" and parsed["tie_word_embeddings"] is True
    assert parsed["rope_theta"] == config["rope_parameters"]["rope_theta"] == 1e6
    assert parsed["rms_norm_eps"] == pytest.approx(config["rms_norm_eps"])
    keys = set(gx.gguf_metadata(qwen_files["q8_0"]))
    # what llama.cpp's converter (Qwen2Model -> TextModel.set_gguf_parameters) leaves out: derived from other keys
    assert not keys & {"qwen2.rope.dimension_count", "qwen2.vocab_size", "qwen2.attention.key_length"}


def test_qwen2_tokenizer_metadata(qwen_dir, qwen, qwen_files):
    """Tokens by id from the Hugging Face tokenizer; merges, special ids and template as gguf's SpecialVocab (the
    converter's own reader of tokenizer.json / tokenizer_config.json / config.json) finds them."""
    _, tokenizer = qwen
    meta = gx.gguf_metadata(qwen_files["q8_0"])
    vocab_size = json.loads((qwen_dir / "config.json").read_text())["vocab_size"]
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    assert meta["tokenizer.ggml.tokens"] == [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "qwen2"
    types = meta["tokenizer.ggml.token_type"]
    added = tokenizer.added_tokens_decoder
    control = {added[i].content for i in added if types[i] == 3}
    assert {"<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|fim_prefix|>", "<|file_sep|>"} <= control
    assert {added[i].content for i in added if types[i] == 4} == {"<tool_call>", "</tool_call>"}, "USER_DEFINED"
    assert all(types[i] == 1 for i in by_id if i not in added), "every other token of the vocabulary is NORMAL"
    assert all(types[i] == 5 for i in range(len(by_id), vocab_size)), "the padding rows are UNUSED"
    special = gguf.SpecialVocab(qwen_dir, load_merges=True)
    assert meta["tokenizer.ggml.merges"] == special.merges
    written = {"bos": meta.get("tokenizer.ggml.bos_token_id"), "eos": meta.get("tokenizer.ggml.eos_token_id"),
               "pad": meta.get("tokenizer.ggml.padding_token_id"), "unk": meta.get("tokenizer.ggml.unknown_token_id")}
    assert {k: v for k, v in written.items() if v is not None} == special.special_token_ids
    assert by_id[written["eos"]] == "<|im_end|>" == tokenizer.eos_token
    assert by_id[written["pad"]] == "<|endoftext|>" == tokenizer.pad_token
    assert tokenizer.bos_token is None and by_id[written["bos"]] == "<|endoftext|>", "bos from config.json, as gguf"
    assert meta["tokenizer.ggml.add_bos_token"] is False and tokenizer("hi")["input_ids"] == tokenizer.encode("hi")
    assert meta["tokenizer.chat_template"] == tokenizer.chat_template == special.chat_template


def test_qwen2_split_regex_is_qwens():
    """The regex the exporter checks for is the one transformers' Qwen2Tokenizer builds; a tokenizer that splits
    otherwise (the tiny model's) is refused as Qwen2."""
    assert gx.QWEN2_SPLIT_REGEX == PRETOKENIZE_REGEX
    with pytest.raises(ValueError, match="does not split text as Qwen2's does.*convert_hf_to_gguf"):
        gx.qwen2_pre_tokenizer(AutoTokenizer.from_pretrained(build_tiny_model(progress=False)))


def test_qwen2_reloaded_tokenizer_gives_the_same_ids(qwen, qwen_files):
    _, tokenizer = qwen
    _, reloaded = gx.load_gguf(qwen_files["f16"])
    rows = gx.token_id_table(tokenizer, reloaded, QWEN_TEXTS)
    assert all(same for _, _, same in rows), [text for text, _, same in rows if not same]
    assert [tokenizer(t)["input_ids"] for t in QWEN_TEXTS] == [reloaded(t)["input_ids"] for t in QWEN_TEXTS], (
        "with add_special_tokens too: nothing (no BOS) is prepended by either"
    )
    assert (reloaded.eos_token, reloaded.pad_token) == (tokenizer.eos_token, tokenizer.pad_token)
    for messages in ([{"role": "user", "content": "hi"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]):
        assert reloaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
            tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        )


def test_qwen2_text_not_in_nfc_is_the_one_tokenizer_difference(qwen, qwen_files):
    """Qwen2's tokenizer NFC-normalises text first; a GGUF has no normaliser (transformers' rebuilt tokenizer has
    none): a decomposed "e + combining acute" tokenises differently, its composed form identically."""
    _, tokenizer = qwen
    _, reloaded = gx.load_gguf(qwen_files["f16"])
    assert tokenizer.backend_tokenizer.normalizer is not None and reloaded.backend_tokenizer.normalizer is None
    composed, decomposed = "caf\u00e9", "cafe\u0301"
    assert tokenizer.encode(composed) == reloaded.encode(composed) == tokenizer.encode(decomposed)
    assert reloaded.encode(decomposed) != tokenizer.encode(decomposed)


def test_planned_bytes_are_the_files_tensor_data(qwen_dir, qwen_files, merged_dir, exported):
    """From the config alone (meta device) the tensor bytes of every file are known; and at Qwen2.5-0.5B's real
    width an f32 file holds 4 bytes per published parameter (494,032,768, tied head counted once)."""
    for folder, files in ((qwen_dir, qwen_files), (merged_dir, exported)):
        config = AutoConfig.from_pretrained(folder)
        for dtype, path in files.items():
            in_file = sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)
            assert gx.planned_tensor_bytes(config, dtype) == in_file, (folder.name, dtype)
    assert gx.planned_tensor_bytes(qwen2_5_0_5b_config(), "f32") == 4 * 494_032_768


def test_openhermes_vocabulary_is_refused_with_the_converter_command(tmp_path):
    """The full profile's OpenHermes-2.5 tokenizer (SentencePiece-style BPE with byte fallback, as its stand-in's)
    is not byte-level BPE: refused before anything is written, naming llama.cpp's converter."""
    snapshot = standins.snapshot_dir(standins.build_standins(), standins.OPENHERMES_ID)
    with pytest.raises(ValueError, match=r"byte fallback.*'llama' tokenizer model.*convert_hf_to_gguf\.py"):
        gx.check_exportable(snapshot)
    with pytest.raises(ValueError, match="byte fallback"):
        gx.export_gguf(snapshot, tmp_path / "hermes.gguf", "q8_0")
    assert list(tmp_path.iterdir()) == []


def test_qwen2_refusals(qwen_dir, tmp_path):
    other = tmp_path / "sliding"
    shutil.copytree(qwen_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "use_sliding_window": True}))
    with pytest.raises(ValueError, match="use_sliding_window"):
        gx.check_exportable(other)
    no_bias = tmp_path / "no-bias"
    shutil.copytree(qwen_dir, no_bias)
    tensors = load_file(no_bias / "model.safetensors")
    del tensors["model.layers.1.self_attn.v_proj.bias"]
    save_file(tensors, no_bias / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"1 are missing, e\.g\. blk\.1\.attn_v\.bias"):
        gx.export_gguf(no_bias, tmp_path / "x.gguf", "f16")
    assert not (tmp_path / "x.gguf").exists()


T4_RUN = r"""
import json
from helpers import standins
standins.activate_standins()
import torch
from helpers import export_gguf as gx
from helpers.loading import largest_difference
from helpers.profiles import get_profile
profile = get_profile("t4")
folder = gx.find_or_build_merged(profile, "test", build_if_missing=True, steps=2)
merged = folder / "merged"
path = gx.export_gguf(merged, folder / "gguf" / "t4-test-f32.gguf", "f32")
model, tokenizer = gx.load_reference(merged)
reloaded, reloaded_tokenizer = gx.load_gguf(path)
prompt = tokenizer.apply_chat_template([{"role": "user", "content": "How do I make tea?"}], tokenize=False,
                                       add_generation_prompt=True)
a = gx.prompt_logits(model, tokenizer, [prompt])
b = gx.prompt_logits(reloaded, reloaded_tokenizer, [prompt])
print(json.dumps({"folder": folder.name, "architecture": gx.check_exportable(merged).name,
                  "source": json.loads((merged / "config.json").read_text())["architectures"],
                  "class": type(reloaded).__name__, "difference": largest_difference(a, b),
                  "same_ids": tokenizer(prompt)["input_ids"] == reloaded_tokenizer(prompt)["input_ids"]}))
"""


def test_t4_course_run_on_the_standins_exports_bit_identical(tmp_path):
    """The t4 path as a learner runs it, on the offline stand-ins in a fresh process (they must be activated
    before transformers is imported): train 2 DPO steps and merge (helpers.training, helpers.merging), export f32,
    reload with transformers: the very logits of the merged model."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(COURSE_STANDINS="1", COURSE_PROFILE="t4", COURSE_OUTPUT_DIR=str(tmp_path), PYTHONPATH=str(REPO_ROOT),
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", T4_RUN], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    facts = json.loads(result.stdout.strip().splitlines()[-1])
    assert facts == {"folder": "t4-test-short", "architecture": "qwen2", "source": ["Qwen2ForCausalLM"],
                     "class": "Qwen2ForCausalLM", "difference": 0.0, "same_ids": True}
