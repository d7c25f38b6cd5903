"""What the machine can do: CUDA or not, native bf16 or not, and the dtypes that follow."""

from __future__ import annotations

import torch


def cuda_available() -> bool:
    """True when a CUDA GPU is usable by torch."""
    return torch.cuda.is_available()


def gpu_total_memory_gib(device: int = 0) -> float:
    """Total memory of CUDA device ``device`` in GiB (0.0 without CUDA)."""
    if not cuda_available():
        return 0.0
    return torch.cuda.get_device_properties(device).total_memory / 2**30


def native_bf16() -> bool:
    """True only where bf16 runs in hardware (Ampere, compute capability 8.0, and newer).

    ``torch.cuda.is_bf16_supported()`` also says True on a T4 (7.5), where bf16 is emulated and
    slow, so the compute capability decides here.
    """
    if not cuda_available():
        return False
    major, _ = torch.cuda.get_device_capability()
    return major >= 8


def training_precision(requested: str = "auto") -> str:
    """The precision training runs in: "bf16", "fp16" or "fp32".

    "auto" picks bf16 on Ampere or newer, fp16 on older GPUs such as the T4, fp32 on CPU.
    A request the hardware cannot honour is refused with a message saying what to use instead.
    """
    requested = requested.lower()
    if requested not in {"auto", "bf16", "fp16", "fp32"}:
        raise ValueError(f"precision must be auto, bf16, fp16 or fp32, not {requested!r}")
    if requested == "auto":
        if not cuda_available():
            return "fp32"
        return "bf16" if native_bf16() else "fp16"
    if requested == "bf16" and cuda_available() and not native_bf16():
        name = torch.cuda.get_device_name()
        raise ValueError(f"bf16 was requested but {name} has no native bf16 (a T4 emulates it slowly); use fp16")
    if requested == "fp16" and not cuda_available():
        raise ValueError("fp16 training needs a CUDA GPU; on CPU use fp32")
    return requested


def compute_dtype(requested: str = "auto") -> torch.dtype:
    """The dtype 4-bit layers compute in (and half-precision weights use): bf16, fp16 or fp32 by hardware."""
    if requested not in {"auto", ""}:
        return getattr(torch, {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(requested, requested))
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[training_precision("auto")]
