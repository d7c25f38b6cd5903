"""ChatML formatting of preference pairs (notebook 01), as the NeuralHermes recipe does it, adapted to TRL 1.x.

ChatML wraps every turn as ``<|im_start|>{role}\\n{content}<|im_end|>\\n``. One orca row becomes

- ``prompt``: the system turn (only when the row has one) + the user turn + ``<|im_start|>assistant\\n``;
- ``chosen`` / ``rejected``: the answer followed by exactly one end-of-turn token (the tokenizer's EOS).

TRL 1.x appends the EOS to any answer that does not already end with it: the recipe's ``answer + "<|im_end|>\\n"``
ends with a newline, so TRL adds a second ``<|im_end|>`` (:func:`format_orca_row_as_seed` keeps that trap to show).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from helpers.profiles import DATA_DIR

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CONTROL_STRINGS = (IM_START, IM_END)
_ESCAPE = "<\u2060|"  # an invisible word joiner inside "<|": the tokenizer no longer sees a control token
# OpenHermes-2.5-Mistral-7B's chat template, as published with that model (the tiny model carries it too).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# A small tokenizer made as Mistral's is (sentencepiece-style BPE, "▁" word starts, <s> first, OpenHermes' ChatML
# tokens), trained on the course's own text: notebook 01 shows the tiny and t4 profiles what Mistral's tokenizer does.
SENTENCEPIECE_TOKENIZER = DATA_DIR / "sentencepiece_tokenizer"


class ChatMLInjectionError(ValueError):
    """A question or answer contains a ChatML control string that would forge or end a turn."""


def find_control_strings(text: str) -> list[str]:
    """The ChatML control strings that occur in ``text`` (empty when clean)."""
    return [c for c in CONTROL_STRINGS if c in text]


def escape_control_strings(text: str) -> str:
    """Make ChatML control strings inert (``<|im_end|>`` -> ``<\u2060|im_end|>``): it reads the same to a person,
    but the tokenizer no longer makes a special token of it, so the text cannot open or close a turn."""
    for control in CONTROL_STRINGS:
        text = text.replace(control, control.replace("<|", _ESCAPE))
    return text


def control_token_ids(text: str, tokenizer) -> list[int]:
    """The ids of ChatML control tokens the tokenizer makes out of ``text``: non-empty means it can forge a turn."""
    special = {tokenizer.convert_tokens_to_ids(c) for c in CONTROL_STRINGS}
    return [i for i in tokenizer(text, add_special_tokens=False)["input_ids"] if i in special]


def prompt_messages(system: str, question: str) -> list[dict[str, str]]:
    """The chat messages of one prompt: a system turn only when ``system`` holds more than whitespace."""
    messages = [{"role": "system", "content": system}] if system and system.strip() else []
    return messages + [{"role": "user", "content": question}]


def _clean(row: Mapping[str, Any], on_control: str, where: str) -> dict[str, str]:
    """system/question/chosen/rejected of one row, with ChatML control strings refused or escaped."""
    if on_control not in {"error", "escape"}:
        raise ValueError(f"on_control must be 'error' or 'escape', not {on_control!r}")
    cleaned = {}
    for name in ("system", "question", "chosen", "rejected"):
        value = row[name] or ""
        found = find_control_strings(value)
        if found and on_control == "error":
            raise ChatMLInjectionError(
                f"{where}, field {name!r} contains the ChatML control string {found[0]!r}, which would forge or end "
                "a turn. Clean the data, or pass on_control='escape' to make it inert.")
        cleaned[name] = escape_control_strings(value) if found else value
    return cleaned


def format_orca_row(row: Mapping[str, Any], tokenizer, *, on_control: str = "error",
                    where: str = "row") -> dict[str, str]:
    """One orca row as a TRL 1.x DPO example in ChatML; each answer ends with exactly one EOS, so TRL adds none."""
    if not tokenizer.chat_template:
        raise ValueError("the tokenizer has no chat template; load the chat model's own tokenizer (ChatML)")
    if tokenizer.eos_token != IM_END:
        raise ValueError(f"the tokenizer's eos token is {tokenizer.eos_token!r}, not {IM_END!r}: TRL would end every "
                         "ChatML answer with it; use a ChatML chat model's tokenizer")
    clean = _clean(row, on_control, where)
    messages = prompt_messages(clean["system"], clean["question"])
    return {
        "prompt": tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
        "chosen": clean["chosen"] + tokenizer.eos_token,
        "rejected": clean["rejected"] + tokenizer.eos_token,
    }


def format_orca_row_as_seed(row: Mapping[str, Any], tokenizer) -> dict[str, str]:
    """The seed notebook's formatting, kept to show the trap: answers end with ``<|im_end|>\\n``."""
    messages = prompt_messages(row["system"], row["question"])
    return {"prompt": tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
            "chosen": row["chosen"] + "<|im_end|>\n", "rejected": row["rejected"] + "<|im_end|>\n"}


