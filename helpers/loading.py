"""Loading the chat model and tokenizer for a profile, in full precision or in 4-bit NF4 (notebook 02), and what the
recipe's memory adds up to.

transformers 5 removed ``from_pretrained(..., load_in_4bit=True)``, which the seed notebook used: 4-bit loading now
goes through a :class:`transformers.BitsAndBytesConfig`. The memory accounting counts a real model structure built on
PyTorch's ``meta`` device: the modules and parameter shapes exist, their storage does not, so Mistral-7B's 7.2 billion
parameters can be counted on a laptop without a download.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import bitsandbytes as bnb
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from transformers.utils import logging as hf_logging

from helpers.architectures import MISTRAL_7B_SHAPE, OPENHERMES_VOCAB, meta_model, mistral_config
from helpers.hardware import compute_dtype
from helpers.lora import count_parameters, lora_config
from helpers.profiles import Profile
from helpers.tiny_model import build_tiny_model


def model_source(profile: Profile) -> str:
    """Where the profile's base model comes from: a local folder for ``tiny`` (built on demand), else a hub id."""
    if profile.model.name == "tiny":
        return str(build_tiny_model(progress=True))
    return profile.model.name


def bnb_config(profile: Profile, *, quant_storage: torch.dtype | None = None):
    """The 4-bit NF4 quantisation config of the recipe (double quantisation, compute dtype by hardware).

    ``quant_storage``: the dtype the packed 4-bit values are stored in; None keeps bitsandbytes' uint8.
    FSDP-QLoRA needs it equal to the compute dtype (and to the model's dtype): FSDP shards only floating-point
    tensors, and only tensors of one dtype together (see :func:`load_model` and docs/scale_out.md).
    """
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
            f"{source}: pad token {tokenizer.pad_token!r} is the eos token. DPO itself would cope (TRL's preference "
            "collator masks by length), but an SFT collator masks every pad position out of the labels, the "
            "end-of-turn token with them, and generation cannot tell padding from a finished answer. "
            "Set a separate pad token first."
        )


def load_tokenizer(profile: Profile, source: str | None = None):
    """The profile's tokenizer, with right padding and a pad token distinct from eos (checked)."""
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
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if four_bit and not torch.cuda.is_available():
        forbid_cpu_nf4_packing(model)  # a 4-bit model on CPU may train: its backward pass must stay correct
    return model


@torch.no_grad()
def logits_of(model, inputs: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
    """The logits ``model`` (in eval mode) gives ``inputs`` (``input_ids`` [batch, seq], or a tokenizer's dict),
    as float32 on the CPU."""
    model.eval()
    device = next(model.parameters()).device
    batch = {"input_ids": inputs} if isinstance(inputs, torch.Tensor) else dict(inputs)
    return model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()


def largest_difference(a: torch.Tensor | Sequence[torch.Tensor], b: torch.Tensor | Sequence[torch.Tensor]) -> float:
    """The largest absolute difference between two tensors (or two equally long lists of tensors)."""
    pairs = [(a, b)] if isinstance(a, torch.Tensor) else list(zip(a, b, strict=True))
    return max((x.float() - y.float()).abs().max().item() for x, y in pairs)


def max_logit_difference(model_a, model_b, inputs: torch.Tensor | dict[str, torch.Tensor]) -> float:
    """The largest absolute difference between the logits two models give the same ``inputs``.

    Used to see what 4-bit storage, a merge or an export costs: 0.0 means identical outputs; compare with the
    logits' own scale.
    """
    return largest_difference(logits_of(model_a, inputs), logits_of(model_b, inputs))


def forbid_cpu_nf4_packing(model) -> int:
    """Stop bitsandbytes from repacking ``model``'s 4-bit weights on a CPU; returns how many layers were guarded.

    bitsandbytes 0.50 on a CPU with AVX512-BF16 repacks a ``Linear4bit`` weight, permanently, the first time the
    layer runs in eval mode on an input that needs no gradient, and from then on uses an inference kernel with no
    backward: a later training step silently gets no gradient through the frozen base weights (LoRA's ``A`` and
    the layers below learn nothing from it). A model fresh from ``from_pretrained`` is in eval mode, so an
    evaluation, a generation or TRL's reference pass before training is enough. The guard is bitsandbytes' own
    switch, ``Linear4bit.support_avx512bf16_for_cpu``; ``benchmarks/cpu_nf4_packing_check.py`` shows the effect.
    """
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for module in layers:
        module.support_avx512bf16_for_cpu = False
    return len(layers)


def packed_nf4_layers(model) -> int:
    """How many 4-bit layers of ``model`` bitsandbytes has repacked for its CPU inference kernel (should be 0)."""
    return sum(
        bool(getattr(getattr(m.weight, "quant_state", None), "packing_format_for_cpu", False))
        for m in model.modules()
        if isinstance(m, bnb.nn.Linear4bit)
    )


def quantized_layer_names(model) -> list[str]:
    """Names of the linear layers stored in 4-bit (bitsandbytes ``Linear4bit``)."""
    return [name for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)]


