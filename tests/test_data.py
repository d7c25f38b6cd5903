"""The shipped preference pairs and their loader: checksums, shape, determinism and every validation error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

import datasets
import pytest

from helpers.data import (
    REQUIRED_FIELDS,
    DataValidationError,
    load_local_split,
    load_preference_data,
    validate_rows,
    verify_checksums,
)
from helpers.paths import DATA_DIR
from helpers.profiles import get_profile
from scripts import generate_data

KINDS = {"correct_vs_wrong", "helpful_vs_evasive", "concise_vs_rambling", "follows_system"}
GOOD = {"system": "", "question": "Which is bigger: 3 or 7?", "chosen": "7 is larger than 3.", "rejected": "No."}


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _generator() -> ModuleType:
    return generate_data


def _write_split(tmp_path: Path, rows: list[Any], split: str = "train") -> Path:
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    (tmp_path / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tmp_path


@pytest.fixture(scope="module")
def splits() -> dict[str, datasets.Dataset]:
    return {split: load_local_split(split) for split in ("train", "heldout")}


# --- the shipped files -----------------------------------------------------------------------------


def test_checksums_match() -> None:
    result = verify_checksums()
    assert set(result) == {"train.jsonl", "heldout.jsonl", "sft.jsonl"}
    assert all(result.values()), result


def test_modified_file_fails_checksum(tmp_path: Path) -> None:
    for name in ("SHA256SUMS", "train.jsonl", "heldout.jsonl", "sft.jsonl"):
        shutil.copy(DATA_DIR / name, tmp_path / name)
    assert all(verify_checksums(tmp_path).values())
    with (tmp_path / "heldout.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps(GOOD) + "\n")
    assert verify_checksums(tmp_path) == {"train.jsonl": True, "heldout.jsonl": False, "sft.jsonl": True}
    (tmp_path / "sft.jsonl").unlink()
    assert verify_checksums(tmp_path)["sft.jsonl"] is False


def test_split_sizes(splits: dict[str, datasets.Dataset]) -> None:
    assert len(splits["train"]) >= 500
    assert len(splits["heldout"]) >= 100


def test_columns(splits: dict[str, datasets.Dataset]) -> None:
    for split in splits.values():
        assert split.column_names == [*REQUIRED_FIELDS, "kind"]


def test_splits_share_no_question(splits: dict[str, datasets.Dataset]) -> None:
    shared = set(splits["train"]["question"]) & set(splits["heldout"]["question"])
    assert not shared, sorted(shared)[:5]


def test_every_kind_in_both_splits(splits: dict[str, datasets.Dataset]) -> None:
    for name, split in splits.items():
        assert set(split["kind"]) == KINDS, name


def test_some_rows_have_no_system_prompt(splits: dict[str, datasets.Dataset]) -> None:
    for name, split in splits.items():
        empty = sum(1 for system in split["system"] if system == "")
        assert 0 < empty < len(split), name


def test_generator_reproduces_the_files() -> None:
    generator = _generator()
    train, heldout = generator.make_splits()
    assert train == _read_jsonl(DATA_DIR / "train.jsonl")
    assert heldout == _read_jsonl(DATA_DIR / "heldout.jsonl")
    assert generator.make_sft(train) == _read_jsonl(DATA_DIR / "sft.jsonl")


# --- the loader ------------------------------------------------------------------------------------


def test_tiny_profile_loads_local_pairs() -> None:
    data = load_preference_data(get_profile("tiny"))
    assert set(data) == {"train", "heldout"}
    assert data["train"][0] == _read_jsonl(DATA_DIR / "train.jsonl")[0]
    assert len(data["heldout"]) == len(_read_jsonl(DATA_DIR / "heldout.jsonl"))


def test_local_max_train_pairs_caps_train() -> None:
    profile = get_profile("tiny").replace("data", max_train_pairs=64)
    data = load_preference_data(profile)
    assert len(data["train"]) == 64
    assert len(data["heldout"]) >= 100


def test_unknown_split_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match="train, heldout"):
        load_local_split("test")


def _hub_rows(count: int) -> datasets.Dataset:
    return datasets.Dataset.from_dict(
        {
            "system": ["" if i % 3 == 0 else "You are an AI assistant." for i in range(count)],
            "question": [f"question {i}" for i in range(count)],
            "chosen": [f"good answer {i}" for i in range(count)],
            "rejected": [f"bad answer {i}" for i in range(count)],
        }
    )


def test_hub_data_is_validated_shuffled_and_split(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str]] = []

    def fake_load_dataset(name: str, split: str) -> datasets.Dataset:
        calls.append((name, split))
        return _hub_rows(50)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    profile = get_profile("full", check_hardware=False)
    profile = profile.replace("data", heldout_pairs=10, max_train_pairs=25)
    data = load_preference_data(profile)
    assert calls == [("Intel/orca_dpo_pairs", "train")]
    assert (len(data["train"]), len(data["heldout"])) == (25, 10)
    train_q, held_q = set(data["train"]["question"]), set(data["heldout"]["question"])
    assert not train_q & held_q
    assert data["train"]["question"] != [f"question {i}" for i in range(10, 35)], "not shuffled"
    again = load_preference_data(profile)
    assert again["heldout"]["question"] == data["heldout"]["question"], "shuffle must follow shuffle_seed"
    assert set(data["train"]["kind"]) == {"Intel/orca_dpo_pairs"}
    row = data["train"][0]
    assert row["chosen"] == row["question"].replace("question", "good answer")


def test_hub_rows_are_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    broken = _hub_rows(5).to_list()
    broken[3]["rejected"] = "   "
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: datasets.Dataset.from_list(broken))
    with pytest.raises(DataValidationError, match=r"Intel/orca_dpo_pairs.*row 4: field 'rejected' is empty"):
        load_preference_data(get_profile("full", check_hardware=False))


def test_unreachable_hub_says_use_tiny(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(name: str, split: str) -> datasets.Dataset:
        raise ConnectionError("Couldn't reach 'Intel/orca_dpo_pairs' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", no_network)
    with pytest.raises(RuntimeError) as caught:
        load_preference_data(get_profile("full", check_hardware=False))
    message = str(caught.value)
    assert "Intel/orca_dpo_pairs" in message
    assert "could not be loaded" in message
    assert "COURSE_PROFILE=tiny" in message
    assert isinstance(caught.value.__cause__, ConnectionError)


# --- validation errors: each names the file, the row and the field ---------------------------------

BAD_ROWS = {
    "missing field": ({k: v for k, v in GOOD.items() if k != "chosen"}, "chosen", "is missing"),
    "None": ({**GOOD, "rejected": None}, "rejected", "is None"),
    "non-string": ({**GOOD, "question": 12}, "question", "must be a string, got int"),
    "non-string system": ({**GOOD, "system": ["x"]}, "system", "must be a string, got list"),
    "empty question": ({**GOOD, "question": "  "}, "question", "is empty"),
    "empty chosen": ({**GOOD, "chosen": ""}, "chosen", "is empty"),
    "empty rejected": ({**GOOD, "rejected": "\n"}, "rejected", "is empty"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_row_is_reported_with_file_row_and_field(tmp_path: Path, case: str) -> None:
    bad, field, problem = BAD_ROWS[case]
    _write_split(tmp_path, [GOOD, GOOD, bad, GOOD])
    with pytest.raises(DataValidationError) as caught:
        load_local_split("train", data_dir=tmp_path)
    message = str(caught.value)
    assert f"train.jsonl row 3: field '{field}' {problem}" in message
    assert "1 problem(s)" in message


def test_invalid_json_line_is_reported_with_file_and_line(tmp_path: Path) -> None:
    _write_split(tmp_path, [GOOD, GOOD, GOOD, GOOD, '{"system": "", "question": "cut off'], split="heldout")
    with pytest.raises(DataValidationError, match=r"heldout\.jsonl line 5 \(row 5\): not valid JSON"):
        load_local_split("heldout", data_dir=tmp_path)


def test_empty_system_is_allowed(tmp_path: Path) -> None:
    _write_split(tmp_path, [GOOD, {**GOOD, "system": "Be brief."}])
    split = load_local_split("train", data_dir=tmp_path)
    assert split["system"] == ["", "Be brief."]
    assert split["kind"] == ["", ""]


def test_all_errors_are_collected_and_the_list_is_capped() -> None:
    rows = [GOOD] + [{**GOOD, "chosen": ""} for _ in range(14)]
    with pytest.raises(DataValidationError) as caught:
        validate_rows(rows, "my.jsonl")
    message = str(caught.value)
    assert message.startswith("14 problem(s) in my.jsonl")
    assert "my.jsonl row 2: field 'chosen' is empty" in message
    assert "my.jsonl row 11: field 'chosen' is empty" in message
    assert "row 12:" not in message
    assert "... and 4 more" in message


def test_several_problems_in_one_row_are_all_listed() -> None:
    with pytest.raises(DataValidationError) as caught:
        validate_rows([{"system": None, "question": ""}], "rows")
    message = str(caught.value)
    assert "4 problem(s)" in message
    for expected in ("'system' is None", "'question' is empty", "'chosen' is missing", "'rejected' is missing"):
        assert f"rows row 1: field {expected}" in message


def test_valid_rows_come_back_as_dicts() -> None:
    rows = validate_rows([GOOD, {**GOOD, "kind": "extra"}], "rows")
    assert rows == [GOOD, {**GOOD, "kind": "extra"}]
    assert all(type(row) is dict for row in rows)


def test_non_object_row_is_reported() -> None:
    with pytest.raises(DataValidationError, match=r"rows row 2: expected an object"):
        validate_rows([GOOD, ["a", "b"]], "rows")  # type: ignore[list-item]