def format_conversational_row(row: Mapping[str, Any], *, on_control: str = "error", where: str = "row") -> dict:
    """The same pair in TRL's conversational form: lists of messages; TRL applies the chat template itself."""
    clean = _clean(row, on_control, where)
    return {"prompt": prompt_messages(clean["system"], clean["question"]),
            "chosen": [{"role": "assistant", "content": clean["chosen"]}],
            "rejected": [{"role": "assistant", "content": clean["rejected"]}]}


def format_dataset(dataset, tokenizer, *, on_control: str = "error", split: str = "train"):
    """:func:`format_orca_row` over a whole ``datasets.Dataset``; other columns (``kind``, ...) are kept."""
    drop = [c for c in ("system", "question", "chosen", "rejected") if c in dataset.column_names]

    def _map(row: dict, index: int) -> dict:
        return format_orca_row(row, tokenizer, on_control=on_control, where=f"split {split!r}, row {index + 1}")

    return dataset.map(_map, with_indices=True, remove_columns=drop, desc=f"ChatML-formatting {split}")


def adds_word_start(tokenizer) -> bool:
    """True for a sentencepiece-style tokenizer (Mistral's, Llama 2's): it marks the first word of a string tokenised
    alone as a word start (``▁Here``), so ``enc(prompt + answer)`` is not ``enc(prompt) + enc(answer)``. Byte-level
    BPE tokenizers (GPT-2's, Qwen's, the tiny model's) do not."""
    first = tokenizer.convert_ids_to_tokens(tokenizer("Here", add_special_tokens=False)["input_ids"])[0]
    return first.startswith("\u2581")


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading ids two token lists share."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def tokenize_pair(tokenizer, prompt: str, *answers: str) -> tuple[list[int], ...]:
    """``(prompt_ids, answer_ids, ...)`` exactly as TRL 1.16's ``DPOTrainer`` tokenises a pair in the standard form.

    TRL tokenises the prompt, and prompt + answer, *together* (``tokenizer(text)``: the tokenizer's own special tokens
    included, so a sentencepiece tokenizer such as Mistral's puts ``<s>`` first), and an answer starts where the two
    diverge. Tokenising the answer alone would give other tokens: a sentencepiece tokenizer adds a word-start ``▁`` to
    a string's first word (:func:`adds_word_start`). Given both answers of a pair, TRL cuts both at the shorter of their
    two common prefixes (a token that merges across the prompt's end, such as a "\nI" piece, then counts as part of
    both answers). The course scores with these ids (helpers.scoring), so what it measures is what TRL trained.
    """
    prompt_ids = tokenizer(prompt)["input_ids"]
    full = [tokenizer(prompt + answer)["input_ids"] for answer in answers]
    split = min(common_prefix(prompt_ids, ids) for ids in full)
    return (prompt_ids[:split], *(ids[split:] for ids in full))


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
        return (f"kept {self.kept} of {total} pairs; dropped {self.dropped_prompt_too_long} with a prompt over "
                f"{self.max_prompt_length} tokens and {self.dropped_pair_too_long} with prompt + longer answer over "
                f"{self.max_length} tokens")


def add_token_lengths(formatted, tokenizer):
    """Add ``prompt_tokens`` and ``pair_tokens`` (prompt + the longer answer, as TRL tokenises them)."""

    def _lengths(row: dict) -> dict:
        prompt, chosen = tokenize_pair(tokenizer, row["prompt"], row["chosen"])
        _, rejected = tokenize_pair(tokenizer, row["prompt"], row["rejected"])
        return {"prompt_tokens": len(prompt), "pair_tokens": len(prompt) + max(len(chosen), len(rejected))}

    return formatted.map(_lengths, desc="counting tokens")


def filter_by_length(formatted, tokenizer, max_prompt_length: int, max_length: int):
    """Drop pairs whose prompt exceeds ``max_prompt_length`` or prompt + answer ``max_length``; ``(kept, report)``.

    TRL 1.x only has ``max_length`` and truncates the end of prompt + answer, cutting answers mid-sentence (and their
    end token); dropping whole pairs keeps every training answer intact.
    """
    measured = formatted if "pair_tokens" in formatted.column_names else add_token_lengths(formatted, tokenizer)
    prompts, pairs = measured["prompt_tokens"], measured["pair_tokens"]
    prompt_long = sum(p > max_prompt_length for p in prompts)
    pair_long = sum(p <= max_prompt_length and n > max_length for p, n in zip(prompts, pairs))
    kept = measured.filter(lambda r: r["prompt_tokens"] <= max_prompt_length and r["pair_tokens"] <= max_length,
                           desc="dropping over-long pairs")
    return kept, LengthReport(len(kept), prompt_long, pair_long, max_prompt_length, max_length)


def end_token_trained(batch: dict, eos_token_id: int, loss_mask: str = "completion_mask") -> list[bool]:
    """For each sequence of a collated batch: is its last real token the EOS, and is it in the loss?

    ``loss_mask``: ``"completion_mask"`` (TRL's preference collator) or ``"labels"`` (a language-modelling collator,
    where -100 leaves a token out). Padding that reuses the EOS id does not count as the end.
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
