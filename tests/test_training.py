"""Notebook 04 and helpers/training.py: the recipe in the notebook's cell is the model card's, the course's fix of the
adapter's dtype does what 04 says, saves are atomic, a cut run resumes from its newest complete checkpoint to the run
that was never cut, and a finished run is read back as it was trained."""

from __future__ import annotations

import ast
import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, TrainerCallback
from trl import DPOConfig, DPOTrainer

from helpers import training
from helpers.models import keep_nf4_trainable, logits_of
from helpers.profiles import COURSE_DPO, FULL, REPO_ROOT, fit_to_machine

NOTEBOOK = REPO_ROOT / "notebooks" / "04_dpo_training.ipynb"
# NeuralHermes-2.5-Mistral-7B's model card, "Training hyperparameters" (bf16 from the seed notebook it links to).
CARD = {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 4, "gradient_checkpointing": True,
        "learning_rate": 5e-5, "lr_scheduler_type": "cosine", "max_steps": 200, "optim": "paged_adamw_32bit",
        "warmup_steps": 100, "bf16": True, "beta": 0.1, "max_length": 1536}


def notebook_assignment(name: str) -> ast.expr:
    """The value assigned to ``name`` in a code cell of notebook 04 (the cell's own source, parsed)."""
    for cell in nbformat.read(NOTEBOOK, as_version=4).cells:
        if cell.cell_type != "code" or name not in cell.source:
            continue
        for node in ast.walk(ast.parse(cell.source)):
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
                return node.value
    raise AssertionError(f"no code cell of {NOTEBOOK.name} assigns {name!r}")


def test_the_notebooks_card_is_the_model_cards_and_the_full_profiles() -> None:
    call = notebook_assignment("card")
    assert isinstance(call, ast.Call) and call.func.id == "dict" and not call.args
    card = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
    assert card == CARD
    assert card == {k: v for k, v in FULL.dpo.items() if k not in COURSE_DPO}
    assert "max_prompt_length" not in card  # TRL 1.x has no such argument


def test_on_an_a100_the_cell_is_the_card_and_on_a_t4_only_precision_changes() -> None:
    a100 = fit_to_machine(FULL, cuda=True, bf16=True)
    assert a100.changes("dpo") == {} and a100.dpo == CARD | COURSE_DPO
    t4 = fit_to_machine(FULL, cuda=True, bf16=False)
    assert t4.changes("dpo") == {"bf16": False, "fp16": True}
    assert all(f"dpo.{key}" in t4.why for key in t4.changes("dpo"))  # every change printed with its reason


def test_dpo_config_takes_the_card_as_the_card_states_it(tmp_path) -> None:
    # use_cpu only because this machine has no GPU; every other value as the notebook's cell passes it
    config = DPOConfig(output_dir=str(tmp_path), **(CARD | COURSE_DPO), use_cpu=True)
    for key, expected in CARD.items():
        got = getattr(config, key)
        assert getattr(got, "value", got) == expected, key
    assert config.loss_type == ["sigmoid"] and config.disable_dropout


# --- prepare_trainer: the adapter's dtype on a 4-bit model -------------------------------------------------------

PAIRS = Dataset.from_list([{"prompt": "<|im_start|>user\nWhat is a cup for?<|im_end|>\n<|im_start|>assistant\n",
                            "chosen": "Drinking.<|im_end|>", "rejected": "I cannot say.<|im_end|>"}] * 4)


def four_bit_trainer(profile, tokenizer, tmp_path: Path, **precision) -> DPOTrainer:
    """A real DPOTrainer on the tiny model loaded in 4-bit NF4, as notebook 04 builds one on a GPU profile."""
    model = AutoModelForCausalLM.from_pretrained(
        profile.model_id, dtype="float32",
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_compute_dtype="float32"))
    keep_nf4_trainable(model)
    args = DPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, max_steps=1,
                     per_device_train_batch_size=2, **precision)
    return DPOTrainer(model=model, args=args, train_dataset=PAIRS, processing_class=tokenizer,
                      peft_config=LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]))


def trainable_dtypes(trainer) -> set[torch.dtype]:
    return {p.dtype for p in trainer.model.parameters() if p.requires_grad}


@pytest.mark.parametrize(("precision", "after"), [({"bf16": False}, torch.float32),
                                                  ({"bf16": False, "fp16": True}, torch.float32),
                                                  ({"bf16": True}, torch.bfloat16)])
def test_prepare_trainer_casts_trls_bf16_adapter_back_to_fp32_except_under_bf16(profile, tokenizer, tmp_path,
                                                                                 precision, after) -> None:
    trainer = four_bit_trainer(profile, tokenizer, tmp_path, **precision)
    assert trainable_dtypes(trainer) == {torch.bfloat16}  # what TRL 1.16 leaves on a quantised model
    training.prepare_trainer(trainer, progress=False)
    assert trainable_dtypes(trainer) == {after}
    assert all(not layer.support_avx512bf16_for_cpu for layer in trainer.model.modules()
               if hasattr(layer, "support_avx512bf16_for_cpu"))  # the CPU repacking guard is on


def test_prepare_trainer_leaves_one_progress_bar(profile, tokenizer, tmp_path) -> None:
    trainer = training.prepare_trainer(four_bit_trainer(profile, tokenizer, tmp_path), desc="steps")
    names = [type(c).__name__ for c in trainer.callback_handler.callbacks]
    assert names.count("CompactProgress") == 1
    assert not {"PrinterCallback", "ProgressCallback", "NotebookProgressCallback"} & set(names)


