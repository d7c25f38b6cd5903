"""DPO training with TRL (notebook 04): the recipe's DPOConfig from a profile, the trainer, and the training run.

Notebook 04 calls ``DPOConfig(**dpo_config_kwargs(...))``, ``DPOTrainer(...)`` and ``trainer.train()`` in its own
cells; :func:`train_dpo` does the same for the headless pipeline (``python -m helpers run``) and the other notebooks
that need a trained adapter. Both sides share everything but those few library calls: the arguments
(:func:`dpo_config_kwargs`), what must happen between building the trainer and training it
(:func:`prepare_trainer`), and what a finished run writes (:func:`finish_run`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import set_seed as hf_set_seed
from trl import DPOConfig, DPOTrainer

from helpers.data import PreparedData, prepare_data
from helpers.distributed import attach_trace_if_asked, world_size
from helpers.hardware import cuda_available, training_precision
from helpers.loading import forbid_cpu_nf4_packing, load_model, load_tokenizer, model_source
from helpers.lora import lora_config
from helpers.profiles import Profile
from helpers.progress import compact_progress, no_bars, silence_trainer
from helpers.saving import latest_complete_checkpoint, save_atomically, write_json_atomically

ADAPTER_DIRNAME = "adapter"
CHECKPOINTS_DIRNAME = "checkpoints"
HISTORY_FILENAME = "history.json"
RUN_INFO_FILENAME = "run_info.json"  # how long training took and how many steps, written with the history
PAIR_COLUMNS = ("prompt", "chosen", "rejected")


def optimizer_name(profile: Profile) -> str:
    """The recipe's optimizer where it can run; paged optimizers page GPU memory, so plain AdamW on CPU."""
    optim = profile.training.optim
    if optim.startswith("paged_") and not cuda_available():
        return "adamw_torch"
    return optim


def dpo_config_kwargs(profile: Profile, output_dir: str | Path, **overrides: Any) -> dict[str, Any]:
    """The keyword arguments of the profile's ``DPOConfig``: every recipe setting explicit, adapted to the hardware.

    A plain dict, so notebook 04 can show it and call ``DPOConfig(**kwargs)`` itself, and so the recipe's GPU
    settings (bf16, paged AdamW) can be checked on a machine without a GPU, where ``DPOConfig`` refuses bf16.
    ``overrides`` replace single fields (e.g. ``max_steps=20``).
    """
    t, d = profile.training, profile.dpo
    precision = training_precision(t.precision)
    precompute = d.precompute_ref_log_probs and world_size() == 1
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
        # the reference (adapter off) scored once before training instead of at every step (tiny). One process
        # only: TRL 1.16 caches the scores in a file next to the data set, and an in-memory data set's cache folder
        # is a temporary one of each process, so another rank cannot find what rank 0 wrote (FileNotFoundError)
        precompute_ref_log_probs=precompute,
        precompute_ref_batch_size=64 if precompute else None,
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


def dpo_config(profile: Profile, output_dir: str | Path, **overrides: Any) -> DPOConfig:
    """The profile rendered into a TRL ``DPOConfig`` (see :func:`dpo_config_kwargs`)."""
    return DPOConfig(**dpo_config_kwargs(profile, output_dir, **overrides))


def pairs_only(dataset, keep: tuple[str, ...] = ()):
    """The data set with only ``prompt``, ``chosen`` and ``rejected`` (and ``keep``): what TRL's trainers read."""
    return dataset.remove_columns([c for c in dataset.column_names if c not in (*PAIR_COLUMNS, *keep)])


def trainable_dtype(precision: str) -> torch.dtype:
    """The dtype the trainable (LoRA) weights must have for ``precision`` ("bf16", "fp16" or "fp32").

    bf16 training keeps them in bf16 (what TRL chooses for a quantised model, following the QLoRA paper). fp16
    mixed precision needs fp32 weights: its GradScaler unscales fp32 gradients only, and fails on bf16 ones
    (``"_amp_foreach_non_finite_check_and_unscale_cuda" not implemented for 'BFloat16'``). fp32 is fp32.
    """
    return torch.bfloat16 if precision == "bf16" else torch.float32


def cast_trainable_weights(model, dtype: torch.dtype) -> int:
    """Cast every trainable parameter of ``model`` to ``dtype`` in place; returns how many were changed."""
    changed = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype != dtype:
            param.data = param.data.to(dtype)
            changed += 1
    return changed


