"""ChatML formatting of preference pairs, as the NeuralHermes recipe does it - adapted to TRL 1.x.

ChatML wraps every turn as ``<|im_start|>{role}\\n{content}<|im_end|>\\n``; OpenHermes-2.5 was trained
on it, so its DPO data must speak it too. The recipe maps one orca row to

- ``prompt``: the system turn (only when the row has one) + the user turn + ``<|im_start|>assistant\\n``
- ``chosen`` / ``rejected``: the answer followed by the end-of-turn token.

TRL 1.x appends the tokenizer's EOS to any answer that does not already end with it. The recipe's
literal ``answer + "<|im_end|>\\n"`` ends with a newline, so TRL adds a second ``<|im_end|>``: the model
is taught to end every turn twice. :func:`format_orca_row` ends the answer with exactly the EOS token.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CONTROL_STRINGS = (IM_START, IM_END)
# An invisible word joiner inside "<|" stops the tokenizer from reading the text as a control token.
_ESCAPE = "<\u2060|"


class ChatMLInjectionError(ValueError):
    """A question or answer contains a ChatML control string that would forge or end a turn."""


def find_control_strings(text: str) -> list[str]:
    """The ChatML control strings that occur in ``text`` (empty list when clean)."""
    return [c for c in CONTROL_STRINGS if c in text]


def escape_control_strings(text: str) -> str:
    """Make ChatML control strings inert: ``<|im_start|>`` becomes ``<\u2060|im_start|>`` (a word joiner after '<').

    The text still reads the same to a person, but the tokenizer no longer sees a special token, so
    the content cannot open or close a turn.
    """
    for control in CONTROL_STRINGS:
        text = text.replace(control, control.replace("<|", _ESCAPE))
    return text


def _check_content(row: Mapping[str, Any], on_control: str, where: str) -> dict[str, str]:
    """Apply the control-string policy to system/question/chosen/rejected of one row."""
    if on_control not in {"error", "escape"}:
        raise ValueError(f"on_control must be 'error' or 'escape', not {on_control!r}")
    cleaned = {}
    for field in ("system", "question", "chosen", "rejected"):
        value = row[field] or ""
        found = find_control_strings(value)
        if found and on_control == "error":
            raise ChatMLInjectionError(
                f"{where}, field {field!r} contains the ChatML control string {found[0]!r}, which would "
                f"forge or end a turn. Clean the data, or pass on_control='escape' to make it inert."
            )
        cleaned[field] = escape_control_strings(value) if found else value
    return cleaned


def _require_chatml_eos(tokenizer) -> None:
    if tokenizer.chat_template is None:
        raise ValueError("the tokenizer has no chat template; load the chat model's own tokenizer (ChatML)")
    if tokenizer.eos_token != IM_END:
        raise ValueError(
            f"the tokenizer's eos token is {tokenizer.eos_token!r}, not {IM_END!r}: TRL would end every "
            f"ChatML answer with {tokenizer.eos_token!r}; use a ChatML chat model's tokenizer"
        )


def prompt_messages(system: str, question: str) -> list[dict[str, str]]:
    """The chat messages of one prompt: a system turn only when ``system`` is non-empty (whitespace is empty)."""
    messages = [{"role": "system", "content": system}] if system and system.strip() else []
    return messages + [{"role": "user", "content": question}]


def render_prompt(tokenizer, system: str, question: str) -> str:
    """The ChatML prompt text ending with ``<|im_start|>assistant\\n``, rendered by the tokenizer's template."""
    return tokenizer.apply_chat_template(prompt_messages(system, question), add_generation_prompt=True, tokenize=False)


def render_chatml_prompt(tokenizer, system: str, question: str) -> str:
    """The prompt rendered with OpenHermes-2.5's own ChatML template (``helpers.tiny_model.CHATML_TEMPLATE``),
    whatever template ``tokenizer`` carries: no default system turn, unlike Qwen2.5's. The reference for ChatML
    written by hand (notebook 01, exercise 1)."""
    from helpers.tiny_model import CHATML_TEMPLATE

    messages = prompt_messages(system, question)
    return tokenizer.apply_chat_template(messages, chat_template=CHATML_TEMPLATE, add_generation_prompt=True,
                                         tokenize=False)


def format_orca_row(
    row: Mapping[str, Any], tokenizer, *, on_control: str = "error", where: str = "row"
) -> dict[str, str]:
    """One orca row (system, question, chosen, rejected) as a TRL 1.x DPO example in ChatML.

    The answers end with exactly one ``<|im_end|>`` (the tokenizer's EOS), so TRL adds nothing.
    """
    _require_chatml_eos(tokenizer)
    clean = _check_content(row, on_control, where)
    return {
        "prompt": render_prompt(tokenizer, clean["system"], clean["question"]),
        "chosen": clean["chosen"] + tokenizer.eos_token,
        "rejected": clean["rejected"] + tokenizer.eos_token,
    }


