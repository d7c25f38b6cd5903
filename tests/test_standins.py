"""The standins package (test support): the offline stand-ins load under the real hub ids, look like the real models
and data, and are built deterministically; activation refuses to come too late.

The stand-ins are built once per session into a temporary COURSE_CACHE_DIR (seconds). What the course sees is
checked in a fresh Python process that activates them first, as the course does, and then loads everything by
hub id with transformers and datasets (and the course's own loaders); that process reports what it found.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

import standins
from helpers.profiles import REPO_ROOT
from standins import build

QWEN, HERMES, ORCA = "Qwen/Qwen2.5-0.5B-Instruct", "teknium/OpenHermes-2.5-Mistral-7B", "Intel/orca_dpo_pairs"
QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


def _child_env(cache: Path, **extra: str) -> dict[str, str]:
    """This process's environment without any Hugging Face or stand-in setting, with ``cache`` as the cache."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_")) and k != standins.ENV_VAR}
    env.update(COURSE_CACHE_DIR=str(cache), PYTHONPATH=str(REPO_ROOT), TOKENIZERS_PARALLELISM="false", **extra)
    return env


def _run(code: str, env: dict[str, str]) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON object as its last line."""
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def standin_cache(tmp_path_factory) -> Path:
    """A private COURSE_CACHE_DIR holding the tiny stand-ins, built once (the environment is restored after)."""
    cache = tmp_path_factory.mktemp("standin-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COURSE_CACHE_DIR", str(cache))
        build.build_standins()
    return cache


@pytest.fixture(scope="session")
def standin_home(standin_cache) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COURSE_CACHE_DIR", str(standin_cache))
        return build.standins_home()


PROBE = r'''
import io, json, sys, contextlib
import standins
home = standins.activate_cache()          # first thing, as helpers.notebook.start does
notes = {}
for name in ("t4", "full"):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        profile = standins.activate(name)
    notes[name] = {"note": out.getvalue(), "real_model": profile.real_model, "tasks": profile.lm_eval["tasks"],
                   "rounds_steps": profile.on_policy["round_steps"]}
facts = {"home": str(home), "width": standins.requested_width(), "notes": notes}
import torch
import datasets
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

def prompt_ids(tok, row):
    messages = ([{"role": "system", "content": row["system"]}] if row["system"].strip() else [])
    text = tok.apply_chat_template(messages + [{"role": "user", "content": row["question"]}],
                                   add_generation_prompt=True, tokenize=False)
    return len(tok(text, add_special_tokens=False).input_ids)

ds = datasets.load_dataset("Intel/orca_dpo_pairs", split="train")
rows = ds.to_list()
facts["data"] = {"columns": ds.column_names, "rows": rows}
user = [{"role": "user", "content": "hi"}]
with_system = [{"role": "system", "content": "Be brief."}] + user
sample = "Grüße, naïve café 🦙 — 42"
for key, repo in (("qwen", "Qwen/Qwen2.5-0.5B-Instruct"), ("hermes", "teknium/OpenHermes-2.5-Mistral-7B")):
    config = AutoConfig.from_pretrained(repo)
    tok = AutoTokenizer.from_pretrained(repo)
    model = AutoModelForCausalLM.from_pretrained(repo)
    gen = GenerationConfig.from_pretrained(repo)
    names = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>", "<s>", "</s>")
    with torch.no_grad():
        logits = model(**tok("hello there", return_tensors="pt")).logits
    attn = model.model.layers[0].self_attn
    facts[key] = {
        "config": config.to_dict(), "config_class": type(config).__name__, "model_class": type(model).__name__,
        "tokenizer_class": type(tok).__name__, "len": len(tok),
        "ids": {n: tok.convert_tokens_to_ids(n) for n in names if n in tok.get_vocab()},
        "eos": [tok.eos_token, tok.eos_token_id], "pad": [tok.pad_token, tok.pad_token_id],
        "bos": [tok.bos_token, tok.bos_token_id], "unk": tok.unk_token,
        "chat_user": tok.apply_chat_template(user, add_generation_prompt=True, tokenize=False),
        "chat_system": tok.apply_chat_template(with_system, add_generation_prompt=True, tokenize=False),
        "encode_hi": tok("hi").input_ids, "pieces": tok.tokenize(sample),
        "roundtrip": tok.decode(tok(sample, add_special_tokens=False).input_ids) == sample,
        "generation": gen.to_dict(), "logits_width": logits.shape[-1],
        "tied": model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(),
        "q_bias": attn.q_proj.bias is not None, "o_bias": attn.o_proj.bias is not None,
        "prompt_lengths": [prompt_ids(tok, r) for r in rows],
        "pair_lengths": [prompt_ids(tok, r) + max(len(tok(r[k] + tok.eos_token, add_special_tokens=False).input_ids)
                                                  for k in ("chosen", "rejected")) for r in rows],
    }

course = {}
try:  # the course's own loaders, unchanged, on the GPU profiles
    from helpers.profiles import get_profile
    from helpers.data import load_preference_data
    from helpers.models import load_tokenizer
    for name in ("t4", "full"):
        profile = get_profile(name, allow_cpu=True)
        with contextlib.redirect_stdout(io.StringIO()):
            split = load_preference_data(profile)
        tok = load_tokenizer(profile.model_id)
        course[name] = {"train": len(split["train"]), "heldout": len(split["heldout"]),
                        "pad": tok.pad_token, "eos": tok.eos_token, "model": profile.model_id}
except Exception as exc:
    course["error"] = f"{type(exc).__name__}: {exc}"
facts["course"] = course
standins.activate_cache()  # a second call, libraries already pointed here: fine
facts["env"] = {k: __import__("os").environ.get(k) for k in ("HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
                                                            "TRANSFORMERS_OFFLINE", "COURSE_STANDINS")}
print(json.dumps(facts))
'''


@pytest.fixture(scope="module")
def probe(standin_cache) -> dict:
    """What a fresh process finds after activating the stand-ins (run once for this module)."""
    return _run(PROBE, _child_env(standin_cache))


# ------------------------------------------------------------------------------------------ activation


def test_activation_points_the_libraries_at_the_standins(probe, standin_home):
    assert Path(probe["home"]) == standin_home.resolve()
    assert probe["width"] == "tiny"
    assert probe["env"] == {"HF_HOME": str(standin_home.resolve()), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                            "TRANSFORMERS_OFFLINE": "1", "COURSE_STANDINS": "1"}
    for name, model in (("t4", QWEN), ("full", HERMES)):
        note = probe["notes"][name]
        assert "STAND-INS" in note["note"] and "NOT the real model and data" in note["note"] and model in note["note"]
        assert not note["real_model"], "a stand-in run must never push to the hub"
        assert note["tasks"] == ["course_preferences"]  # the card's suite needs the hub


def test_activation_after_a_library_import_is_refused_and_changes_nothing(standin_cache, tmp_path):
    code = r'''
import json, os, sys
import standins
clean = not any(m in sys.modules for m in ("huggingface_hub", "transformers", "datasets", "tokenizers"))
import transformers  # reads HF_HOME and HF_HUB_OFFLINE now (huggingface_hub.constants)
try:
    standins.activate_cache()
    outcome = "activated"
except standins.StandinsActivationError as exc:
    outcome = str(exc)
print(json.dumps({"clean_import": clean, "outcome": outcome, "hf_home": os.environ.get("HF_HOME"),
                  "switch": os.environ.get("COURSE_STANDINS")}))
'''
    elsewhere = str(tmp_path / "elsewhere")
    facts = _run(code, _child_env(standin_cache, HF_HOME=elsewhere))
    assert facts["clean_import"], "importing standins must not import any Hugging Face library"
    assert "too late" in facts["outcome"] and "huggingface_hub" in facts["outcome"]
    assert facts["hf_home"] == elsewhere and facts["switch"] is None


def test_the_switch(monkeypatch):
    monkeypatch.delenv(standins.ENV_VAR, raising=False)
    assert standins.requested_width() is None
    for value, width in (("1", "tiny"), ("true", "tiny"), ("real", "real")):
        monkeypatch.setenv(standins.ENV_VAR, value)
        assert standins.requested_width() == width
    monkeypatch.setenv(standins.ENV_VAR, "0")
    assert standins.requested_width() is None
    monkeypatch.setenv(standins.ENV_VAR, "maybe")
    with pytest.raises(ValueError, match="COURSE_STANDINS"):
        standins.requested_width()
    with pytest.raises(ValueError, match="width"):
        standins.StandinRecipe(width="huge")


# ------------------------------------------------------------------------------------------ the Qwen stand-in


def test_qwen_standin_has_the_real_structure(probe):
    q = probe["qwen"]
    config = q["config"]
    assert q["config_class"] == "Qwen2Config" and q["model_class"] == "Qwen2ForCausalLM"
    assert config["model_type"] == "qwen2" and config["tie_word_embeddings"] and q["tied"]
    assert config["num_attention_heads"] == 14 and config["num_key_value_heads"] == 2
    assert q["q_bias"] and not q["o_bias"]  # Qwen2: biases on q/k/v only
    assert config["rope_parameters"]["rope_theta"] == 1e6 and config["rms_norm_eps"] == 1e-6
    assert not config["use_sliding_window"] and config["max_position_embeddings"] == 32768
    assert config["vocab_size"] % 128 == 0 and config["vocab_size"] > q["len"]  # padded, as 151936 > 151665
    assert q["logits_width"] == config["vocab_size"]


def test_qwen_standin_tokenizer_follows_qwen(probe):
    q = probe["qwen"]
    first = q["len"] - 22  # Qwen2.5 adds 22 tokens after its BPE vocabulary, <|endoftext|> first
    assert q["tokenizer_class"] == "Qwen2Tokenizer"
    assert [q["ids"]["<|endoftext|>"], q["ids"]["<|im_start|>"], q["ids"]["<|im_end|>"]] == [first, first + 1,
                                                                                              first + 2]
    assert q["eos"] == ["<|im_end|>", first + 2] and q["pad"] == ["<|endoftext|>", first]
    assert q["bos"] == [None, None] and q["unk"] is None
    assert q["config"]["bos_token_id"] == first and q["config"]["eos_token_id"] == first + 2
    assert all(i < first for i in q["encode_hi"])  # no bos: nothing is added around the text
    assert q["roundtrip"] and "Ġ" in "".join(q["pieces"])  # byte-level BPE


def test_qwen_standin_chat_template_is_qwens(probe):
    q = probe["qwen"]
    assert q["chat_user"] == (
        f"<|im_start|>system\n{QWEN_DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert q["chat_system"] == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_qwen_standin_generation_config_mirrors_qwens(probe):
    q = probe["qwen"]
    first = q["len"] - 22
    gen = q["generation"]
    assert gen["eos_token_id"] == [first + 2, first] and gen["pad_token_id"] == first == gen["bos_token_id"]
    assert gen["do_sample"] and (gen["temperature"], gen["top_p"], gen["top_k"]) == (0.7, 0.8, 20)
    assert gen["repetition_penalty"] == 1.1


def test_real_width_qwen_config_counts_the_real_parameters():
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = build.qwen_standin_config(standins.StandinRecipe(width="real"), first_added_id=2000)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == 494_032_768  # Qwen2.5-0.5B's published count
    real = Qwen2Config(**build.published.QWEN2_5_0_5B_CONFIG).to_dict()
    built = config.to_dict()
    assert (built.pop("bos_token_id"), built.pop("eos_token_id")) == (2000, 2002)
    real.pop("bos_token_id"), real.pop("eos_token_id")
    assert built == real


# ------------------------------------------------------------------------------------------ the OpenHermes stand-in


def test_openhermes_standin_has_the_real_structure(probe, standin_home):
    h = probe["hermes"]
    config = h["config"]
    assert h["config_class"] == "MistralConfig" and h["model_class"] == "MistralForCausalLM"
    assert not config["tie_word_embeddings"] and not h["tied"]
    assert config["num_attention_heads"] // config["num_key_value_heads"] == 4  # as 32 / 8
    assert (config["sliding_window"], config["rms_norm_eps"], config["bos_token_id"]) == (4096, 1e-5, 1)
    assert config["vocab_size"] == h["len"] == h["logits_width"]  # 32002 = 32000 + 2, no padding
    shards = sorted(p.name for p in build.snapshot_dir(standin_home, HERMES).glob("*.safetensors"))
    assert shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]


def test_openhermes_standin_tokenizer_follows_openhermes(probe):
    h = probe["hermes"]
    base = h["len"] - 2
    assert h["ids"]["<|im_end|>"] == base and h["ids"]["<|im_start|>"] == base + 1  # like 32000 and 32001
    assert [h["ids"][t] for t in ("<unk>", "<s>", "</s>")] == [0, 1, 2]
    assert h["eos"] == ["<|im_end|>", base] == ["<|im_end|>", h["config"]["eos_token_id"]]
    assert h["pad"] == ["</s>", 2]  # OpenHermes-2.5 sets a pad token: </s>, not the eos token
    assert h["bos"] == ["<s>", 1] and h["encode_hi"][0] == 1  # add_bos_token
    assert h["pieces"][0].startswith("▁") and "<0xF0>" in h["pieces"]  # sentencepiece style, byte fallback
    assert h["roundtrip"]
    assert h["generation"]["eos_token_id"] == base and h["generation"]["bos_token_id"] == 1


def test_openhermes_standin_chat_template_is_plain_chatml(probe):
    h = probe["hermes"]
    assert h["chat_user"] == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert h["chat_system"] == "<|im_start|>system\nBe brief.<|im_end|>\n" + h["chat_user"]


def test_openhermes_standin_files_mirror_the_real_ones(standin_home):
    folder = build.snapshot_dir(standin_home, HERMES)
    special = json.loads((folder / "special_tokens_map.json").read_text())
    assert special == {"bos_token": "<s>", "eos_token": "<|im_end|>", "pad_token": "</s>", "unk_token": "<unk>"}
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "LlamaTokenizer" and config["add_bos_token"] and config["legacy"]
    added = json.loads((folder / "added_tokens.json").read_text())
    assert added["<|im_start|>"] == added["<|im_end|>"] + 1


# ------------------------------------------------------------------------------------------ the data set


def test_dataset_loads_by_hub_id_with_the_real_columns(probe):
    data = probe["data"]
    assert data["columns"] == ["system", "question", "chosen", "rejected"]  # the real order, no "kind"
    assert len(data["rows"]) >= 420
    assert data["rows"] == build.standin_rows()  # generated by code, deterministically


def test_dataset_holds_the_awkward_rows(probe):
    rows = probe["data"]["rows"]
    systems = [r["system"] for r in rows]
    assert systems.count("") >= 100 and len({s for s in systems if s.strip()}) >= 5
    assert sum(1 for s in systems if s and not s.strip()) == 1  # a system prompt of only spaces
    counts = Counter(tuple(r.values()) for r in rows)
    assert sorted(counts.values(), reverse=True)[:2] == [2, 1]  # exactly one exact duplicate
    assert sum(r["chosen"] == r["rejected"] for r in rows) == 1
    assert any("<|im_start|>" in r["question"] or "<|im_end|>" in r["question"] for r in rows)
    assert any("```python" in r["chosen"] for r in rows) and any("\n## " in r["chosen"] for r in rows)
    assert any("**" in r["chosen"] for r in rows)


@pytest.mark.parametrize("key,max_prompt,max_length", [("qwen", 512, 768), ("hermes", 1024, 1536)])
def test_dataset_exceeds_the_profiles_length_limits(probe, key, max_prompt, max_length):
    prompts, pairs = probe[key]["prompt_lengths"], probe[key]["pair_lengths"]
    too_long_prompt = sum(p > max_prompt for p in prompts)
    too_long_pair = sum(p <= max_prompt and q > max_length for p, q in zip(prompts, pairs))
    fit = sum(p <= max_prompt and q <= max_length for p, q in zip(prompts, pairs))
    assert too_long_prompt >= 3 and too_long_pair >= 3 and fit >= len(prompts) // 2


def test_the_course_loaders_run_unchanged_on_the_standins(probe):
    course = probe["course"]
    assert "error" not in course, course.get("error")
    rows = len(probe["data"]["rows"])
    for name, model, pad in (("t4", QWEN, "<|endoftext|>"), ("full", HERMES, "</s>")):
        assert course[name]["model"] == model and course[name]["heldout"] == 200
        assert course[name]["train"] == rows - 2 - 200  # the identical pair and the duplicate are dropped
        assert course[name]["pad"] == pad and course[name]["eos"] == "<|im_end|>"


# ------------------------------------------------------------------------------------------ building


def _files(home: Path) -> dict[str, bytes]:
    return {str(p.relative_to(home)): p.read_bytes() for p in sorted(home.rglob("*"))
            if p.is_file() and p.name != standins.MARKER and not p.name.endswith(".lock")}


def test_build_is_deterministic(standin_home, tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_CACHE_DIR", str(tmp_path))
    other = build.build_standins()
    assert other.name == standin_home.name and other != standin_home
    first, second = _files(standin_home), _files(other)
    assert sorted(first) == sorted(second)
    assert [name for name in first if first[name] != second[name]] == []
    info = json.loads((other / standins.MARKER).read_text())
    assert info["kind"] == "course-standins" and info["build_seconds"] < 60 and info["dataset"]["rows"] >= 420


def test_a_second_build_reuses_the_cache(standin_cache, standin_home, monkeypatch):
    monkeypatch.setenv("COURSE_CACHE_DIR", str(standin_cache))
    before = (standin_home / standins.MARKER).stat().st_mtime_ns
    assert build.build_standins() == standin_home
    assert (standin_home / standins.MARKER).stat().st_mtime_ns == before


def test_an_interrupted_build_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_CACHE_DIR", str(tmp_path))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # after the data set and a snapshot folder were written

    monkeypatch.setattr(build, "_write_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build.build_standins()
    assert list((tmp_path / "standins").iterdir()) == []
