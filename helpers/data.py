"""The preference pairs (notebooks 01 and 04): loading, validation, and ``prepare_data``, which formats them for DPO.

The project's own files in data/ (tiny profile) or Intel/orca_dpo_pairs (GPU profiles) use the orca schema -
``system``, ``question``, ``chosen``, ``rejected`` - and every row is checked before training sees it, so a broken row
is reported by file, row and field instead of surfacing later as a confusing tokenizer or trainer error. Columns
named differently (``prompt`` for ``question``, ...) are reported with the names found and a ``column_map`` that
renames them. Rows that cannot teach anything are dropped with a :class:`DataWarning` that counts them: pairs whose
chosen answer is the rejected one, and in hub data exact duplicates (split at random, they could land in both train
and held-out). A system
prompt of only whitespace counts as no system prompt. ChatML control strings inside the text are refused in local
data (naming row and field) and made inert, and counted, in hub data, where one bad row must not stop a long run.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets

from helpers.chatml import escape_control_strings, filter_by_length, find_control_strings, format_dataset
from helpers.paths import DATA_DIR, REPO_ROOT

if TYPE_CHECKING:
    from helpers.chatml import LengthReport
    from helpers.profiles import Profile

REQUIRED_FIELDS = ("system", "question", "chosen", "rejected")
LOCAL_SPLITS = ("train", "heldout")
MAX_LISTED_ERRORS = 10
# Names other preference data sets (and older revisions of the orca set) give the orca columns.
COLUMN_ALIASES: dict[str, tuple[str, ...]] = {
    "system": ("system_prompt", "system_message"),
    "question": ("prompt", "input", "instruction", "query"),
    "chosen": ("output", "response", "chosen_response", "answer"),
    "rejected": ("rejected_response", "rejected_output"),
}


class DataValidationError(ValueError):
    """Preference data that does not fit the orca schema; the message lists where and what."""


class DataWarning(Warning):
    """Rows dropped from the preference data on purpose (e.g. chosen identical to rejected); says how many.

    Not a ``UserWarning``: notebooks silence library UserWarnings (helpers.notebook), this one must show.
    """


def suggest_column_map(found: Iterable[str]) -> dict[str, str]:
    """A ``column_map`` (found name -> orca name) for columns that look like a missing orca field by another name."""
    found = list(found)
    suggestion: dict[str, str] = {}
    for field, aliases in COLUMN_ALIASES.items():
        if field in found:
            continue
        alias = next((a for a in aliases if a in found and a not in suggestion), None)
        if alias is not None:
            suggestion[alias] = field
    return suggestion


def _column_help(source: str, found: list[str]) -> str:
    """Which columns were found, which are expected, and how to map them."""
    suggestion = suggest_column_map(found)
    how = (
        f"if they are the same data under other names, map them: column_map={suggestion!r}"
        if suggestion
        else "map differently named columns with column_map={'their name': 'question', ...}"
    )
    return (
        f"columns found in {source}: {', '.join(found) or '(none)'}; expected: {', '.join(REQUIRED_FIELDS)}; {how} "
        "(load_preference_data(profile, column_map=...) or helpers.data.rename_columns)"
    )


def rename_columns(data: Any, mapping: Mapping[str, str] | None, source: str = "the data") -> Any:
    """Rename columns ``{found name: orca name}``, e.g. ``{"prompt": "question", "response": "chosen"}``.

    ``data`` is a ``datasets.Dataset`` (renamed with ``Dataset.rename_columns``) or a list of row dicts
    (each row's keys renamed). A name that is not in the data, or a rename onto a column that already
    exists, raises :class:`DataValidationError` listing the columns found.
    """
    mapping = dict(mapping or {})
    if not mapping:
        return data
    is_dataset = hasattr(data, "column_names")
    rows = None if is_dataset else list(data)
    if is_dataset:
        found = list(data.column_names)
    else:
        found = list(dict.fromkeys(key for row in rows if isinstance(row, Mapping) for key in row))
    unknown = [old for old in mapping if old not in found]
    if unknown:
        raise DataValidationError(
            f"column_map renames {', '.join(map(repr, unknown))}, which {source} does not have; "
            f"columns found: {', '.join(found) or '(none)'}"
        )
    targets = list(mapping.values())
    clashes = sorted({new for new in targets if targets.count(new) > 1 or (new in found and new not in mapping)})
    if clashes:
        raise DataValidationError(
            f"column_map would make two columns called {', '.join(map(repr, clashes))} in {source}; "
            f"columns found: {', '.join(found)}. Drop or rename the existing column first."
        )
    if is_dataset:
        return data.rename_columns(mapping)
    return [{mapping.get(k, k): v for k, v in row.items()} if isinstance(row, Mapping) else row for row in rows]


def _listed(numbers: list[int]) -> str:
    """``1, 5, 9, ...``: at most MAX_LISTED_ERRORS row numbers."""
    return ", ".join(map(str, numbers[:MAX_LISTED_ERRORS])) + (", ..." if len(numbers) > MAX_LISTED_ERRORS else "")


def _warn(message: str) -> None:
    warnings.warn(DataWarning(message), stacklevel=3)


def drop_identical_pairs(
    rows: Iterable[Mapping[str, Any]], source: str, numbers: Iterable[int] | None = None, *, warn: bool = True
) -> tuple[list[dict[str, Any]], list[int]]:
    """Drop pairs whose chosen answer is the rejected one (ignoring surrounding whitespace).

    DPO learns from the difference between the two answers; an identical pair has none (its DPO loss is
    ln 2 whatever the model does) and it would count as a miss in held-out preference accuracy. Returns
    ``(kept rows, dropped row numbers)``; ``numbers`` are the rows' numbers in ``source`` (default 1, 2, ...).
    With ``warn``, a :class:`DataWarning` says how many were dropped from ``source`` and which rows.
    """
    rows = [dict(row) for row in rows]
    numbers = list(numbers) if numbers is not None else list(range(1, len(rows) + 1))
    kept, dropped = [], []
    for number, row in zip(numbers, rows):
        if str(row["chosen"]).strip() == str(row["rejected"]).strip():
            dropped.append(number)
        else:
            kept.append(row)
    if dropped and warn:
        _warn(
            f"{source}: dropped {len(dropped)} of {len(rows)} pair(s) whose chosen answer is identical to the "
            f"rejected one (row(s) {_listed(dropped)}): DPO cannot learn a preference from them"
        )
    return kept, dropped


def drop_duplicate_pairs(
    rows: Iterable[Mapping[str, Any]], source: str, numbers: Iterable[int] | None = None, *, warn: bool = True
) -> tuple[list[dict[str, Any]], list[int]]:
    """Keep the first of rows whose system, question, chosen and rejected are all equal; drop the others.

    A duplicated pair counts twice in training and, split at random, can land in train and held-out at once, where
    it would measure memory instead of learning. Returns ``(kept rows, dropped row numbers)`` like
    :func:`drop_identical_pairs`, with a :class:`DataWarning` when ``warn``.
    """
    rows = [dict(row) for row in rows]
    numbers = list(numbers) if numbers is not None else list(range(1, len(rows) + 1))
    seen: set[tuple[str, ...]] = set()
    kept, dropped = [], []
    for number, row in zip(numbers, rows):
        key = tuple(str(row[name]) for name in REQUIRED_FIELDS)
        if key in seen:
            dropped.append(number)
        else:
            seen.add(key)
            kept.append(row)
    if dropped and warn:
        _warn(
            f"{source}: dropped {len(dropped)} of {len(rows)} pair(s) that repeat an earlier row exactly "
            f"(row(s) {_listed(dropped)})"
        )
    return kept, dropped


def normalise_system(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with a system prompt of only whitespace given an empty one: no system turn is rendered for them.

    The recipe adds a system turn only when the field is non-empty; a field of spaces is empty to a reader, and a
    turn holding only spaces would teach the model nothing but noise.
    """
    return [{**row, "system": row["system"] if row["system"].strip() else ""} for row in rows]


def escape_control_rows(
    rows: Iterable[dict[str, Any]], source: str, numbers: Iterable[int] | None = None, *, warn: bool = True
) -> tuple[list[dict[str, Any]], list[int]]:
    """Make ChatML control strings inside any field inert (``helpers.chatml.escape_control_strings``), counted.

    For data the learner does not own (the hub): a single row that quotes ``<|im_end|>`` must not stop a run of
    12,000 pairs. Local data is refused instead, naming the row (``helpers.chatml.format_dataset``). Returns
    ``(rows, numbers of the rows changed)``, with a :class:`DataWarning` when ``warn``.
    """
    rows = [dict(row) for row in rows]
    numbers = list(numbers) if numbers is not None else list(range(1, len(rows) + 1))
    changed = []
    for number, row in zip(numbers, rows):
        if any(find_control_strings(row[name]) for name in REQUIRED_FIELDS):
            row.update({name: escape_control_strings(row[name]) for name in REQUIRED_FIELDS})
            changed.append(number)
    if changed and warn:
        _warn(
            f"{source}: made the ChatML control strings in {len(changed)} of {len(rows)} row(s) inert "
            f"(row(s) {_listed(changed)}): they would have forged or ended a turn"
        )
    return rows, changed


def _require_rows(count: int, source: str, why: str = "") -> None:
    """Refuse a split with no pairs left, saying where and why (an empty file would otherwise train on nothing)."""
    if count == 0:
        raise DataValidationError(f"{source} holds no usable preference pairs{why}; check the file")


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


def _raise_if_any(problems: list[str], source: str, hint: str = "") -> None:
    if not problems:
        return
    shown = "\n".join(f"  - {p}" for p in problems[:MAX_LISTED_ERRORS])
    more = f"\n  ... and {len(problems) - MAX_LISTED_ERRORS} more" if len(problems) > MAX_LISTED_ERRORS else ""
    hint = f"\n{hint}" if hint else ""
    raise DataValidationError(f"{len(problems)} problem(s) in {source}:\n{shown}{more}{hint}")


def validate_rows(rows: Iterable[Mapping[str, Any]], source: str) -> list[dict[str, Any]]:
    """Check every row against the orca schema and return them as plain dicts.

    ``question``, ``chosen`` and ``rejected`` must be non-empty strings; ``system`` must be a string
    and may be empty. All problems are collected and raised together as one
    :class:`DataValidationError` naming ``source``, the 1-based row number and the field.
    """
    return _validate_numbered(enumerate(rows, start=1), source)


def _validate_numbered(numbered: Iterable[tuple[int, Any]], source: str) -> list[dict[str, Any]]:
    return [row for _, row in _check_numbered(numbered, source)]


def _check_numbered(numbered: Iterable[tuple[int, Any]], source: str) -> list[tuple[int, dict[str, Any]]]:
    """The valid rows with their numbers; all problems raised together (with the columns found when one is missing)."""
    checked: list[tuple[int, dict[str, Any]]] = []
    problems: list[str] = []
    seen: dict[str, None] = {}
    for number, row in numbered:
        found = _row_problems(row, f"{source} row {number}")
        problems += found
        if isinstance(row, Mapping):
            seen.update(dict.fromkeys(row))
        if not found:
            checked.append((number, dict(row)))
    missing = any(p.endswith("is missing") for p in problems)
    _raise_if_any(problems, source, _column_help(source, list(seen)) if missing else "")
    return checked


def _to_dataset(rows: list[dict[str, Any]], default_kind: str) -> datasets.Dataset:
    columns: dict[str, list[str]] = {name: [row[name] for row in rows] for name in REQUIRED_FIELDS}
    columns["kind"] = [str(row.get("kind") or default_kind) for row in rows]
    return datasets.Dataset.from_dict(columns)


def _read_jsonl(path: Path, source: str) -> list[tuple[int, Any]]:
    """The non-blank lines of a JSON-lines file as (line number, parsed value); every bad line reported at once."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark from a Windows editor is not data
    except UnicodeDecodeError as exc:
        raise DataValidationError(
            f"{source} is not UTF-8 text (byte {exc.start} cannot be decoded); save it as UTF-8 JSON lines"
        ) from exc
    numbered: list[tuple[int, Any]] = []
    bad_json: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            numbered.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            bad_json.append(f"{source} line {number} (row {number}): not valid JSON ({exc.msg})")
    _raise_if_any(bad_json, source)
    return numbered


def load_local_split(
    split: str, data_dir: Path = DATA_DIR, *, column_map: Mapping[str, str] | None = None
) -> datasets.Dataset:
    """One of the shipped splits, ``data/train.jsonl`` or ``data/heldout.jsonl``, checked row by row.

    Rows are numbered by their line in the file; blank lines are skipped. ``column_map`` renames fields
    first (``{"prompt": "question"}``). Pairs with chosen == rejected are dropped with a :class:`DataWarning`; a
    file left with no pairs is refused (duplicates stay: the local splits are separate files, not split at random).
    Returns a ``datasets.Dataset`` with the columns system, question, chosen, rejected and kind.
    """
    if split not in LOCAL_SPLITS:
        raise ValueError(f"unknown split {split!r}; the local data has {', '.join(LOCAL_SPLITS)}")
    path = Path(data_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (python scripts/generate_data.py writes it)")
    source = f"{path.parent.name}/{path.name}"
    numbered = _read_jsonl(path, source)
    _require_rows(len(numbered), source, " (the file is empty)")
    if column_map:
        renamed = rename_columns([row for _, row in numbered], column_map, source)
        numbered = [(number, row) for (number, _), row in zip(numbered, renamed)]
    checked = _check_numbered(numbered, source)
    rows, numbers = normalise_system([row for _, row in checked]), [number for number, _ in checked]
    rows, _ = drop_identical_pairs(rows, source, numbers)
    _require_rows(len(rows), source, " after dropping the pairs whose answers are identical")
    return _to_dataset(rows, default_kind="")


def _select(dataset: datasets.Dataset, start: int, stop: int) -> datasets.Dataset:
    return dataset.select(range(start, min(stop, len(dataset))))


def _load_hub(profile: Profile, column_map: Mapping[str, str] | None = None) -> datasets.DatasetDict:
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
    raw = rename_columns(raw, column_map, source)
    missing = [c for c in REQUIRED_FIELDS if c not in raw.column_names]
    if missing:
        raise DataValidationError(
            f"{source} has no column(s) {', '.join(missing)}: {_column_help(source, list(raw.column_names))}"
        )
    _require_rows(len(raw), source)
    rows = normalise_system(validate_rows(raw.select_columns(list(REQUIRED_FIELDS)).to_list(), source))
    numbers = list(range(1, len(rows) + 1))
    rows, dropped = drop_identical_pairs(rows, source, numbers)
    numbers = [n for n in numbers if n not in set(dropped)]
    rows, dropped = drop_duplicate_pairs(rows, source, numbers)
    numbers = [n for n in numbers if n not in set(dropped)]
    rows, _ = escape_control_rows(rows, source, numbers)
    shuffled = _to_dataset(rows, default_kind=name).shuffle(seed=profile.data.shuffle_seed).flatten_indices()
    held = profile.data.heldout_pairs
    if held >= len(shuffled):
        raise ValueError(f"{source} has {len(shuffled)} usable rows, too few to hold out {held}")
    train_end = len(shuffled) if profile.data.max_train_pairs is None else held + profile.data.max_train_pairs
    return datasets.DatasetDict(train=_select(shuffled, held, train_end), heldout=_select(shuffled, 0, held))


def load_preference_data(
    profile: Profile, *, column_map: Mapping[str, str] | None = None
) -> datasets.DatasetDict:
    """The profile's preference pairs as a ``DatasetDict`` with ``train`` and ``heldout``.

    ``local``: the shipped splits, train capped at ``max_train_pairs``. ``hub``: the data set's train
    split, validated, shuffled with ``shuffle_seed``; the first ``heldout_pairs`` rows are held out and
    the rest (capped at ``max_train_pairs``) train. A hub that cannot be reached raises RuntimeError.
    ``column_map`` renames columns named differently, e.g. ``{"prompt": "question", "response": "chosen"}``.
    Identical pairs (and, on the hub, duplicated ones) are dropped, with a :class:`DataWarning` counting them.
    """
    if profile.data.source == "hub":
        return _load_hub(profile, column_map)
    if profile.data.source != "local":
        raise ValueError(f"unknown data source {profile.data.source!r}; use 'hub' or 'local'")
    data_dir = REPO_ROOT / profile.data.dataset  # "data" for the tiny profile
    train = load_local_split("train", data_dir, column_map=column_map)
    if profile.data.max_train_pairs is not None:
        train = _select(train, 0, profile.data.max_train_pairs)
    return datasets.DatasetDict(train=train, heldout=load_local_split("heldout", data_dir, column_map=column_map))


@dataclass
class PreparedData:
    """ChatML-formatted train and held-out pairs (over-long pairs dropped from both) and the raw held-out rows."""

    train: datasets.Dataset
    heldout: datasets.Dataset
    heldout_rows: list[dict]
    length_report: LengthReport
    heldout_report: LengthReport | None = None


def prepare_data(profile: Profile, tokenizer, *, column_map: Mapping[str, str] | None = None) -> PreparedData:
    """Load the profile's preference data, format it in ChatML, drop pairs over the length limits.

    Every training notebook and the pipeline start here, so they all train on exactly the same pairs. The held-out
    pairs obey the same limits (a model is not evaluated on lengths it was never trained on, and one pair of 1,500
    tokens would cost its length for the whole evaluation batch). A split left with no pairs is refused, naming the
    limits.
    """
    splits = load_preference_data(profile, column_map=column_map)
    limits = (profile.dpo.max_prompt_length, profile.dpo.max_length)
    train = format_dataset(splits["train"], tokenizer, split="train")
    train, report = filter_by_length(train, tokenizer, *limits)
    _require_rows(len(train), f"the train split of profile {profile.name!r}", f" within the length limits ({report})")
    heldout = format_dataset(splits["heldout"], tokenizer, split="heldout")
    heldout, heldout_report = filter_by_length(heldout.add_column("row", list(range(len(heldout)))), tokenizer, *limits)
    _require_rows(len(heldout), f"the held-out split of profile {profile.name!r}",
                  f" within the length limits ({heldout_report})")
    raw = splits["heldout"]
    rows = [dict(raw[i]) for i in heldout["row"]]
    return PreparedData(train, heldout.remove_columns("row"), rows, report, heldout_report)


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