def is_local_model(path: str | Path) -> bool:
    """True when ``path`` is a folder holding a saved model."""
    return (Path(path) / "config.json").exists()


# --- what the recipe's memory adds up to ----------------------------------------------------------------------

GIB = 2**30
NF4_BLOCKSIZE = 64  # bitsandbytes: one scale (absmax) per 64 weights
NESTED_BLOCKSIZE = 256  # double quantisation: the absmax values are themselves quantised in blocks of 256
ADAMW_STATE_BYTES = 8  # AdamW keeps two fp32 moments per trainable parameter


def mistral_7b_config(vocab_size: int = OPENHERMES_VOCAB):
    """Mistral-7B's architecture as a ``MistralConfig`` (OpenHermes-2.5's vocabulary of 32,002 by default)."""
    return mistral_config(MISTRAL_7B_SHAPE, vocab_size=vocab_size)


def _quantizable(model) -> list[torch.nn.Linear]:
    """The linear layers bitsandbytes quantises: every ``nn.Linear`` except the output head (``lm_head``)."""
    head = model.get_output_embeddings()
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]


def nf4_layer_bytes(numel: int, double_quant: bool = True) -> int:
    """Bytes of one NF4 weight matrix of ``numel`` values, as bitsandbytes stores it.

    Two 4-bit values per byte, plus one absmax scale per block of 64 values: an fp32 (4 bytes) without
    double quantisation; with it, a uint8 per block plus an fp32 per 256 blocks, an fp32 offset and the
    two lookup tables (16 and 256 fp32 values).
    """
    blocks = math.ceil(numel / NF4_BLOCKSIZE)
    code = 16 * 4
    if not double_quant:
        return math.ceil(numel / 2) + blocks * 4 + code
    return math.ceil(numel / 2) + blocks + math.ceil(blocks / NESTED_BLOCKSIZE) * 4 + 4 + 256 * 4 + code


def weight_bytes(model, bits: int, *, unquantized_bits: int = 16, double_quant: bool = True) -> int:
    """Bytes the weights of ``model`` take when stored in ``bits`` (32, 16, 8 or 4).

    32/16: every parameter in that width. 8 (LLM.int8) and 4 (NF4): the linear layers of the decoder in
    that width, with their scales; embeddings, norms and ``lm_head`` stay in ``unquantized_bits`` (16: the
    bf16/fp16 compute dtype on a GPU). Works on meta-device models: only shapes are read.
    """
    total = sum(p.numel() for p in model.parameters())
    if bits in (32, 16):
        return total * bits // 8
    if bits not in (8, 4):
        raise ValueError(f"bits must be 32, 16, 8 or 4, not {bits}")
    layers = _quantizable(model)
    quantized = sum(m.weight.numel() for m in layers)
    rest = (total - quantized) * unquantized_bits // 8
    if bits == 8:  # int8 weights plus one fp32 scale per output row
        return rest + quantized + sum(m.out_features * 4 for m in layers)
    return rest + sum(nf4_layer_bytes(m.weight.numel(), double_quant) for m in layers)


def quant_state_bytes(model) -> int:
    """Bytes of the NF4 quantisation constants of a really 4-bit-loaded model.

    They live in each weight's ``quant_state``, outside parameters and buffers, so
    ``model.get_memory_footprint()`` leaves them out; this adds them back.
    """

    def _tensors(state) -> int:
        found = sum(t.numel() * t.element_size() for t in (state.absmax, state.code) if t is not None)
        if getattr(state, "offset", None) is not None:
            found += state.offset.numel() * state.offset.element_size()
        if getattr(state, "state2", None) is not None:
            found += _tensors(state.state2)
        return found

    return sum(
        _tensors(p.quant_state) for p in model.parameters() if getattr(p, "quant_state", None) is not None
    )