# --- saving, resuming, reading back ------------------------------------------------------------------------------

def file_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_save_that_fails_midway_leaves_the_previous_adapter_intact(profile, tokenizer, tmp_path,
                                                                     monkeypatch) -> None:
    trainer = training.prepare_trainer(four_bit_trainer(profile, tokenizer, tmp_path / "ckpt"), progress=False)
    run_folder = tmp_path / "runs" / "tiny-main"
    training.save_run(trainer, profile, run_folder, seconds=1.0)
    before = file_hashes(run_folder)

    def half_a_save(folder, *args, **kwargs):
        (Path(folder) / "adapter_model.safetensors").write_bytes(b"half of a new adapter")
        raise OSError("disk full")

    monkeypatch.setattr(trainer.model, "save_pretrained", half_a_save)
    with pytest.raises(OSError, match="disk full"):
        training.save_run(trainer, profile, run_folder, seconds=2.0)
    assert file_hashes(run_folder) == before  # nothing half-written where the old adapter was, nothing left over
    assert sorted(p.name for p in run_folder.iterdir()) == ["adapter", "history.json", "run_info.json"]


class Cut(TrainerCallback):
    """Ends the process's run right after step ``at`` (as a killed Colab session would): an exception, no save."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            raise KeyboardInterrupt(f"cut after step {self.at}")


def cut_trainer(at: int) -> type:
    class CutDPOTrainer(DPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(Cut(at))

    return CutDPOTrainer


SHORT = dict(max_steps=6, save_steps=2, save_total_limit=5, logging_steps=1, warmup_steps=1, progress=False)


@pytest.fixture(scope="module")
def small_data(profile, tokenizer):
    from helpers.data import prepare_data

    return prepare_data(profile, tokenizer).train.select(range(32))


@pytest.fixture(scope="module")
def whole_run(profile, small_data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("whole") / "runs" / "tiny-whole"
    return training.train_dpo(profile, folder, small_data, **SHORT)


def test_a_cut_run_resumes_from_its_newest_complete_checkpoint_to_the_uncut_run(profile, small_data, whole_run,
                                                                                tmp_path) -> None:
    folder = tmp_path / "runs" / "tiny-cut"
    with pytest.raises(KeyboardInterrupt):
        training.train_dpo(profile, folder, small_data, trainer_class=cut_trainer(5), **SHORT)
    assert not (folder / "adapter").exists() and not (folder / "history.json").exists()
    checkpoints = folder / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    half = checkpoints / "checkpoint-6"  # a checkpoint cut while it was written: no trainer_state.json yet
    half.mkdir()
    (half / "adapter_model.safetensors").write_bytes(b"half")

    resumed = training.train_dpo(profile, folder, small_data, resume=True, **SHORT)
    assert [row["step"] for row in resumed.history] == [float(s) for s in range(1, 7)]  # 1-4 from checkpoint-4
    for mine, reference in zip(resumed.history, whole_run.history):
        assert mine["loss"] == pytest.approx(reference["loss"], abs=1e-5), mine["step"]
    probe = {"input_ids": torch.tensor([[5, 6, 7, 8, 9, 10]])}
    assert torch.allclose(logits_of(resumed.model, probe), logits_of(whole_run.model, probe), atol=1e-4)


def test_resume_without_a_checkpoint_says_so(profile, small_data, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        training.train_dpo(profile, tmp_path / "runs" / "tiny-none", small_data, resume=True, **SHORT)


def test_a_finished_run_reads_back_as_trained_and_is_not_trained_again(profile, small_data, whole_run,
                                                                       monkeypatch) -> None:
    folder = whole_run.adapter_dir.parent
    changes = {k: v for k, v in SHORT.items() if k != "progress"}
    monkeypatch.setattr(training, "train_dpo", lambda *a, **k: pytest.fail("a finished run was trained again"))
    again = training.train_dpo_once(profile, folder, small_data, **SHORT)
    assert again.trainer is None and again.history == whole_run.history and again.steps == 6
    probe = {"input_ids": torch.tensor([[5, 6, 7, 8, 9, 10]])}
    assert torch.allclose(logits_of(again.model, probe), logits_of(whole_run.model, probe), atol=1e-5)
    saved = json.loads((whole_run.adapter_dir / "course_profile.json").read_text())
    assert saved["dpo"] == {**profile.dpo, **changes}  # the settings that trained it travel with the adapter
    assert not training.finished(profile.with_changes("dpo", beta=0.5, **changes), folder)


def test_log_history_keeps_the_logged_steps_and_their_numbers() -> None:
    trainer = SimpleNamespace(state=SimpleNamespace(log_history=[
        {"loss": 0.7, "step": 1, "rewards/margins": 0.0, "note": "text"},
        {"train_runtime": 3.0, "step": 2},  # the summary row at the end: no loss
        {"loss": 0.6, "step": 2, "flag": True}]))
    assert training.log_history(trainer) == [{"loss": 0.7, "step": 1.0, "rewards/margins": 0.0},
                                             {"loss": 0.6, "step": 2.0, "flag": 1.0}]


def test_saturation_warning_only_in_the_first_quarter() -> None:
    early = [{"step": 5, "rewards/accuracies": 0.5}, {"step": 20, "rewards/accuracies": 1.0}]
    late = [{"step": 5, "rewards/accuracies": 0.5}, {"step": 30, "rewards/accuracies": 1.0}]
    assert "step 20 of 100" in training.saturation_warning(early, 100)
    assert training.saturation_warning(late, 100) is None