def prepare_trainer(trainer, profile: Profile, *, progress: bool = True, desc: str = "DPO steps"):
    """What must happen between building a preference trainer and ``trainer.train()``; returns the trainer.

    1. TRL 1.16 casts a quantised model's LoRA weights to bf16 while building the trainer; under fp16 (a T4) or
       fp32 (a CPU) they go back to fp32 (see :func:`trainable_dtype`). The optimizer is created by ``train()``,
       so it sees the cast weights.
    2. On CPU, bitsandbytes must not repack the 4-bit weights (see :func:`helpers.loading.forbid_cpu_nf4_packing`).
    3. One progress bar called ``desc`` instead of a printed dict per logged step (or nothing, ``progress=False``).
    4. The data-parallel trace hook when ``$COURSE_TRACE_DIR`` asks for it.
    """
    cast_trainable_weights(trainer.model, trainable_dtype(training_precision(profile.training.precision)))
    if not cuda_available():
        forbid_cpu_nf4_packing(trainer.model)
    if progress:
        compact_progress(trainer, desc)
    else:
        silence_trainer(trainer)
    attach_trace_if_asked(trainer)
    return trainer


def dpo_trainer(
    profile: Profile, model, tokenizer, train_dataset, output_dir: str | Path, *, progress: bool = True,
    ref_model=None, trainer_class: type[DPOTrainer] = DPOTrainer, keep_columns: tuple[str, ...] = (),
    **overrides: Any,
) -> DPOTrainer:
    """The ``DPOTrainer`` of notebook 04's cell (profile's LoRA adapter, ``ref_model=None``), not yet prepared.

    With an adapter, the reference model is the same network with the adapter switched off, so no second copy of
    the base weights is loaded (the seed's first version loaded one and paid for it; ``ref_model=`` a second loaded
    model does that again, for the benchmarks that measure what it costs). ``trainer_class`` and ``keep_columns``
    let notebook 08 train on reference log-probs computed once for all its variants.
    """
    if not progress:
        overrides.setdefault("disable_tqdm", True)
    with contextlib.nullcontext() if progress else no_bars():  # the reference pass of precompute_ref_log_probs
        return trainer_class(
            model=model,
            ref_model=ref_model,
            args=dpo_config(profile, output_dir, **overrides),
            train_dataset=pairs_only(train_dataset, keep=keep_columns),
            processing_class=tokenizer,
            peft_config=lora_config(profile),
        )


def build_trainer(
    profile: Profile, model, tokenizer, train_dataset, output_dir: str | Path, *, progress: bool = True,
    **options: Any,
) -> DPOTrainer:
    """:func:`dpo_trainer`, prepared (:func:`prepare_trainer`): ready for ``trainer.train()``."""
    trainer = dpo_trainer(profile, model, tokenizer, train_dataset, output_dir, progress=progress, **options)
    return prepare_trainer(trainer, profile, progress=progress)


@dataclass
class TrainOutcome:
    """What a training run produced: the trained (PEFT) model, its log, where the adapter is, how long it took.

    ``trainer`` is None when the run was not trained now but read back from its run folder (:func:`train_dpo_once`).
    """

    trainer: Any
    history: list[dict[str, float]]
    adapter_dir: Path
    seconds: float
    model: Any = None

    def __post_init__(self) -> None:
        if self.model is None and self.trainer is not None:
            self.model = self.trainer.model

    @property
    def steps(self) -> int:
        """Optimizer steps the run took."""
        return int(self.history[-1]["step"]) if self.history else 0


def resume_from(run_folder: str | Path, resume: bool | str) -> str | None:
    """The checkpoint to resume from: ``True`` -> the newest complete one in ``<run>/checkpoints``; a path; or None."""
    if resume is True:
        found = latest_complete_checkpoint(Path(run_folder) / CHECKPOINTS_DIRNAME)
        if found is None:
            raise FileNotFoundError(
                f"resume=True but {Path(run_folder) / CHECKPOINTS_DIRNAME} holds no complete checkpoint; the run "
                "never reached its first save - start it again with resume=False"
            )
        return str(found)
    return str(resume) if resume else None


def finish_run(trainer, profile: Profile, run_folder: str | Path, seconds: float) -> TrainOutcome:
    """After ``trainer.train()``: the log as rows, the adapter saved atomically, ``history.json`` written."""
    run_folder = Path(run_folder)
    history = log_history_table(trainer)
    # only the main process writes (under FSDP every process takes part in gathering the adapter)
    if trainer.is_world_process_zero() or getattr(trainer, "is_fsdp_enabled", False):
        adapter = save_adapter(trainer, run_folder, profile)
    else:
        adapter = run_folder / ADAPTER_DIRNAME
    if trainer.is_world_process_zero():
        write_json_atomically(run_folder / HISTORY_FILENAME, history, indent=1)
        write_json_atomically(run_folder / RUN_INFO_FILENAME, {"train_seconds": round(seconds, 2),
                                                               "steps": trainer.state.global_step})
    return TrainOutcome(trainer, history, adapter, seconds)


