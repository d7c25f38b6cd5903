"""How the course's tiny chat model (data/tiny_model) was made: a 1.1M-parameter Mistral built offline to stand in
for OpenHermes-2.5. Every learner gets the same shipped model; this script shows how it came about and rebuilds one
(tests/test_build_tiny_model.py checks that a rebuild on another machine is as good, not that it has the same bits:
floating-point sums differ between hosts).

    python scripts/build_tiny_model.py OUT_DIR            # about 2.5 minutes on one CPU core

It is built in three steps, from a seed:

1. a byte-level BPE tokenizer trained on the project's own text, with ChatML's ``<|im_start|>`` and
   ``<|im_end|>`` as special tokens, eos = ``<|im_end|>`` and a separate pad token, and
   OpenHermes-2.5's ChatML chat template;
2. a ``MistralForCausalLM`` with grouped-query attention and Mistral-7B's module names, so the
   recipe's LoRA target list applies unchanged;
3. a short instruction tuning with TRL's SFTTrainer on ``data/sft.jsonl``, so its greedy answers are
   ChatML-shaped and end with ``<|im_end|>`` - the role OpenHermes-2.5 plays for Mistral-7B.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
import tokenizers
import torch
import transformers
import trl
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast, PrinterCallback
from transformers.utils import logging as hf_logging
from trl import SFTConfig, SFTTrainer

from helpers.chatml import CHATML_TEMPLATE, IM_END, IM_START
from helpers.profiles import DATA_DIR

PAD, UNK = "<pad>", "<unk>"
BUILD_THREADS = 1  # torch threads while building: the sums in one order on a given machine


@dataclass(frozen=True)
class TinyRecipe:
    """Everything that decides the tiny model; its hash names the cache folder."""

    vocab_size: int = 2048
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 512
    sft_steps: int = 600
    sft_batch_size: int = 16
    sft_learning_rate: float = 3e-3
    seed: int = 1234
    version: int = 1  # bump to force a rebuild when the build code changes meaning


def _corpus() -> list[str]:
    """The project's own text, for training the tokenizer."""
    texts: list[str] = []
    for name in ("train.jsonl", "heldout.jsonl"):
        for line in (DATA_DIR / name).read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            texts += [row["system"], row["question"], row["chosen"], row["rejected"]]
    for line in (DATA_DIR / "sft.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        texts += [m["content"] for m in row.get("messages", [])] + ([row["text"]] if "text" in row else [])
    texts += ["system", "user", "assistant"]
    return [t for t in texts if t]


def build_tokenizer(recipe: TinyRecipe = TinyRecipe()):
    """A byte-level BPE tokenizer trained on the project's text, with ChatML special tokens and template."""
    bpe = Tokenizer(models.BPE(unk_token=None))
    # Digits one per token (numbers compare digit by digit), then GPT-2 style byte-level pieces.
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=recipe.vocab_size,
        special_tokens=[PAD, UNK, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=IM_END,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[IM_START],
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.padding_side = "right"
    return tokenizer


def build_untrained_model(tokenizer, recipe: TinyRecipe = TinyRecipe()):
    """A randomly initialised MistralForCausalLM with grouped-query attention (seeded)."""
    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=recipe.num_attention_heads,
        num_key_value_heads=recipe.num_key_value_heads,
        max_position_embeddings=recipe.max_position_embeddings,
        sliding_window=None,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(recipe.seed)
    model = MistralForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def _sft_dataset(tokenizer):
    """Prompt/completion pairs from data/sft.jsonl: chat turns rendered with the template, statements as text."""
    prompts, completions = [], []
    for line in (DATA_DIR / "sft.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if "messages" in row:
            turns = row["messages"]
            prompts.append(tokenizer.apply_chat_template(turns[:-1], add_generation_prompt=True, tokenize=False))
            completions.append(turns[-1]["content"] + IM_END)
        else:
            prompts.append("")
            completions.append(row["text"] + IM_END)
    return Dataset.from_dict({"prompt": prompts, "completion": completions})


def _instruction_tune(model, tokenizer, recipe: TinyRecipe, work_dir: Path, progress: bool) -> list[float]:
    """Answer-only SFT with TRL's SFTTrainer; returns the logged training losses."""
    config = SFTConfig(
        output_dir=str(work_dir / "sft"),
        max_steps=recipe.sft_steps,
        per_device_train_batch_size=recipe.sft_batch_size,
        learning_rate=recipe.sft_learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=20,
        weight_decay=0.0,
        optim="adamw_torch",
        use_cpu=True,
        bf16=False,
        fp16=False,
        logging_steps=50,
        save_strategy="no",
        report_to="none",
        seed=recipe.seed,
        data_seed=recipe.seed,
        max_length=256,
        completion_only_loss=True,
        disable_tqdm=not progress,
        dataloader_num_workers=0,
    )
    hf_logging.set_verbosity_error()
    with contextlib.redirect_stdout(io.StringIO()):  # SFTTrainer prints its own banner lines
        dataset = _sft_dataset(tokenizer)
        trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    if not progress:  # with the bar off, the Trainer prints every logged dict instead: keep logs short
        trainer.remove_callback(PrinterCallback)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def build_tiny_model(out_dir: str | Path, recipe: TinyRecipe = TinyRecipe(), *, progress: bool = True) -> Path:
    """Build the tiny chat model into ``out_dir`` (replaced if it exists) and return it, loadable with
    ``from_pretrained``. Written to a temporary folder first and renamed: an interrupted build leaves nothing."""
    target = Path(out_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS)
    if not progress:
        datasets.disable_progress_bars()  # "Dropping fully masked examples", one bar per call, in a log
        hf_logging.disable_progress_bar()  # "Writing model shards"
    logging.getLogger("transformers").setLevel(logging.ERROR)
    started = time.perf_counter()
    try:
        torch.manual_seed(recipe.seed)
        tokenizer = build_tokenizer(recipe)
        model = build_untrained_model(tokenizer, recipe)
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".building-") as tmp:
            if progress:
                print(f"building the tiny chat model ({model.num_parameters():,} parameters)")
            losses = _instruction_tune(model, tokenizer, recipe, Path(tmp), progress)
            out = Path(tmp) / "model"
            model.save_pretrained(out, safe_serialization=True)
            tokenizer.save_pretrained(out)
            info = {"recipe": asdict(recipe), "parameters": model.num_parameters(), "sft_losses": losses,
                    "build_seconds": round(time.perf_counter() - started, 1),
                    "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                                 "trl": trl.__version__, "tokenizers": tokenizers.__version__}}
            (out / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
            if target.exists():
                shutil.rmtree(target)
            out.replace(target)
    finally:
        torch.set_num_threads(threads)
    if progress:
        print(f"built in {info['build_seconds']} s (SFT loss {losses[0]:.2f} -> {losses[-1]:.2f})")
    return target


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
        print(__doc__)
        sys.exit(2)
    build_tiny_model(sys.argv[1], progress=sys.stdout.isatty())
