"""Loading the chat model and tokenizer for a profile, in full precision or in 4-bit NF4.

transformers 5 removed ``from_pretrained(..., load_in_4bit=True)``, which the seed notebook used:
4-bit loading now goes through a :class:`transformers.BitsAndBytesConfig`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from helpers.hardware import compute_dtype
from helpers.profiles import Profile


def model_source(profile: Profile) -> str:
    """Where the profile's base model comes from: a local folder for ``tiny`` (built on demand), else a hub id."""
    if profile.model.name == "tiny":
        from helpers.tiny_model import build_tiny_model

        return str(build_tiny_model(progress=True))
    return profile.model.name


def bnb_config(profile: Profile, *, quant_storage: torch.dtype | None = None):
    """The 4-bit NF4 quantisation config of the recipe (double quantisation, compute dtype by hardware).

    ``quant_storage``: the dtype the packed 4-bit values are stored in; None keeps bitsandbytes' uint8.
    FSDP-QLoRA needs it equal to the compute dtype (and to the model's dtype): FSDP shards only floating-point
    tensors, and only tensors of one dtype together (see :func:`load_model` and docs/scale_out.md).
    """
    from transformers import BitsAndBytesConfig

    q = profile.quantization
    extra = {"bnb_4bit_quant_storage": quant_storage} if quant_storage is not None else {}
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=compute_dtype(q.compute_dtype),
        **extra,
    )


def fsdp_enabled() -> bool:
    """True inside ``accelerate launch`` with an FSDP config (accelerate sets $ACCELERATE_USE_FSDP)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").strip().lower() in {"1", "true", "yes"}


def local_cuda_device() -> int:
    """This process's GPU: $LOCAL_RANK in a multi-process launch (torchrun, accelerate launch), else the current one."""
    return int(os.environ["LOCAL_RANK"]) if "LOCAL_RANK" in os.environ else torch.cuda.current_device()


def check_tokenizer(tokenizer, source: str = "tokenizer") -> None:
    """Refuse a tokenizer the recipe cannot train with: no chat template, or pad == eos."""
    if not tokenizer.chat_template:
        raise ValueError(f"{source} has no chat template; the recipe needs a ChatML chat model's tokenizer")
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise ValueError(
            f"{source}: pad token {tokenizer.pad_token!r} is the eos token; padding would be masked as "
            "end-of-turn and the model would learn never to stop. Set a separate pad token first."
        )


def load_tokenizer(profile: Profile, source: str | None = None):
    """The profile's tokenizer, with right padding and a pad token distinct from eos (checked)."""
    from transformers import AutoTokenizer

    source = source or model_source(profile)
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # Hub chat models sometimes ship pad == eos; an unused special token is the usual fix.
        vocab = tokenizer.get_vocab()
        for candidate in ("<|endoftext|>", "<unk>", "<pad>"):
            if candidate in vocab and vocab[candidate] != tokenizer.eos_token_id:
                tokenizer.pad_token = candidate
                break
    tokenizer.padding_side = "right"
    check_tokenizer(tokenizer, source)
    return tokenizer


@contextlib.contextmanager
def _loading_bars(enabled: bool) -> Iterator[None]:
    """Switch transformers' own progress bars (e.g. "Loading weights") on or off for one block."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if before else hf_logging.disable_progress_bar)()


def load_model(
    profile: Profile,
    *,
    four_bit: bool | None = None,
    source: str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool | None = None,
):
    """The profile's base model, in 4-bit NF4 when ``four_bit`` (default: the profile's setting).

    In 4-bit, the linear layers of the decoder are stored as NF4 and compute in the profile's compute dtype
    (float32 for tiny on CPU, bf16/fp16 on a GPU); embeddings, norms and ``lm_head`` stay in that dtype.
    Never ``trust_remote_code``; weights only from safetensors. ``progress``: show transformers'
    "Loading weights" bar (default: only for a hub model; a local one loads in a blink and the bar would
    only clutter the notebook output). Hub download bars are not affected.
    """
    from transformers import AutoModelForCausalLM

    source = source or model_source(profile)
    four_bit = profile.quantization.load_in_4bit if four_bit is None else four_bit
    kwargs: dict = {"use_safetensors": True, "trust_remote_code": False}
    if four_bit:
        # under FSDP the packed 4-bit weights are stored in the compute dtype, the dtype of the whole model
        storage = compute_dtype(profile.quantization.compute_dtype) if fsdp_enabled() else None
        kwargs["quantization_config"] = bnb_config(profile, quant_storage=storage)
        kwargs["dtype"] = compute_dtype(profile.quantization.compute_dtype)
    else:
        kwargs["dtype"] = dtype or (torch.float32 if not torch.cuda.is_available() else compute_dtype("auto"))
    if torch.cuda.is_available():
        kwargs["device_map"] = {"": local_cuda_device()}  # each process of a multi-GPU launch on its own GPU
    with _loading_bars(not is_local_model(source) if progress is None else progress):
        return AutoModelForCausalLM.from_pretrained(source, **kwargs)


@torch.no_grad()
def max_logit_difference(model_a, model_b, input_ids: torch.Tensor) -> float:
    """The largest absolute difference between the logits two models give the same ``input_ids`` ([batch, seq]).

    Used to see what 4-bit storage costs: 0.0 means identical outputs; compare with the logits' own scale.
    """
    logits = []
    for model in (model_a, model_b):
        model.eval()
        device = next(model.parameters()).device
        logits.append(model(input_ids=input_ids.to(device)).logits.float().cpu())
    return (logits[0] - logits[1]).abs().max().item()


def quantized_layer_names(model) -> list[str]:
    """Names of the linear layers stored in 4-bit (bitsandbytes ``Linear4bit``)."""
    import bitsandbytes as bnb

    return [name for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)]


def is_local_model(path: str | Path) -> bool:
    """True when ``path`` is a folder holding a saved model."""
    return (Path(path) / "config.json").exists()