def activation_bytes(config, sequences: int, seq_len: int, *, checkpointing: bool = True, bytes_per_value: int = 2):
    """A rough estimate of what the decoder layers keep for one training forward + backward pass, in bytes.

    ``sequences`` x ``seq_len`` tokens (every sequence padded to ``seq_len``: the worst case). One decoder layer
    keeps, per token, about 7 tensors of width ``hidden`` (norm inputs/outputs, q, rotated q, attention output), 3 of
    the key/value width and 4 of ``intermediate`` (gate, up, SiLU(gate), their product) for its backward pass;
    attention by SDPA/flash keeps no ``seq_len``-squared scores. With gradient checkpointing only each layer's input
    is kept and one layer at a time is recomputed. The log-probabilities (TRL's LM head) are counted apart, by
    :func:`log_prob_head_bytes`. Not counted: the CUDA context, allocator slack, temporary buffers.
    """
    tokens = sequences * seq_len
    hidden, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    per_layer = tokens * (7 * hidden + 3 * kv + 4 * inter) * bytes_per_value
    if checkpointing:
        return layers * tokens * hidden * bytes_per_value + per_layer
    return layers * per_layer


# TRL 1.16 scores the answers with a fused, chunked LM head: DPOTrainer calls the model with ``fused_lm_head=True``
# (trl/trainer/dpo_trainer.py, ``add_fused_lm_head`` in __init__, the calls in ``_compute_loss``), and
# ``trl.kernels.chunked_logprob.ChunkedLogProbFunction`` projects the hidden states through ``lm_head`` one tile at a
# time, keeping running log-sum-exp statistics: the [tokens x vocab] logits never exist. Tile sizes, from its source:
TRL_TOKEN_TILE = 4096  # trl/kernels/chunked_logprob.py TOKEN_CHUNK_SIZE: token rows per tile
TRL_VOCAB_TILE = 32768  # trl/trainer/utils.py _CHUNKED_LOGPROB_CHUNK_SIZE: vocabulary columns per tile
# per scored token it also keeps an int64 target, an fp32 log-normaliser and entropy, and two boolean masks
TRL_PER_TOKEN_BYTES = 8 + 4 + 4 + 2
# what DPOTrainer asks the fused head for (trl/trainer/dpo_trainer.py, ``outputs = (...)`` before add_fused_lm_head)
TRL_DPO_HEAD_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")


def log_prob_head_saved_bytes(config, tokens: int, *, bytes_per_value: int = 2) -> int:
    """What TRL 1.16's fused LM head keeps from its forward for the backward pass, for ``tokens`` scored tokens, in
    bytes: their hidden states (``tokens x hidden`` in the compute dtype) and 18 bytes per token (an int64 target, an
    fp32 log-normaliser and entropy, two boolean masks). ``log_prob_saved_bytes`` measures it on a real model."""
    return tokens * (config.hidden_size * bytes_per_value + TRL_PER_TOKEN_BYTES)


def log_prob_head_bytes(config, tokens: int, *, bytes_per_value: int = 2) -> int:
    """An estimate of the peak memory of TRL 1.16's fused LM head for ``tokens`` scored tokens, in bytes.

    Read from ``ChunkedLogProbFunction`` (trl/kernels/chunked_logprob.py): its peak is the backward pass, which holds
    what the forward saved (:func:`log_prob_head_saved_bytes`), one tile buffer of ``min(tokens, 4096) x 32768``
    values in the compute dtype (allocated at that width whatever the vocabulary), and the hidden states' gradient,
    accumulated in fp32 and then cast back to the compute dtype. On a GPU only the answer tokens are scored (prompt
    and padding are skipped); on a CPU TRL scores every position. ``tokens`` = every position is the worst case.
    """
    tile = min(tokens, TRL_TOKEN_TILE) * TRL_VOCAB_TILE * bytes_per_value
    gradient = tokens * config.hidden_size * (4 + bytes_per_value)
    return log_prob_head_saved_bytes(config, tokens, bytes_per_value=bytes_per_value) + tile + gradient


