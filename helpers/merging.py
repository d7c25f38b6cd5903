"""Merging the LoRA adapter into the base weights (notebook 05): checking the merge, saving and using the result.

After training, the adapter (a few MB) sits beside the frozen base. Merging folds ``B @ A * alpha / r``
into each adapted weight so the model runs without PEFT - the form the model card published.
The base is reloaded in half precision on a GPU (full precision on CPU), never in 4-bit: merging into
quantised weights would round the adapter away.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import HfApi
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers import pipeline as hf_pipeline
from transformers import set_seed as hf_set_seed

from helpers.hardware import compute_dtype
from helpers.loading import largest_difference, load_model, load_tokenizer, logits_of, model_source
from helpers.profiles import Profile
from helpers.saving import save_atomically
from helpers.standins import standins_active

MERGED_DIRNAME = "merged"
ADAPTER_DIRNAME = "adapter"  # what helpers.training writes into a run folder


class AdapterMismatchError(ValueError):
    """The adapter was trained on another base model (its shapes or config do not fit)."""


def check_adapter_fits(base_model, adapter_dir: str | Path) -> None:
    """Refuse an adapter whose LoRA matrices do not fit the base model's layers, before anything is written."""
    adapter_dir = Path(adapter_dir)
    config_file = adapter_dir / "adapter_config.json"
    weights_file = adapter_dir / "adapter_model.safetensors"
    if not config_file.exists() or not weights_file.exists():
        raise FileNotFoundError(
            f"{adapter_dir} holds no adapter (adapter_config.json and adapter_model.safetensors); run notebook 04 first"
        )
    modules = dict(base_model.named_modules())
    with safe_open(weights_file, framework="pt") as weights:
        for key in weights.keys():
            if "lora_A" not in key and "lora_B" not in key:
                continue
            module_name = key.split(".lora_")[0].removeprefix("base_model.model.")
            module = modules.get(module_name)
            shape = tuple(weights.get_slice(key).get_shape())
            if module is None or not hasattr(module, "in_features"):
                raise AdapterMismatchError(
                    f"adapter {adapter_dir} targets {module_name!r}, which the base model does not have: "
                    "it was trained on another base model"
                )
            expected = module.in_features if "lora_A" in key else module.out_features
            got = shape[1] if "lora_A" in key else shape[0]
            if got != expected:
                raise AdapterMismatchError(
                    f"adapter {adapter_dir}: {key} has shape {shape} but {module_name} has "
                    f"{'in' if 'lora_A' in key else 'out'}_features={expected}: it was trained on another base model"
                )


@dataclass
class MergeResult:
    """Where the merged model went and how closely it matches base + adapter."""

    path: Path
    max_logit_diff: float
    dtype: str


def probe_inputs(tokenizer, device) -> dict[str, torch.Tensor]:
    """Two ChatML probe prompts (one with a system turn), tokenised and padded: what a merge is checked on."""
    prompts = [
        "<|im_start|>user\nWhat is a spoon used for?<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHow do I make tea?<|im_end|>\n",
    ]
    return tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)


def refuse_existing(out_dir: str | Path, overwrite: bool) -> Path:
    """``out_dir`` as a Path; refuses a folder that already holds a merged model unless ``overwrite``."""
    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already holds a merged model; pass overwrite=True to replace it")
    return out_dir


def merge_with_check(with_adapter, tokenizer) -> tuple[torch.nn.Module, float]:
    """``merge_and_unload()`` a PEFT model, and the largest logit difference it made on two probe prompts."""
    inputs = probe_inputs(tokenizer, next(with_adapter.parameters()).device)
    before = logits_of(with_adapter, inputs)
    merged = with_adapter.merge_and_unload()
    return merged, largest_difference(before, logits_of(merged, inputs))


def save_merged(merged, tokenizer, profile: Profile, out_dir: str | Path, max_diff: float, *,
                overwrite: bool = False) -> MergeResult:
    """Save a merged model with its tokenizer (and chat template), the resolved profile and the merge check.

    Written to a temporary folder and renamed into ``out_dir``: a crash mid-save leaves any previous one intact. An
    existing ``out_dir`` is only replaced when ``overwrite`` is True.
    """
    out_dir = refuse_existing(out_dir, overwrite)

    def _save(folder: Path) -> None:
        merged.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        (folder / "course_profile.json").write_text(profile.to_json())
        (folder / "merge_check.json").write_text(json.dumps({"max_logit_diff": max_diff}))

    save_atomically(_save, out_dir, overwrite=overwrite)
    return MergeResult(out_dir, max_diff, str(next(merged.parameters()).dtype).removeprefix("torch."))


