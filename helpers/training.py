"""DPO training with TRL: the recipe's DPOConfig built from a profile, and the training run itself."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from helpers.hardware import cuda_available, training_precision
from helpers.profiles import Profile

ADAPTER_DIRNAME = "adapter"
TRACE_ENV_VAR = "COURSE_TRACE_DIR"  # debug: each process writes what it trained on here (see attach_trace)


def process_rank() -> int:
    """This process's rank in a multi-process launch (torchrun, accelerate launch); 0 in a plain run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """How many processes train together (1 in a plain run)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """True in a plain run and in rank 0 of a multi-process launch: the one process that writes files."""
    return process_rank() == 0


def optimizer_name(profile: Profile) -> str:
    """The recipe's optimizer where it can run; paged optimizers page GPU memory, so plain AdamW on CPU."""
    optim = profile.training.optim
    if optim.startswith("paged_") and not cuda_available():
        return "adamw_torch"
    return optim


def dpo_config_kwargs(profile: Profile, output_dir: str | Path, **overrides: Any) -> dict[str, Any]:
    """The keyword arguments :func:`dpo_config` gives ``DPOConfig``: the profile's settings, adapted to the hardware.

    Separate from :func:`dpo_config` so the recipe's GPU settings (bf16, paged AdamW) can be checked on a
    machine without a GPU, where ``DPOConfig`` itself refuses bf16.
    """
    t, d = profile.training, profile.dpo
    precision = training_precision(t.precision)
    settings: dict[str, Any] = dict(
        output_dir=str(output_dir),
        # the batch: 4 pairs per device, 4 accumulated -> 16 pairs per optimizer step in the recipe
        per_device_train_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        # recompute activations in the backward pass: memory for time, what lets 7B fit
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        max_steps=t.max_steps,
        warmup_steps=t.warmup_steps,
        optim=optimizer_name(profile),
        # precision from the hardware: TRL turns bf16 on by default, which fails on CPU and a T4
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not cuda_available(),
        # DPO itself
        beta=d.beta,  # how far the policy may move from the reference (higher = closer)
        max_length=d.max_length,  # prompt + answer; TRL 1.x has no max_prompt_length (see helpers.chatml)
        loss_type=list(d.loss_type),
        loss_weights=list(d.loss_weights) if d.loss_weights else None,
        # logging and saving
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=2,
        report_to="none",  # "wandb" or "tensorboard" work too, never required
        seed=t.seed,
        data_seed=t.seed,
        dataloader_num_workers=0,
        remove_unused_columns=True,
        # multi-process (DDP) runs: every LoRA weight takes part in every forward, so DDP need not search for
        # unused ones (the Trainer's default for a PEFT model costs an extra pass over the graph each step)
        ddp_find_unused_parameters=False,
    )
    settings.update(overrides)
    return settings


def dpo_config(profile: Profile, output_dir: str | Path, **overrides: Any):
    """The profile rendered into a TRL ``DPOConfig``, every setting explicit (TRL's defaults differ from the recipe).

    ``overrides`` replace single fields (e.g. ``max_steps=20``) for short experiments.
    """
    from trl import DPOConfig

    return DPOConfig(**dpo_config_kwargs(profile, output_dir, **overrides))


def make_trainer(profile: Profile, model, tokenizer, train_dataset, output_dir: str | Path, **overrides: Any):
    """A ``DPOTrainer`` with the profile's LoRA adapter and ``ref_model=None``.

    With an adapter, the reference model is the same network with the adapter switched off, so no
    second copy of the base weights is loaded (the seed's first version loaded one and paid for it).
    """
    from trl import DPOTrainer

    from helpers.lora import lora_config

    columns = [c for c in train_dataset.column_names if c not in {"prompt", "chosen", "rejected"}]
    train_dataset = train_dataset.remove_columns(columns)
    trainer = DPOTrainer(
        model=model,
        ref_model=None,
        args=dpo_config(profile, output_dir, **overrides),
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=lora_config(profile),
    )
    if os.environ.get(TRACE_ENV_VAR):
        attach_trace(trainer, os.environ[TRACE_ENV_VAR])
    return trainer


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
    from transformers import TrainerCallback

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


def log_history_table(trainer) -> list[dict[str, float]]:
    """The training log as rows with the step and the metrics the course plots (loss, rewards, log-probs)."""
    rows = []
    for entry in trainer.state.log_history:
        if "loss" in entry and "step" in entry:
            rows.append({k: float(v) for k, v in entry.items() if isinstance(v, int | float)})
    return rows