def format_orca_row_as_seed(row: Mapping[str, Any], tokenizer) -> dict[str, str]:
    """The seed notebook's formatting, kept to show the trap: answers end with ``<|im_end|>\\n``.

    Under TRL 1.x this trains on a doubled end token (TRL appends EOS because the text ends in a newline).
    """
    return {
        "prompt": render_prompt(tokenizer, row["system"], row["question"]),
        "chosen": row["chosen"] + "<|im_end|>\n",
        "rejected": row["rejected"] + "<|im_end|>\n",
    }


def format_conversational_row(row: Mapping[str, Any], *, on_control: str = "error", where: str = "row") -> dict:
    """The same pair in TRL's conversational form: lists of messages; TRL applies the chat template itself."""
    clean = _check_content(row, on_control, where)
    return {
        "prompt": prompt_messages(clean["system"], clean["question"]),
        "chosen": [{"role": "assistant", "content": clean["chosen"]}],
        "rejected": [{"role": "assistant", "content": clean["rejected"]}],
    }


def format_dataset(dataset, tokenizer, *, on_control: str = "error", split: str = "train"):
    """``datasets.map`` of :func:`format_orca_row` over a whole split; keeps ``kind`` when present."""
    keep = {"kind"} & set(dataset.column_names)
    drop = [c for c in dataset.column_names if c not in keep]

    def _map(row: dict, index: int) -> dict:
        return format_orca_row(row, tokenizer, on_control=on_control, where=f"split {split!r}, row {index + 1}")

    return dataset.map(_map, with_indices=True, remove_columns=drop, desc=f"ChatML-formatting {split}")


@dataclass(frozen=True)
class LengthReport:
    """What length filtering kept and dropped, and why."""

    kept: int
    dropped_prompt_too_long: int
    dropped_pair_too_long: int
    max_prompt_length: int
    max_length: int

    def __str__(self) -> str:
        total = self.kept + self.dropped_prompt_too_long + self.dropped_pair_too_long
        return (
            f"kept {self.kept} of {total} pairs; dropped {self.dropped_prompt_too_long} with a prompt over "
            f"{self.max_prompt_length} tokens and {self.dropped_pair_too_long} with prompt + longer answer over "
            f"{self.max_length} tokens"
        )


def add_token_lengths(formatted, tokenizer):
    """Add ``prompt_tokens`` and ``pair_tokens`` (prompt + the longer answer) to a formatted dataset."""

    def _lengths(batch: dict) -> dict:
        count = lambda texts: [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]  # noqa: E731
        prompt, chosen, rejected = count(batch["prompt"]), count(batch["chosen"]), count(batch["rejected"])
        return {"prompt_tokens": prompt, "pair_tokens": [p + max(c, r) for p, c, r in zip(prompt, chosen, rejected)]}

    return formatted.map(_lengths, batched=True, desc="counting tokens")


def filter_by_length(formatted, tokenizer, max_prompt_length: int, max_length: int):
    """Drop pairs whose prompt exceeds ``max_prompt_length`` or whose prompt + answer exceeds ``max_length``.

    TRL 1.x only has ``max_length`` and truncates the end of prompt + answer, which would cut answers
    mid-sentence (and their end token); dropping whole pairs keeps every training answer intact.
    Returns ``(filtered_dataset, LengthReport)``.
    """
    measured = formatted if "pair_tokens" in formatted.column_names else add_token_lengths(formatted, tokenizer)
    prompt_long = sum(1 for n in measured["prompt_tokens"] if n > max_prompt_length)
    lengths = zip(measured["prompt_tokens"], measured["pair_tokens"])
    pair_long = sum(1 for p, n in lengths if p <= max_prompt_length and n > max_length)
    kept = measured.filter(
        lambda row: row["prompt_tokens"] <= max_prompt_length and row["pair_tokens"] <= max_length,
        desc="dropping over-long pairs",
    )
    return kept, LengthReport(len(kept), prompt_long, pair_long, max_prompt_length, max_length)


# --- what TRL 1.x really trains on ------------------------------------------------------------


