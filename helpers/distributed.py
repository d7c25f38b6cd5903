"""More than one process: ranks, leaving a launch after training, and the checks the data-parallel test reads.

A plain run is one process (rank 0 of 1). Under ``torchrun`` or ``accelerate launch`` every process trains; only the
main one writes files, merges and evaluates (see docs/scale_out.md).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch.distributed as dist
from accelerate.state import AcceleratorState, PartialState
from transformers import TrainerCallback

TRACE_ENV_VAR = "COURSE_TRACE_DIR"  # debug: each process writes what it trained on here (see attach_trace)
_LAUNCH_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK")


def process_rank() -> int:
    """This process's rank in a multi-process launch (torchrun, accelerate launch); 0 in a plain run."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """How many processes train together (1 in a plain run)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """True in a plain run and in rank 0 of a multi-process launch: the one process that writes files."""
    return process_rank() == 0


def leave_distributed() -> bool:
    """End a multi-process launch after training; True in the one process that goes on (rank 0).

    Merging and evaluating are single-process work: the other processes stop here, and rank 0 forgets the
    process group (and the launcher's variables) so that lm-eval's own accelerate set-up does not wait for
    processes that have gone.
    """
    if world_size() <= 1:
        return True
    main = is_main_process()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    if main:
        for var in _LAUNCH_VARIABLES:
            os.environ.pop(var, None)
        AcceleratorState._reset_state(reset_partial_state=True)
        PartialState._reset_state()
    return main


def trainable_checksum(model) -> str:
    """SHA-256 of the trainable (LoRA) weights, by name: equal checksums mean bit-identical adapters."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def attach_trace(trainer, folder: str | Path) -> None:
    """Debug hook (switched on by ``$COURSE_TRACE_DIR``): each process records what it trained on.

    At the end of training every process writes ``<folder>/rank<N>.json`` with ``batches`` (for each
    micro-batch, a short SHA-256 of each pair's chosen + rejected token ids), the losses the trainer logged,
    and ``lora_sha256``, a checksum of its trainable weights. tests/test_accelerate.py reads these to show that
    data-parallel processes train on different pairs and still end with identical adapters.
    """
    folder = Path(folder)
    batches: list[list[str]] = []
    original_step = trainer.training_step

    def training_step(model, inputs, *args, **kwargs):
        ids, mask = inputs["input_ids"].detach().cpu(), inputs["attention_mask"].detach().cpu().bool()
        half = ids.shape[0] // 2  # TRL stacks the chosen rows, then the rejected rows
        batches.append(
            [
                hashlib.sha256(
                    ids[i][mask[i]].numpy().tobytes() + b"|" + ids[half + i][mask[half + i]].numpy().tobytes()
                ).hexdigest()[:16]
                for i in range(half)
            ]
        )
        return original_step(model, inputs, *args, **kwargs)

    class Trace(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            folder.mkdir(parents=True, exist_ok=True)
            record = {
                "rank": args.process_index,
                "world_size": args.world_size,
                "batches": batches,
                "losses": [[e["step"], e["loss"]] for e in state.log_history if "loss" in e and "step" in e],
                "lora_sha256": trainable_checksum(model),
                "global_step": state.global_step,
            }
            (folder / f"rank{args.process_index}.json").write_text(json.dumps(record))

    trainer.training_step = training_step
    trainer.add_callback(Trace())


def attach_trace_if_asked(trainer) -> None:
    """:func:`attach_trace` when ``$COURSE_TRACE_DIR`` is set (the data-parallel test sets it), else nothing."""
    if os.environ.get(TRACE_ENV_VAR):
        attach_trace(trainer, os.environ[TRACE_ENV_VAR])