def full_logits_bytes(config, tokens: int, *, bytes_per_value: int = 2) -> int:
    """What the [tokens x vocab] logits would take if they were materialised, in bytes: a 16-bit copy from the model
    and an fp32 one for the log-softmax (TRL before the fused head, or ``model(...).logits`` + ``log_softmax``)."""
    return tokens * config.vocab_size * (bytes_per_value + 4)


def saved_tensor_bytes(fn, *, exclude=()) -> tuple[int, object]:
    """Run ``fn()`` and count the bytes of the tensors autograd saves for its backward pass; returns (bytes, result).

    Each storage is counted once; the storages of ``exclude`` (e.g. ``model.parameters()``, which exist anyway) are
    left out. This is what a forward pass adds to memory until ``backward()`` frees it.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = fn()
    return sum(seen.values()), result


def log_prob_saved_bytes(model, input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, int]:
    """Measure what computing per-token log-probs keeps for backward, two ways, on a real (small) model.

    ``"full logits"``: ``model(...).logits`` then ``log_softmax`` and ``gather``, the [tokens x vocab] way;
    ``"fused head"``: TRL 1.16's ``add_fused_lm_head`` and ``model(..., labels=labels, fused_lm_head=True)``, as
    DPOTrainer calls it. Each is counted by :func:`saved_tensor_bytes` minus what the decoder alone keeps
    (``"decoder"``), with the weights frozen and the input embeddings requiring grad (as LoRA training with gradient
    checkpointing sets them). The model is left as it was: its forward, ``requires_grad`` flags and hooks.
    """
    from trl.trainer.utils import add_fused_lm_head

    flags = [p.requires_grad for p in model.parameters()]
    for param in model.parameters():
        param.requires_grad_(False)
    model.enable_input_require_grads()
    targets = labels[:, 1:]

    def decoder():
        return model.get_decoder()(input_ids=input_ids).last_hidden_state.sum()

    def full_logits():
        log_probs = model(input_ids=input_ids).logits[:, :-1].float().log_softmax(-1)
        return log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)[targets != -100].sum()

    def fused_head():
        return model(input_ids=input_ids, labels=labels, fused_lm_head=True).log_probs.sum()

    params = list(model.parameters())
    try:
        measured = {"decoder": saved_tensor_bytes(decoder, exclude=params)[0]}
        measured["full logits"] = saved_tensor_bytes(full_logits, exclude=params)[0] - measured["decoder"]
        add_fused_lm_head(model, outputs=TRL_DPO_HEAD_OUTPUTS)
        measured["fused head"] = saved_tensor_bytes(fused_head, exclude=params)[0] - measured["decoder"]
    finally:
        model.__dict__.pop("forward", None)  # add_fused_lm_head set an instance forward: back to the class's
        model.disable_input_require_grads()
        for param, flag in zip(model.parameters(), flags):
            param.requires_grad_(flag)
    return measured


@dataclass(frozen=True)
class MemoryRow:
    """One line of the memory table: what, how many bytes, and how it was counted."""

    item: str
    bytes: int
    note: str
    part_of_recipe: bool = False  # counted in the recipe's training total

    @property
    def gib(self) -> float:
        """The size in GiB (2**30 bytes)."""
        return self.bytes / GIB


def lora_trainable_parameters(config, profile: Profile) -> int:
    """Trainable parameters of the profile's LoRA adapter on a model of ``config``: PEFT's own wrapping of a
    meta-device model, counted, not computed from a formula."""
    wrapped = get_peft_model(meta_model(config), lora_config(profile))
    return count_parameters(wrapped)[0]


def memory_table(config, profile: Profile, *, precision: str = "bf16") -> list[MemoryRow]:
    """The memory of the recipe on a model of ``config`` with ``profile``'s LoRA, batch and length, trained in
    ``precision`` ("bf16" on an A100, "fp16" on a T4, "fp32").

    Rows: the weights in fp32 / bf16 / 8-bit / 4-bit NF4; then what QLoRA training adds to the 4-bit weights
    (adapter, its gradients, AdamW's two fp32 moments, the decoder's activations, TRL's fused LM head) and their
    total; last, for contrast, the full logits TRL 1.16 does *not* allocate, and full fine-tuning with AdamW in mixed
    precision. The adapter's dtype follows the path that runs: TRL 1.16 casts a quantised model's adapter to bf16
    (trl/trainer/dpo_trainer.py, "When using QLoRA ..."), and ``helpers.training.prepare_trainer`` casts it back to
    fp32 under fp16 and fp32 (see ``helpers.training.trainable_dtype``); without 4-bit PEFT keeps it in fp32.
    ``paged_adamw_32bit`` keeps its two moments in fp32 whatever the parameter dtype. Rows built on estimates say so.
    """
    if precision not in {"bf16", "fp16", "fp32"}:
        raise ValueError(f"precision must be bf16, fp16 or fp32, not {precision!r}")
    model = meta_model(config)
    params = sum(p.numel() for p in model.parameters())
    lora = lora_trainable_parameters(config, profile)
    t, q = profile.training, profile.quantization
    sequences = 2 * t.per_device_train_batch_size  # TRL runs chosen and rejected as one concatenated batch
    tokens = sequences * profile.dpo.max_length
    value_bytes = 4 if precision == "fp32" else 2
    activations = activation_bytes(
        config, sequences, profile.dpo.max_length, checkpointing=t.gradient_checkpointing, bytes_per_value=value_bytes
    )
    head = log_prob_head_bytes(config, tokens, bytes_per_value=value_bytes)
    adapter_bytes, adapter_dtype = (2, "bf16") if q.load_in_4bit and precision == "bf16" else (4, "fp32")
    rows = [
        MemoryRow("weights fp32", weight_bytes(model, 32), f"{params:,} parameters x 4 bytes"),
        MemoryRow("weights bf16", weight_bytes(model, 16), "x 2 bytes: how the model is published"),
        MemoryRow("weights 8-bit", weight_bytes(model, 8), "LLM.int8 linear layers + row scales; rest 16-bit"),
        MemoryRow(
            "weights 4-bit NF4",
            weight_bytes(model, 4, double_quant=q.double_quant),
            "NF4 linear layers + " + ("double-quantised " if q.double_quant else "") + "scales; rest 16-bit",
            part_of_recipe=True,
        ),
        MemoryRow("LoRA adapter", lora * adapter_bytes, f"{lora:,} trainable parameters in {adapter_dtype}", True),
        MemoryRow("LoRA gradients", lora * adapter_bytes, f"one {adapter_dtype} gradient per parameter", True),
        MemoryRow(
            "AdamW states (32-bit)",
            lora * ADAMW_STATE_BYTES,
            "2 fp32 moments x 4 bytes; no master copy, the adapter is updated in place",
            True,
        ),
        MemoryRow(
            "activations (estimate)",
            activations,
            f"decoder layers: {sequences} sequences (batch {t.per_device_train_batch_size} x chosen+rejected) x "
            f"{profile.dpo.max_length} tokens, " + ("checkpointed" if t.gradient_checkpointing else "no checkpointing"),
            True,
        ),
        MemoryRow(
            "LM head, fused (estimate)",
            head,
            f"TRL's chunked log-probs: one {TRL_TOKEN_TILE:,} x {TRL_VOCAB_TILE:,} tile + hidden states and their "
            f"fp32 gradient for {tokens:,} tokens; no logits",
            True,
        ),
    ]
    total = sum(r.bytes for r in rows if r.part_of_recipe)
    parts = "4-bit weights + adapter + grads + AdamW + activations + head"
    rows.append(MemoryRow("QLoRA training total (estimate)", total, parts))
    rows.append(
        MemoryRow(
            "full logits, for contrast",
            full_logits_bytes(config, tokens, bytes_per_value=value_bytes),
            f"{tokens:,} tokens x {config.vocab_size:,} vocabulary, a 16-bit + an fp32 copy: not allocated by TRL 1.16",
        )
    )
    rows.append(
        MemoryRow(
            "full fine-tuning, for contrast (estimate)",
            params * 16 + activations + head,
            "bf16 weights + bf16 grads + fp32 master + AdamW (16 B/param) + activations + head",
        )
    )
    return rows


def format_memory_table(rows: list[MemoryRow]) -> str:
    """The table as fixed-width text: item, GiB, how it was counted."""
    width = max(len(r.item) for r in rows)
    lines = [f"{'':{width}}  {'GiB':>7}  how"]
    lines += [f"{r.item:{width}}  {r.gib:7.2f}  {r.note}" for r in rows]
    return "\n".join(lines)