def finished_run(profile: Profile, run_folder: str | Path) -> bool:
    """True when ``run_folder`` holds a finished run of exactly ``profile``: its adapter, saved with this very
    profile (every setting equal, steps included), its log and its run info."""
    run_folder = Path(run_folder)
    saved = run_folder / ADAPTER_DIRNAME / "course_profile.json"
    return (
        saved.is_file()
        and (run_folder / HISTORY_FILENAME).is_file()
        and (run_folder / RUN_INFO_FILENAME).is_file()
        and json.loads(saved.read_text()) == profile.to_dict()
    )


def load_finished_run(profile: Profile, run_folder: str | Path) -> TrainOutcome:
    """A finished run read back: the base with its adapter (``PeftModel.from_pretrained``), its log and its time."""
    run_folder = Path(run_folder)
    if not finished_run(profile, run_folder):
        raise FileNotFoundError(f"{run_folder} holds no finished run of profile {profile.name!r} with these settings")
    model = PeftModel.from_pretrained(load_model(profile), str(run_folder / ADAPTER_DIRNAME))
    info = json.loads((run_folder / RUN_INFO_FILENAME).read_text())
    history = json.loads((run_folder / HISTORY_FILENAME).read_text())
    return TrainOutcome(None, history, run_folder / ADAPTER_DIRNAME, info["train_seconds"], model=model.eval())


def train_dpo_once(profile: Profile, run_folder: str | Path, *, data: PreparedData | None = None,
                   progress: bool = True, **overrides: Any) -> TrainOutcome:
    """:func:`train_dpo`, unless ``run_folder`` already holds the finished run of the same settings: then that run
    is read back instead of trained again (notebooks 06 and 08 both need plain DPO; it is trained once)."""
    if finished_run(with_training_overrides(profile, overrides), run_folder):
        return load_finished_run(with_training_overrides(profile, overrides), run_folder)
    return train_dpo(profile, run_folder, data=data, progress=progress, **overrides)


def timed_train(trainer, resume: str | None = None) -> float:
    """``trainer.train()`` (from checkpoint ``resume`` when given); returns the seconds it took."""
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    return time.perf_counter() - started


def with_training_overrides(profile: Profile, overrides: dict[str, Any]) -> Profile:
    """The profile with the training fields among ``overrides`` folded in: the profile saved is the one that ran."""
    fields = {f.name for f in dataclasses.fields(profile.training)}
    return profile.replace("training", **{k: v for k, v in overrides.items() if k in fields})


def train_with(profile: Profile, run_folder: str | Path, build: Callable[[Any, Any], Any], *, progress: bool = True,
               desc: str = "DPO steps", resume: str | None = None) -> TrainOutcome:
    """The sequence every preference run of the course shares: seed, load the tokenizer and the model, build the
    trainer (``build(model, tokenizer)``), prepare it (:func:`prepare_trainer`), train, save (:func:`finish_run`).

    DPO (:func:`train_dpo`), ORPO and notebook 08's shared-reference DPO differ only in ``build``.
    """
    run_folder = Path(run_folder)
    run_folder.mkdir(parents=True, exist_ok=True)
    set_seed(profile.training.seed)
    source = model_source(profile)
    tokenizer = load_tokenizer(profile, source)
    model = load_model(profile, source=source)
    trainer = prepare_trainer(build(model, tokenizer), profile, progress=progress, desc=desc)
    return finish_run(trainer, profile, run_folder, timed_train(trainer, resume))


def train_dpo(
    profile: Profile,
    run_folder: str | Path,
    *,
    resume: bool | str = False,
    progress: bool = True,
    data: PreparedData | None = None,
    **overrides: Any,
) -> TrainOutcome:
    """Train the profile's LoRA adapter with DPO and save it, its log and its profile in the run folder.

    ``resume=True`` continues from the newest checkpoint in ``<run>/checkpoints`` (or a given path);
    ``overrides`` are ``DPOConfig`` fields (``max_steps=20``, ``report_to="wandb"``, ...).
    """
    checkpoint = resume_from(run_folder, resume)
    profile = with_training_overrides(profile, overrides)

    def build(model, tokenizer):
        pairs = (data or prepare_data(profile, tokenizer)).train
        return dpo_trainer(profile, model, tokenizer, pairs, Path(run_folder) / CHECKPOINTS_DIRNAME,
                           progress=progress, **overrides)

    return train_with(profile, run_folder, build, progress=progress, resume=checkpoint)


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


def set_seed(seed: int) -> None:
    """One seed for python, numpy and torch (CPU runs are then bit-for-bit reproducible)."""
    hf_set_seed(seed)
