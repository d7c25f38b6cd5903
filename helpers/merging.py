"""Merging (notebook 05): what surrounds ``PeftModel.from_pretrained(...)`` and ``merge_and_unload()``, which the
notebook writes in its cells: a check that an adapter fits the base, the probe prompts a merge is checked on, the
dequantised NF4 base of a QLoRA merge, loading a merged folder, chatting as the model card does, and pushing only
when allowed. :func:`merge_run` is notebook 05's merge in one call, for notebooks that need another merged run.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from huggingface_hub import HfApi
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM, set_seed

from helpers.models import device_map, largest_difference, load_base_model, load_tokenizer, logits_of
from helpers.profiles import Profile
from helpers.runs import display_path, save_atomically

PROBES = ["<|im_start|>user\nWhat is a spoon used for?<|im_end|>\n<|im_start|>assistant\n",
          "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHow do I make tea?<|im_end|>\n"
          "<|im_start|>assistant\n"]


def probe_inputs(tokenizer) -> dict[str, torch.Tensor]:
    """The two ChatML probe prompts (one with a system turn), tokenised and padded: what a merge is checked on."""
    return dict(tokenizer(PROBES, return_tensors="pt", padding=True))


def check_adapter_fits(base, adapter_dir: str | Path) -> None:
    """Refuse an adapter whose LoRA matrices do not fit ``base``'s layers (trained on another base model)."""
    weights = Path(adapter_dir) / "adapter_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{display_path(adapter_dir)} holds no adapter: run notebook 04 first")
    modules = dict(base.named_modules())
    with safe_open(weights, framework="pt") as saved:
        for key in saved.keys():
            name = key.split(".lora_")[0].removeprefix("base_model.model.")
            layer, shape = modules.get(name), saved.get_slice(key).get_shape()
            if layer is None or not hasattr(layer, "in_features"):
                raise ValueError(f"the adapter targets {name!r}, which this base model does not have: it was "
                                 "trained on another base model")
            side, size = ("in", shape[1]) if ".lora_A" in key else ("out", shape[0])
            if size != getattr(layer, f"{side}_features"):
                raise ValueError(f"the adapter's {key} has shape {tuple(shape)}, but {name} has {side}_features="
                                 f"{getattr(layer, f'{side}_features')}: it was trained on another base model")


def dequantized_base(profile: Profile):
    """The base loaded in 4-bit NF4 as ``profile.bnb`` says and turned back into ordinary layers: the weights a
    QLoRA adapter was trained against (transformers' own ``dequantize()``), not the original ones."""
    return load_base_model(profile, four_bit=True).dequantize()


def merge_run(profile: Profile, run_folder: str | Path, *, overwrite: bool = True) -> tuple[Path, float]:
    """Notebook 05's merge in one call: ``<run>/adapter`` into the unquantised base, checked on the probe prompts,
    saved atomically as ``<run>/merged``. Returns the folder and the largest logit difference the merge made."""
    run_folder = Path(run_folder)
    base = load_base_model(profile, four_bit=False)
    check_adapter_fits(base, run_folder / "adapter")
    tokenizer = load_tokenizer(profile.model_id)
    model = PeftModel.from_pretrained(base, str(run_folder / "adapter"))
    before = logits_of(model, probe_inputs(tokenizer))
    merged = model.merge_and_unload()
    difference = largest_difference(before, logits_of(merged, probe_inputs(tokenizer)))

    def save(folder: Path) -> None:
        merged.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        (folder / "course_profile.json").write_text(profile.to_json())

    return save_atomically(save, run_folder / "merged", overwrite=overwrite), difference


def load_merged(folder: str | Path, dtype: str = "float32"):
    """A merged model (in ``dtype``: ``profile.dtype``) and its tokenizer, from the folder notebook 05 saved."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=device_map())
    return model.eval(), load_tokenizer(str(folder))


def chat(generator, messages: list[dict[str, str]], *, sample: bool = True, max_new_tokens: int = 64,
         seed: int = 0) -> str:
    """The assistant's answer to chat ``messages`` through a ``transformers.pipeline("text-generation")``, as the
    model card's usage section: the chat template, then sampling at temperature 0.7 and top-p 0.9 (``sample``), or
    greedy (deterministic, for checking)."""
    tokenizer = generator.tokenizer
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    set_seed(seed)
    how = dict(do_sample=True, temperature=0.7, top_p=0.9) if sample else dict(do_sample=False)
    out = generator(prompt, max_new_tokens=max_new_tokens, return_full_text=False, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id, **how)
    return out[0]["generated_text"].strip()


def hub_token() -> str | None:
    """The hub token from ``$HF_TOKEN``, else from Colab's secrets on Colab; never from a file."""
    try:
        from google.colab import userdata  # type: ignore[import-not-found]  # exists on Colab only

        return os.environ.get("HF_TOKEN") or userdata.get("HF_TOKEN")
    except Exception:  # not on Colab, or the secret is not shared with this notebook
        return os.environ.get("HF_TOKEN")


def push_to_hub_if_allowed(profile: Profile, folder: str | Path, repo_id: str | None, *, api=None) -> str:
    """Push a merged folder only for a real model (``profile.real_model``), a ``repo_id`` and a token; says what it
    did. The repository is made first (private): ``upload_folder`` alone fails on one that does not exist."""
    if not profile.real_model:
        return f"not pushed: profile {profile.name!r} is not a real model, and it never goes to the hub"
    if not repo_id:
        return "not pushed: no repository named (HUB_REPO_ID)"
    token = hub_token()
    if not token and api is None:
        return "not pushed: set HF_TOKEN in the environment (or Colab's secrets) to push"
    api = api or HfApi(token=token)
    api.create_repo(repo_id=repo_id, repo_type="model", private=True, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model")
    return f"pushed to https://huggingface.co/{repo_id}"
