"""DPO training (notebook 04): what happens between ``DPOTrainer(...)`` and ``trainer.train()``, and what a run leaves.

Notebook 04 writes ``DPOConfig(...)``, ``DPOTrainer(...)`` and ``trainer.train()`` in its cells. :func:`train_dpo` makes
the same calls for the notebooks that need another trained run (05's QLoRA run, 06's plain DPO, 10's baseline, 11's
two runs) and for the headless script. A run folder holds ``adapter/`` (the LoRA weights, the tokenizer and the
profile that trained them), ``history.json`` (the trainer's log) and ``run_info.json`` (steps and seconds).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel
from tqdm.auto import tqdm
from transformers import PrinterCallback, ProgressCallback, TrainerCallback, set_seed
from transformers.utils.notebook import NotebookProgressCallback
from trl import DPOConfig, DPOTrainer

from helpers.data import pairs_only
from helpers.models import keep_nf4_trainable, load_base_model, load_tokenizer
from helpers.profiles import Profile
from helpers.runs import latest_checkpoint, read_json, save_atomically, write_json


class CompactProgress(TrainerCallback):
    """One progress bar over the optimizer steps with the latest loss (and training-batch reward accuracy)."""

    def __init__(self, desc: str) -> None:
        self.desc, self.bar = desc, None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=self.desc, mininterval=5.0)

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


@contextlib.contextmanager
def quiet_bars(quiet: bool = True) -> Iterator[None]:
    """No tqdm bar inside the block (TRL's reference pass listens to ``$TQDM_DISABLE`` only)."""
    before = os.environ.get("TQDM_DISABLE")
    if quiet:
        os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = before


def prepare_trainer(trainer, *, desc: str = "DPO steps", progress: bool = True):
    """The course's three fixes between building a TRL trainer and ``trainer.train()``; returns the trainer.

    1. TRL 1.16 casts a 4-bit model's LoRA weights to bf16 while it builds the trainer (following the QLoRA paper).
       fp16 mixed precision (a T4) needs fp32 trainable weights - its GradScaler unscales fp32 gradients only - and a
       CPU trains in fp32, so they go back to fp32 there; under bf16 they stay bf16.
    2. On a CPU, bitsandbytes must not repack the 4-bit weights (:func:`helpers.models.keep_nf4_trainable`).
    3. One progress bar called ``desc`` instead of a printed dict per logged step (none with ``progress=False``).
    """
    dtype = torch.bfloat16 if trainer.args.bf16 else torch.float32
    for param in trainer.model.parameters():
        if param.requires_grad and param.dtype != dtype:
            param.data = param.data.to(dtype)
    keep_nf4_trainable(trainer.model)
    for callback in (PrinterCallback, ProgressCallback, NotebookProgressCallback):
        trainer.remove_callback(callback)
    if progress:
        trainer.add_callback(CompactProgress(desc))
    return trainer


@dataclass
class Run:
    """A finished training run: the trained (PEFT) model, its log, where its adapter is, and how long it took."""

    model: Any
    history: list[dict[str, float]]
    adapter_dir: Path
    seconds: float
    trainer: Any = None  # None when the run was read back from its folder

    @property
    def steps(self) -> int:
        """Optimizer steps the run took."""
        return int(self.history[-1]["step"]) if self.history else 0


def log_history(trainer) -> list[dict[str, float]]:
    """The trainer's log as rows with a step and a loss (the metrics TRL logs: rewards, margins, log-probs)."""
    return [{k: float(v) for k, v in row.items() if isinstance(v, int | float)}
            for row in trainer.state.log_history if "loss" in row and "step" in row]


def save_run(trainer, profile: Profile, run_folder: str | Path, seconds: float) -> Run:
    """After ``trainer.train()``: the adapter (atomically, with its tokenizer and the profile that trained it), the
    log as ``history.json`` and ``run_info.json`` in the run folder."""
    run_folder = Path(run_folder)

    def save(folder: Path) -> None:
        trainer.model.save_pretrained(folder)
        trainer.processing_class.save_pretrained(folder)
        (folder / "course_profile.json").write_text(profile.to_json())

    adapter = save_atomically(save, run_folder / "adapter")
    history = log_history(trainer)
    write_json(run_folder / "history.json", history)
    write_json(run_folder / "run_info.json", {"train_seconds": round(seconds, 2), "steps": trainer.state.global_step})
    return Run(trainer.model, history, adapter, seconds, trainer)


def finished(profile: Profile, run_folder: str | Path) -> bool:
    """True when ``run_folder`` holds a finished run of exactly ``profile`` (every setting equal)."""
    run_folder = Path(run_folder)
    saved = run_folder / "adapter" / "course_profile.json"
    return (saved.is_file() and (run_folder / "run_info.json").is_file()
            and json.loads(saved.read_text()) == json.loads(profile.to_json()))


def load_run(profile: Profile, run_folder: str | Path) -> Run:
    """A finished run read back: the base model with its adapter (``PeftModel.from_pretrained``), its log, its time."""
    run_folder = Path(run_folder)
    model = PeftModel.from_pretrained(load_base_model(profile), str(run_folder / "adapter"))
    info = read_json(run_folder / "run_info.json")
    return Run(model.eval(), read_json(run_folder / "history.json"), run_folder / "adapter", info["train_seconds"])


def train_dpo(profile: Profile, run_folder: str | Path, data, *, progress: bool = True, resume: bool = False,
              trainer_class: type = DPOTrainer, **dpo_changes: Any) -> Run:
    """Notebook 04's cells in one call: seed, base model, ``DPOTrainer`` with the profile's ``DPOConfig`` (changed by
    ``dpo_changes``) and LoRA, :func:`prepare_trainer`, train (from the newest checkpoint with ``resume``), save.

    ``data``: :func:`helpers.data.prepare_data`'s result, or a data set with prompt/chosen/rejected columns.
    """
    profile = replace(profile, dpo={**profile.dpo, **dpo_changes})
    run_folder = Path(run_folder)
    checkpoint = latest_checkpoint(run_folder / "checkpoints") if resume else None
    if resume and checkpoint is None:
        raise FileNotFoundError(f"resume=True but {run_folder / 'checkpoints'} holds no complete checkpoint: the run "
                                "never reached its first save; start it again with resume=False")
    set_seed(profile.dpo["seed"])
    train = data.train if hasattr(data, "train") else data
    with_ref = [c for c in ("ref_chosen_logps", "ref_rejected_logps") if c in train.column_names]
    with quiet_bars(not progress):  # TRL's reference pass ("Computing reference log probs") has a bar of its own
        trainer = trainer_class(
            model=load_base_model(profile),
            ref_model=None,
            args=DPOConfig(output_dir=str(run_folder / "checkpoints"), disable_tqdm=not progress, **profile.dpo),
            train_dataset=train.select_columns(["prompt", "chosen", "rejected", *with_ref]) if with_ref
            else pairs_only(train),
            processing_class=load_tokenizer(profile.model_id),
            peft_config=LoraConfig(**profile.lora),
        )
    prepare_trainer(trainer, progress=progress)
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    return save_run(trainer, profile, run_folder, time.perf_counter() - started)


def train_dpo_once(profile: Profile, run_folder: str | Path, data, **options: Any) -> Run:
    """:func:`train_dpo`, unless ``run_folder`` already holds the finished run of the same settings: then it is read
    back (:func:`load_run`) instead of trained again."""
    dpo_changes = {k: v for k, v in options.items() if k not in ("progress", "resume", "trainer_class")}
    changed = replace(profile, dpo={**profile.dpo, **dpo_changes})
    if finished(changed, run_folder):
        return load_run(changed, run_folder)
    return train_dpo(profile, run_folder, data, **options)


def saturation_warning(history: list[dict[str, float]], total_steps: int) -> str | None:
    """A warning when ``rewards/accuracies`` hits 1.0 in the first quarter of the run (often misread as success)."""
    for row in history:
        if row.get("rewards/accuracies", 0.0) >= 1.0 and row["step"] <= max(1, total_steps // 4):
            return (f"rewards/accuracies reached 1.0 at step {int(row['step'])} of {total_steps}: on the training "
                    "batch the chosen answer already beats the rejected one everywhere. That says the pairs are easy, "
                    "not that the model is good - watch the margins, the chosen answers' log-probs and held-out "
                    "accuracy.")
    return None
