"""The preference pairs: the project's own files in data/ (tiny profile) or Intel/orca_dpo_pairs (GPU profiles).

Both use the orca schema - ``system``, ``question``, ``chosen``, ``rejected`` - and every row is
checked before training sees it, so a broken row is reported by file, row and field instead of
surfacing later as a confusing tokenizer or trainer error.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from helpers.paths import DATA_DIR, REPO_ROOT

if TYPE_CHECKING:  # datasets is imported only when data is actually loaded
    import datasets

    from helpers.profiles import Profile

REQUIRED_FIELDS = ("system", "question", "chosen", "rejected")
COLUMNS = (*REQUIRED_FIELDS, "kind")  # kind: which preference a local pair teaches (the data set's id on the hub)
LOCAL_SPLITS = ("train", "heldout")
MAX_LISTED_ERRORS = 10


class DataValidationError(ValueError):
    """Preference data that does not fit the orca schema; the message lists where and what."""


def _row_problems(row: Any, where: str) -> list[str]:
    """Everything wrong with one row, each naming ``where`` (source and row number) and the field."""
    if not isinstance(row, Mapping):
        return [f"{where}: expected an object with fields {', '.join(REQUIRED_FIELDS)}, got {type(row).__name__}"]
    problems = []
    for name in REQUIRED_FIELDS:
        if name not in row:
            problems.append(f"{where}: field {name!r} is missing")
        elif row[name] is None:
            problems.append(f"{where}: field {name!r} is None (null)")
        elif not isinstance(row[name], str):
            problems.append(f"{where}: field {name!r} must be a string, got {type(row[name]).__name__}")
        elif name != "system" and not row[name].strip():  # an empty system prompt is allowed
            problems.append(f"{where}: field {name!r} is empty")
    return problems


def _raise_if_any(problems: list[str], source: str) -> None:
    if not problems:
        return
    shown = "\n".join(f"  - {p}" for p in problems[:MAX_LISTED_ERRORS])
    more = f"\n  ... and {len(problems) - MAX_LISTED_ERRORS} more" if len(problems) > MAX_LISTED_ERRORS else ""
    raise DataValidationError(f"{len(problems)} problem(s) in {source}:\n{shown}{more}")


def validate_rows(rows: Iterable[Mapping[str, Any]], source: str) -> list[dict[str, Any]]:
    """Check every row against the orca schema and return them as plain dicts.

    ``question``, ``chosen`` and ``rejected`` must be non-empty strings; ``system`` must be a string
    and may be empty. All problems are collected and raised together as one
    :class:`DataValidationError` naming ``source``, the 1-based row number and the field.
    """
    return _validate_numbered(enumerate(rows, start=1), source)


def _validate_numbered(numbered: Iterable[tuple[int, Any]], source: str) -> list[dict[str, Any]]:
    checked: list[dict[str, Any]] = []
    problems: list[str] = []
    for number, row in numbered:
        found = _row_problems(row, f"{source} row {number}")
        problems += found
        if not found:
            checked.append(dict(row))
    _raise_if_any(problems, source)
    return checked


def _to_dataset(rows: list[dict[str, Any]], default_kind: str) -> datasets.Dataset:
    from datasets import Dataset

    columns: dict[str, list[str]] = {name: [row[name] for row in rows] for name in REQUIRED_FIELDS}
    columns["kind"] = [str(row.get("kind") or default_kind) for row in rows]
    return Dataset.from_dict(columns)


def load_local_split(split: str, data_dir: Path = DATA_DIR) -> datasets.Dataset:
    """One of the shipped splits, ``data/train.jsonl`` or ``data/heldout.jsonl``, checked row by row.

    Rows are numbered by their line in the file; blank lines are skipped. Returns a ``datasets.Dataset``
    with the columns system, question, chosen, rejected and kind.
    """
    if split not in LOCAL_SPLITS:
        raise ValueError(f"unknown split {split!r}; the local data has {', '.join(LOCAL_SPLITS)}")
    path = Path(data_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (python scripts/generate_data.py writes it)")
    source = f"{path.parent.name}/{path.name}"
    numbered: list[tuple[int, Any]] = []
    bad_json: list[str] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            numbered.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            bad_json.append(f"{source} line {number} (row {number}): not valid JSON ({exc.msg})")
    _raise_if_any(bad_json, source)
    rows = _validate_numbered(numbered, source)
    return _to_dataset(rows, default_kind="")


def _select(dataset: datasets.Dataset, start: int, stop: int) -> datasets.Dataset:
    return dataset.select(range(start, min(stop, len(dataset))))


def _load_hub(profile: Profile) -> datasets.DatasetDict:
    import datasets

    name = profile.data.dataset
    try:
        raw = datasets.load_dataset(name, split="train")
    except Exception as exc:  # offline mode, no network, missing data set: one clear message
        raise RuntimeError(
            f"the hub data set {name!r} could not be loaded ({type(exc).__name__}: {exc}). "
            f"Profile {profile.name!r} needs the Hugging Face hub; offline or on CPU use profile 'tiny' "
            "(set COURSE_PROFILE=tiny), which trains on the pairs shipped in data/."
        ) from exc
    source = f"{name} (train split)"
    missing = [c for c in REQUIRED_FIELDS if c not in raw.column_names]
    if missing:
        raise DataValidationError(f"{source} has no column(s) {', '.join(missing)}; found {raw.column_names}")
    rows = validate_rows(raw.select_columns(list(REQUIRED_FIELDS)).to_list(), source)
    shuffled = _to_dataset(rows, default_kind=name).shuffle(seed=profile.data.shuffle_seed).flatten_indices()
    held = profile.data.heldout_pairs
    if held >= len(shuffled):
        raise ValueError(f"{source} has {len(shuffled)} rows, too few to hold out {held}")
    train_end = len(shuffled) if profile.data.max_train_pairs is None else held + profile.data.max_train_pairs
    return datasets.DatasetDict(train=_select(shuffled, held, train_end), heldout=_select(shuffled, 0, held))


def load_preference_data(profile: Profile) -> datasets.DatasetDict:
    """The profile's preference pairs as a ``DatasetDict`` with ``train`` and ``heldout``.

    ``local``: the shipped splits, train capped at ``max_train_pairs``. ``hub``: the data set's train
    split, validated, shuffled with ``shuffle_seed``; the first ``heldout_pairs`` rows are held out and
    the rest (capped at ``max_train_pairs``) train. A hub that cannot be reached raises RuntimeError.
    """
    import datasets

    if profile.data.source == "hub":
        return _load_hub(profile)
    if profile.data.source != "local":
        raise ValueError(f"unknown data source {profile.data.source!r}; use 'hub' or 'local'")
    data_dir = REPO_ROOT / profile.data.dataset  # "data" for the tiny profile
    train = load_local_split("train", data_dir)
    if profile.data.max_train_pairs is not None:
        train = _select(train, 0, profile.data.max_train_pairs)
    return datasets.DatasetDict(train=train, heldout=load_local_split("heldout", data_dir))


def verify_checksums(data_dir: Path = DATA_DIR) -> dict[str, bool]:
    """Each file listed in ``data_dir/SHA256SUMS`` -> whether its SHA-256 matches (a missing file is False)."""
    result: dict[str, bool] = {}
    for line in (Path(data_dir) / "SHA256SUMS").read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        digest, name = line.split(maxsplit=1)
        path = Path(data_dir) / name.strip().lstrip("*")
        result[name.strip().lstrip("*")] = path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == digest
    return result