def merge_adapter(
    profile: Profile, adapter_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False
) -> MergeResult:
    """Load the base (fp32 on CPU, half on GPU), attach the adapter, merge it, verify the logits and save.

    What notebook 05 does cell by cell with ``PeftModel.from_pretrained`` and ``merge_and_unload``: the largest logit
    difference between base+adapter and the merged model is measured on two probe prompts (:func:`merge_with_check`)
    and the result saved atomically (:func:`save_merged`).
    """
    out_dir = refuse_existing(out_dir, overwrite)  # before anything is loaded
    source = model_source(profile)
    tokenizer = load_tokenizer(profile, source)
    base = load_model(profile, four_bit=False, source=source)
    check_adapter_fits(base, adapter_dir)
    merged, max_diff = merge_with_check(PeftModel.from_pretrained(base, str(adapter_dir)), tokenizer)
    return save_merged(merged, tokenizer, profile, out_dir, max_diff, overwrite=overwrite)


def dequantized_base(profile: Profile, source: str | None = None):
    """The profile's base loaded in 4-bit NF4 and turned back into ordinary full-precision layers.

    Its weights are the NF4 values the adapter of a QLoRA run was trained against, not the original ones: merging
    an adapter into this base gives exactly the model that was trained and evaluated (notebook 05, "the QLoRA merge
    gap"). ``dequantize()`` is transformers' own conversion of a bitsandbytes model.
    """
    return load_model(profile, four_bit=True, source=source).dequantize()


def merge_run(profile: Profile, run_folder: str | Path, *, overwrite: bool = False) -> MergeResult:
    """Merge ``<run>/adapter`` into the base and save ``<run>/merged`` (see :func:`merge_adapter`)."""
    run_folder = Path(run_folder)
    return merge_adapter(profile, run_folder / ADAPTER_DIRNAME, run_folder / MERGED_DIRNAME, overwrite=overwrite)


def load_merged(path: str | Path):
    """The merged model and its tokenizer from a folder (fp32 on CPU, half precision on GPU)."""
    dtype = compute_dtype("auto")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True, trust_remote_code=False)
    if torch.cuda.is_available():
        model.to("cuda")
    return model, AutoTokenizer.from_pretrained(path)


def chat(
    path_or_pipeline, messages: list[dict[str, str]], *, sample: bool = True, max_new_tokens: int = 64, seed: int = 0
):
    """Answer chat messages with ``transformers.pipeline("text-generation")``, as the model card's usage section.

    ``sample=True`` uses the card's settings (temperature 0.7, top_p 0.9); ``sample=False`` is greedy,
    deterministic, for checking. Returns the assistant's answer text.
    """
    generator = path_or_pipeline
    if isinstance(path_or_pipeline, str | Path):
        model, tokenizer = load_merged(path_or_pipeline)
        generator = hf_pipeline("text-generation", model=model, tokenizer=tokenizer)
    tokenizer = generator.tokenizer
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    hf_set_seed(seed)
    kwargs = dict(do_sample=True, temperature=0.7, top_p=0.9) if sample else dict(do_sample=False)
    out = generator(
        prompt,
        max_new_tokens=max_new_tokens,
        return_full_text=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **kwargs,
    )
    return out[0]["generated_text"].strip()


def hub_token() -> str | None:
    """The hub token from ``$HF_TOKEN``, else from Colab's secrets when running there; never from a file."""
    token = os.environ.get("HF_TOKEN")
    if token:
        return token
    try:  # Colab secrets, when running there
        from google.colab import userdata  # type: ignore[import-not-found]  # exists on Colab only

        return userdata.get("HF_TOKEN")
    except Exception:  # not on Colab, or the secret is not shared with this notebook
        return None


def push_to_hub_if_allowed(
    profile: Profile, merged_dir: str | Path, repo_id: str, *, private: bool = True, api: HfApi | None = None
) -> str:
    """Push the merged model only when a token is in the environment and the profile is a real one.

    Never pushes in the tiny profile (nor on the offline stand-ins); the token is read from $HF_TOKEN (or Colab
    secrets), never written. The repository is created first (``exist_ok``, private unless ``private=False``):
    ``upload_folder`` alone fails on a repository that does not exist yet. ``api``: an ``HfApi`` to use instead of
    one made from the token (tests pass a recording stand-in).
    """
    if profile.name == "tiny":
        return "not pushed: the tiny profile never pushes to the hub"
    if standins_active():
        return "not pushed: this run uses offline stand-ins, not the real model"
    token = hub_token()
    if not token and api is None:
        return "not pushed: set HF_TOKEN in the environment (or Colab secrets) to push"
    api = api or HfApi(token=token)
    api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(folder_path=str(merged_dir), repo_id=repo_id, repo_type="model")
    return f"pushed to https://huggingface.co/{repo_id}"