def trl_tokenized_answers(rows, tokenizer, model, profile) -> list[dict[str, list[int]]]:
    """Run TRL's own DPO preprocessing on ``rows`` and return its token ids, row by row.

    ``rows`` are formatted pairs (a list of dicts or a ``datasets.Dataset``) in the standard form
    (strings, e.g. from :func:`format_orca_row`) or the conversational form (messages, from
    :func:`format_conversational_row`). A real ``trl.DPOTrainer`` is built on them exactly as training
    builds it (``ref_model=None``, the profile's LoRA adapter, the profile's ``DPOConfig``), so what comes
    back is what DPO would train on: ``prompt_ids``, ``chosen_ids`` and ``rejected_ids`` per row, after TRL
    has appended EOS where it wanted to. Nothing is trained. The adapter TRL injects into ``model`` is
    removed again before returning, so the same model can be passed several times. TRL drops pairs whose prompt
    alone fills ``max_length``; then this raises instead of returning ids that no longer line up with ``rows``.
    """
    import tempfile

    from datasets import Dataset
    from trl import DPOTrainer

    from helpers.lora import lora_config
    from helpers.training import dpo_config

    dataset = rows if isinstance(rows, Dataset) else Dataset.from_list([dict(r) for r in rows])
    extra = [c for c in dataset.column_names if c not in {"prompt", "chosen", "rejected"}]
    dataset = dataset.remove_columns(extra)
    with tempfile.TemporaryDirectory(prefix="trl-tokenize-") as tmp:
        trainer = DPOTrainer(
            model=model,
            ref_model=None,
            # nothing is trained: no reference pass over the data (the tiny profile precomputes one), no bars
            args=dpo_config(profile, tmp, max_steps=1, save_strategy="no", logging_strategy="no",
                            precompute_ref_log_probs=False, precompute_ref_batch_size=None, disable_tqdm=True),
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=lora_config(profile),
        )
        try:
            if len(trainer.train_dataset) != len(dataset):
                raise ValueError(
                    f"TRL dropped {len(dataset) - len(trainer.train_dataset)} of {len(dataset)} pairs whose prompt "
                    f"alone fills max_length={profile.dpo.max_length} tokens, so the ids would not line up with the "
                    "rows: pass pairs that fit (helpers.chatml.rows_that_fit, filter_by_length)"
                )
            columns = ("prompt_ids", "chosen_ids", "rejected_ids")
            return [{name: list(example[name]) for name in columns} for example in trainer.train_dataset]
        finally:
            if hasattr(trainer.model, "unload"):
                trainer.model.unload()  # take TRL's LoRA layers out again: the caller's model is unchanged


def rows_that_fit(dataset, tokenizer, max_prompt_length: int, max_length: int, count: int) -> list[dict]:
    """The first ``count`` raw rows of ``dataset`` whose ChatML pair (:func:`format_orca_row`) fits both limits, in
    order: rows TRL will keep, to look at its preprocessing without a pair being dropped on the way."""
    found = []
    for row in dataset:
        pair = format_orca_row(row, tokenizer)
        prompt = len(tokenizer(pair["prompt"], add_special_tokens=False)["input_ids"])
        answer = max(len(tokenizer(pair[k], add_special_tokens=False)["input_ids"]) for k in ("chosen", "rejected"))
        if prompt <= max_prompt_length and prompt + answer <= max_length:
            found.append(dict(row))
            if len(found) == count:
                return found
    raise ValueError(f"only {len(found)} rows fit max_prompt_length={max_prompt_length}, max_length={max_length}")


def end_token_trained(batch: dict, eos_token_id: int, loss_mask: str = "completion_mask") -> list[bool]:
    """For each sequence of a collated batch: is its last real token (``attention_mask`` 1) the EOS, and is it in
    the loss?

    ``loss_mask``: ``"completion_mask"`` for TRL's preference collator, ``"labels"`` for a language-modelling
    collator (a label of -100 is left out of the loss). Padding that reuses the EOS id does not count as the end.
    """
    trained = []
    for row in range(batch["input_ids"].shape[0]):
        last = int(batch["attention_mask"][row].nonzero().max())
        in_loss = batch[loss_mask][row, last] != (-100 if loss_mask == "labels" else 0)
        trained.append(bool(batch["input_ids"][row, last] == eos_token_id and in_loss))
    return trained


def token_strings(ids: list[int], tokenizer) -> list[str]:
    """Each token id decoded on its own, so a newline shows as ``'\\n'`` and special tokens by name."""
    return [tokenizer.decode([i]) for i in ids]


def end_token_counts(tokenized: list[dict[str, list[int]]], tokenizer) -> dict[str, list[int]]:
    """How many end-of-turn (EOS) tokens each tokenised chosen and rejected answer holds.

    The right answer is 1 everywhere: the model should learn to end a turn once.
    """
    eos = tokenizer.eos_token_id
    return {side: [row[f"{side}_ids"].count(eos) for row in tokenized] for side in ("chosen", "rejected")}


def ends_with_single_eos(tokenized: list[dict[str, list[int]]], tokenizer) -> bool:
    """True when every answer holds exactly one EOS token and it is the answer's last token."""
    eos = tokenizer.eos_token_id
    return all(
        row[key].count(eos) == 1 and row[key][-1] == eos for row in tokenized for key in ("chosen_ids", "rejected_ids")
    )


def control_token_ids(text: str, tokenizer) -> list[int]:
    """The ids of ChatML control tokens (``<|im_start|>``, ``<|im_end|>``) the tokenizer makes out of ``text``.

    Non-empty for plain text means the text can forge or end a turn once it is inside a ChatML prompt.
    """
    special = {tokenizer.convert_tokens_to_ids(c) for c in CONTROL_STRINGS}
    return [i for i in tokenizer(text, add_special_tokens=False)["input_ids"] if i in special]
