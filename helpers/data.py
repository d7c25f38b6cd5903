"""The preference pairs: loading, checking, and ``prepare_data``, which formats them for DPO (notebooks 01 and 04).

The course's own files in ``data/`` (tiny profile) and ``Intel/orca_dpo_pairs`` (GPU profiles) share the orca
columns ``system``, ``question``, ``chosen``, ``rejected``. Every row is checked before training sees it, so a broken
row is reported by file, row and field instead of surfacing later as a tokenizer or trainer error; columns named
differently are reported with the names found and a ``column_map`` that renames them. Rows that cannot teach anything
are dropped, and a printed note counts them: pairs whose chosen answer is the rejected one and, in hub data, exact
duplicates (split at random they could land in train and held-out at once). ChatML control strings inside the text
are refused in local data (naming row and field) and made inert, and counted, in hub data.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from helpers.chatml import LengthReport, escape_control_strings, filter_by_length, find_control_strings, format_dataset
from helpers.profiles import DATA_DIR, REPO_ROOT, Profile

FIELDS = ("system", "question", "chosen", "rejected")
MAX_LISTED = 10
# Names other preference data sets give the orca columns.
ALIASES = {"system": ("system_prompt", "system_message"), "question": ("prompt", "input", "instruction", "query"),
           "chosen": ("output", "response", "chosen_response", "answer"),
           "rejected": ("rejected_response", "rejected_output")}


class DataValidationError(ValueError):
    """Preference data that does not fit the orca columns; the message says where and what."""


def _listed(numbers: list[int]) -> str:
    return ", ".join(map(str, numbers[:MAX_LISTED])) + (", ..." if len(numbers) > MAX_LISTED else "")


def _column_help(source: str, found: list[str]) -> str:
    """Which columns were found, which are expected, and a ``column_map`` that would rename them."""
    suggestion = {}
    for name, aliases in ALIASES.items():
        alias = next((a for a in aliases if a in found and name not in found and a not in suggestion), None)
        if alias:
            suggestion[alias] = name
    how = (f"if they are the same data under other names, pass column_map={suggestion!r}" if suggestion
           else "rename differently named columns with column_map={'their name': 'question', ...}")
    return f"columns found in {source}: {', '.join(found) or '(none)'}; expected: {', '.join(FIELDS)}; {how}"


def rename_columns(rows: list[Any], mapping: Mapping[str, str] | None, source: str) -> list[Any]:
    """Rows with their keys renamed ``{found name: orca name}``; refuses unknown names and clashes, listing columns."""
    if not mapping:
        return rows
    found = list(dict.fromkeys(k for row in rows if isinstance(row, Mapping) for k in row))
    unknown = [old for old in mapping if old not in found]
    if unknown:
        raise DataValidationError(f"column_map renames {', '.join(map(repr, unknown))}, which {source} does not "
                                  f"have; columns found: {', '.join(found) or '(none)'}")
    targets = list(mapping.values())
    clashes = sorted({t for t in targets if targets.count(t) > 1 or (t in found and t not in mapping)})
    if clashes:
        raise DataValidationError(f"column_map would make two columns called {', '.join(map(repr, clashes))} in "
                                  f"{source}; columns found: {', '.join(found)}")
    return [{mapping.get(k, k): v for k, v in row.items()} if isinstance(row, Mapping) else row for row in rows]


def check_rows(numbered: Iterable[tuple[int, Any]], source: str) -> list[tuple[int, dict[str, str]]]:
    """``(row number, row)`` pairs checked against the orca columns; every problem is raised at once, by row and field.

    ``question``, ``chosen`` and ``rejected`` must be non-empty strings; ``system`` a string, possibly empty (a
    system prompt of only whitespace counts as none).
    """
    checked, problems, seen = [], [], {}
    for number, row in numbered:
        where = f"{source} row {number}"
        if not isinstance(row, Mapping):
            problems.append(f"{where}: expected an object with fields {', '.join(FIELDS)}, got {type(row).__name__}")
            continue
        seen.update(dict.fromkeys(row))
        found = []
        for name in FIELDS:
            value = row.get(name, ...)
            if value is ...:
                found.append(f"{where}: field {name!r} is missing")
            elif value is None:
                found.append(f"{where}: field {name!r} is None (null)")
            elif not isinstance(value, str):
                found.append(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
            elif name != "system" and not value.strip():
                found.append(f"{where}: field {name!r} is empty")
        problems += found
        if not found:
            checked.append((number, {**row, "system": row["system"] if row["system"].strip() else ""}))
    if problems:
        shown = "\n".join(f"  - {p}" for p in problems[:MAX_LISTED])
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        hint = "\n" + _column_help(source, list(seen)) if any(p.endswith("is missing") for p in problems) else ""
        raise DataValidationError(f"{len(problems)} problem(s) in {source}:\n{shown}{more}{hint}")
    return checked


def drop_rows(numbered: list[tuple[int, dict]], source: str, *, identical: bool = True, duplicates: bool = False,
              escape: bool = False) -> list[tuple[int, dict]]:
    """Drop identical pairs (chosen == rejected: no preference to learn) and, with ``duplicates``, repeated rows;
    with ``escape`` make ChatML control strings inert. A printed note counts each, naming the rows."""
    seen, kept, same, repeated, escaped = set(), [], [], [], []
    for number, row in numbered:
        key = tuple(row[name] for name in FIELDS)
        if identical and row["chosen"].strip() == row["rejected"].strip():
            same.append(number)
        elif duplicates and key in seen:
            repeated.append(number)
        else:
            seen.add(key)
            if escape and any(find_control_strings(row[name]) for name in FIELDS):
                row = {**row, **{name: escape_control_strings(row[name]) for name in FIELDS}}
                escaped.append(number)
            kept.append((number, row))
    total = len(numbered)
    for numbers, what in ((same, "dropped {n} of {total} pair(s) whose chosen answer is the rejected one"),
                          (repeated, "dropped {n} of {total} pair(s) that repeat an earlier row exactly"),
                          (escaped, "made the ChatML control strings in {n} of {total} row(s) inert")):
        if numbers:
            print(f"{source}: {what.format(n=len(numbers), total=total)} (row(s) {_listed(numbers)})")
    return kept


def read_jsonl(path: str | Path) -> list[tuple[int, Any]]:
    """The non-blank lines of a JSON-lines file as ``(line number, value)``; every bad line is reported at once."""
    path = Path(path)
    source = path.relative_to(REPO_ROOT).as_posix() if path.is_relative_to(REPO_ROOT) else path.name
    if not path.is_file():
        raise FileNotFoundError(f"{source} not found (python scripts/generate_data.py writes the course's data)")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark from a Windows editor is not data
    except UnicodeDecodeError as exc:
        raise DataValidationError(f"{source} is not UTF-8 text (byte {exc.start} cannot be decoded); "
                                  "save it as UTF-8 JSON lines") from exc
    numbered, bad = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                numbered.append((number, json.loads(line)))
            except json.JSONDecodeError as exc:
                bad.append(f"  - {source} line {number}: not valid JSON ({exc.msg})")
    if bad:
        raise DataValidationError(f"{len(bad)} problem(s) in {source}:\n" + "\n".join(bad[:MAX_LISTED]))
    if not numbered:
        raise DataValidationError(f"{source} holds no preference pairs (the file is empty); check the file")
    return numbered


def load_pairs(path: str | Path, *, column_map: Mapping[str, str] | None = None) -> datasets.Dataset:
    """A JSON-lines file of orca rows, checked row by row (numbered by line), identical pairs dropped.

    Returns a ``datasets.Dataset`` with the orca columns and every other column the file has (``kind``, ...).
    """
    numbered = read_jsonl(path)
    source = Path(path).name
    rows = rename_columns([row for _, row in numbered], column_map, source)
    kept = drop_rows(check_rows(zip((n for n, _ in numbered), rows), source), source)
    if not kept:
        raise DataValidationError(f"{source} holds no usable preference pairs after dropping identical ones")
    return datasets.Dataset.from_list([row for _, row in kept])


def load_hub_pairs(profile: Profile, *, column_map: Mapping[str, str] | None = None) -> datasets.DatasetDict:
    """The profile's hub data set: checked, duplicates dropped, control strings made inert, shuffled (seed 42);
    the first ``heldout_pairs`` rows are held out, the next ``train_pairs`` (all when None) train."""
    name = profile.dataset
    try:
        raw = datasets.load_dataset(name, split="train")
    except Exception as exc:  # offline, no network, a missing data set: one clear message
        raise RuntimeError(f"the hub data set {name!r} could not be loaded ({type(exc).__name__}: {exc}). Profile "
                           f"{profile.name!r} needs the Hugging Face hub; offline or on a CPU use the tiny profile, "
                           "which trains on the pairs shipped in data/.") from exc
    source = f"{name} (train split)"
    rows = rename_columns(raw.to_list(), column_map, source)
    kept = drop_rows(check_rows(enumerate(rows, start=1), source), source, duplicates=True, escape=True)
    kept_rows = [{k: row[k] for k in FIELDS} | {"kind": name} for _, row in kept]
    shuffled = datasets.Dataset.from_list(kept_rows).shuffle(seed=42).flatten_indices()
    held = profile.heldout_pairs
    if held >= len(shuffled):
        raise DataValidationError(f"{source} has {len(shuffled)} usable rows, too few to hold out {held}")
    end = len(shuffled) if profile.train_pairs is None else min(len(shuffled), held + profile.train_pairs)
    return datasets.DatasetDict(train=shuffled.select(range(held, end)), heldout=shuffled.select(range(held)))


def load_preference_data(profile: Profile, *, column_map: Mapping[str, str] | None = None) -> datasets.DatasetDict:
    """The profile's pairs as ``train`` and ``heldout``: data/train.jsonl and data/heldout.jsonl, or the hub's."""
    if profile.dataset == "data":
        splits = {name: load_pairs(DATA_DIR / f"{name}.jsonl", column_map=column_map) for name in ("train", "heldout")}
        if profile.train_pairs is not None:
            splits["train"] = splits["train"].select(range(min(profile.train_pairs, len(splits["train"]))))
        return datasets.DatasetDict(splits)
    return load_hub_pairs(profile, column_map=column_map)


@dataclass
class PreparedData:
    """ChatML-formatted train and held-out pairs within the length limits, and the raw held-out rows."""

    train: datasets.Dataset  # prompt, chosen, rejected, kind, prompt_tokens, pair_tokens
    heldout: datasets.Dataset
    heldout_rows: list[dict]  # system, question, chosen, rejected, kind of each held-out pair, in order
    report: LengthReport
    heldout_report: LengthReport


def format_and_filter(raw: datasets.Dataset, profile: Profile, tokenizer, split: str):
    """A split formatted in ChatML and cut to the profile's length limits; refuses a split left empty."""
    formatted = format_dataset(raw.add_column("row", list(range(len(raw)))), tokenizer, split=split)
    kept, report = filter_by_length(formatted, tokenizer, profile.max_prompt_length, profile.dpo["max_length"])
    if len(kept) == 0:
        raise DataValidationError(f"the {split} split of profile {profile.name!r} holds no pair within the length "
                                  f"limits ({report})")
    return kept, report


def prepare_data(profile: Profile, tokenizer, *, column_map: Mapping[str, str] | None = None) -> PreparedData:
    """Load the profile's pairs, format them in ChatML and drop pairs over the length limits, in both splits.

    Every notebook that trains or evaluates starts here, so all see the same pairs. The held-out pairs obey the same
    limits: a model is not evaluated on lengths it never trained on.
    """
    splits = load_preference_data(profile, column_map=column_map)
    train, report = format_and_filter(splits["train"], profile, tokenizer, "train")
    heldout, heldout_report = format_and_filter(splits["heldout"], profile, tokenizer, "heldout")
    rows = [dict(splits["heldout"][i]) for i in heldout["row"]]
    return PreparedData(train.remove_columns("row"), heldout.remove_columns("row"), rows, report, heldout_report)


def pairs_only(dataset: datasets.Dataset) -> datasets.Dataset:
    """Only ``prompt``, ``chosen`` and ``rejected``: the columns TRL's preference trainers read."""
    return dataset.select_columns(["prompt", "chosen", "rejected"])
