"""GGUF export (helpers.export_gguf): round trips through transformers' GGUF loader, tokenizer, metadata.

The merged model is built here (the tiny base + a LoRA adapter with seeded random B, merged by
helpers.merging), so the tests do not depend on the notebooks having run.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from helpers import export_gguf as gx

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
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from helpers.lora import lora_config
    from helpers.merging import merge_adapter
    from helpers.profiles import get_profile

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
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

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


def test_f32_round_trip_is_bit_identical(merged, exported):
    model, tokenizer = merged
    reloaded, reloaded_tokenizer = gx.load_gguf(exported["f32"])
    assert reloaded.config.model_type == "llama"
    original = gx.prompt_logits(model, tokenizer, PROMPTS)
    for a, b in zip(original, gx.prompt_logits(reloaded, reloaded_tokenizer, PROMPTS)):
        assert torch.equal(a, b), f"f32 logits differ by {(a - b).abs().max().item()}"


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_f16_and_q8_0_differ_only_by_rounding(merged, exported, dtype):
    model, tokenizer = merged
    reloaded, reloaded_tokenizer = gx.load_gguf(exported[dtype])
    from_file = gx.prompt_logits(reloaded, reloaded_tokenizer, PROMPTS)
    # exactly what rounding the weights the same way gives: nothing else is lost or changed
    assert gx.max_logit_difference(gx.prompt_logits(gx.rounded_copy(model, dtype), tokenizer, PROMPTS), from_file) == 0
    original = gx.prompt_logits(model, tokenizer, PROMPTS)
    scale = max(logits.abs().max().item() for logits in original)
    difference = gx.max_logit_difference(original, from_file)
    assert 0 < difference < MAX_RELATIVE_LOGIT_DIFF[dtype] * scale, f"{dtype}: {difference} for logits up to {scale}"


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
    import safetensors

    reads = []
    real = safetensors.safe_open

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

    monkeypatch.setattr(safetensors, "safe_open", CountingOpen)
    gx.export_gguf(merged_dir, tmp_path / "model.gguf", "f32")
    assert sorted(reads) == sorted(gx.safetensors_files(merged_dir)), "each tensor read exactly once"


def test_refuses_what_it_cannot_export(merged_dir, tmp_path):
    other = tmp_path / "qwen"
    shutil.copytree(merged_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "qwen2"}))
    with pytest.raises(ValueError, match="not llama-shaped"):
        gx.export_gguf(other, tmp_path / "qwen.gguf", "f16")
    with pytest.raises(FileNotFoundError, match="run notebooks 04 and 05"):
        gx.export_gguf(tmp_path / "missing", tmp_path / "x.gguf", "f16")