def saturation_warning(history: list[dict[str, float]], total_steps: int) -> str | None:
    """A warning when rewards/accuracies hit 1.0 in the first quarter of the run (often misread as success)."""
    for row in history:
        if row.get("rewards/accuracies", 0.0) >= 1.0 and row["step"] <= max(1, total_steps // 4):
            return (
                f"rewards/accuracies reached 1.0 at step {int(row['step'])} of {total_steps}: on the training batch "
                "the chosen answer already beats the rejected one everywhere. That says the pairs are easy, not that "
                "the model is good - watch the margins, the log-probs of the chosen answers and held-out accuracy."
            )
    return None


def latest_complete_checkpoint(folder: str | Path) -> Path | None:
    """The newest ``checkpoint-N`` whose ``trainer_state.json`` (the last file a checkpoint writes) parses.

    A run killed while writing a checkpoint leaves a half-written folder; resuming from it would fail.
    """
    found = [p for p in Path(folder).glob("checkpoint-*") if p.name.rsplit("-", 1)[-1].isdigit()]
    for path in sorted(found, key=lambda p: int(p.name.rsplit("-", 1)[-1]), reverse=True):
        try:
            json.loads((path / "trainer_state.json").read_text())
            return path
        except (OSError, ValueError):
            continue
    return None


def save_atomically(save_fn, target: str | Path, *, overwrite: bool = True) -> Path:
    """Call ``save_fn(tmp_folder)`` then rename the folder to ``target``: a crash leaves the old one intact."""
    target = Path(target)
    old = target.with_name(f".{target.name}.old")
    if not target.exists() and old.exists():  # a crash between the two renames below: the old one comes back
        old.replace(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already holds a saved model; pass overwrite=True to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        save_fn(tmp)
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            target.replace(old)
            tmp.replace(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.replace(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def save_adapter(trainer, run_folder: str | Path, profile: Profile) -> Path:
    """Save the trained LoRA adapter (safetensors) and the resolved profile to ``<run>/adapter``, atomically.

    In a plain or data-parallel (DDP) run only the main process calls it. Under FSDP every process must call it:
    the adapter's shards are gathered from all of them, then the main process alone writes.
    """
    if getattr(trainer, "is_fsdp_enabled", False):
        return _save_adapter_fsdp(trainer, Path(run_folder), profile)

    def _save(folder: Path) -> None:
        trainer.model.save_pretrained(folder, safe_serialization=True)
        trainer.processing_class.save_pretrained(folder)
        (folder / "course_profile.json").write_text(profile.to_json())

    return save_atomically(_save, Path(run_folder) / ADAPTER_DIRNAME)


def _save_adapter_fsdp(trainer, run_folder: Path, profile: Profile) -> Path:
    """FSDP: gather the full adapter state on every process (Trainer.save_model), write it from the main one."""
    staging = run_folder / f".{ADAPTER_DIRNAME}.fsdp-staging"
    # PEFT's FSDP-QLoRA recipe: a full (unsharded) state dict, so the adapter file is an ordinary one.
    trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(staging))  # collective: all processes gather, only the main process writes
    if trainer.is_world_process_zero():

        def _save(folder: Path) -> None:
            for item in staging.iterdir():
                shutil.move(str(item), str(folder / item.name))
            trainer.processing_class.save_pretrained(folder)
            (folder / "course_profile.json").write_text(profile.to_json())

        save_atomically(_save, run_folder / ADAPTER_DIRNAME)
        shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    return run_folder / ADAPTER_DIRNAME


def write_history(history: list[dict[str, float]], path: str | Path) -> None:
    """The log history as JSON next to the adapter, for the plots of later notebooks."""
    Path(path).write_text(json.dumps(history, indent=1))


def set_seed(seed: int) -> None:
    """One seed for python, numpy and torch (CPU runs are then bit-for-bit reproducible)."""
    from transformers import set_seed as hf_set_seed

    hf_set_seed(seed)
    torch.use_deterministic_algorithms(False)


LN2 = math.log(2)  # DPO's loss at step 0: policy == reference, so -log sigmoid(0) = ln 2


def compact_progress(trainer, every_seconds: float = 5.0):
    """Swap the trainer's log-printing progress display for one tqdm bar that shows the latest loss.

    The default display prints every logged dict (hundreds of lines in a notebook); this keeps the
    output to one bar, refreshed at most every ``every_seconds``.
    """
    from tqdm.auto import tqdm
    from transformers import PrinterCallback, ProgressCallback, TrainerCallback

    try:
        from transformers.utils.notebook import NotebookProgressCallback
    except ImportError:  # pragma: no cover - only without IPython
        NotebookProgressCallback = ProgressCallback  # noqa: N806

    class CompactProgress(TrainerCallback):
        bar = None

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self.bar = tqdm(total=state.max_steps, desc="DPO steps", mininterval=every_seconds, dynamic_ncols=True)
                self.bar.update(state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.bar is not None and logs and "loss" in logs:
                acc = logs.get("rewards/accuracies")
                self.bar.set_postfix(loss=f"{logs['loss']:.3f}", **({"acc": f"{acc:.2f}"} if acc is not None else {}))

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    for callback in (PrinterCallback, ProgressCallback, NotebookProgressCallback):
        trainer.remove_callback(callback)
    trainer.add_callback(CompactProgress())
    return trainer
