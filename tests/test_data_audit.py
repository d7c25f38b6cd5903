"""Notebook 11's audit (helpers/data_audit.py), the noisy twin the data generator writes, and the argilla stand-in.

Every expected value is counted by hand from the rows written out here, or taken from a published number (argilla's
card: about 2,000 swapped and 4,000 ties of 12,859 pairs; the datasets-server's column list)."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch

from helpers.data_audit import (
    Verdict,
    agreement,
    argilla_verdicts,
    audit,
    detection,
    filter_pairs,
    first_verdict,
    join_argilla,
    label_errors,
    margin_verdicts,
    read_pairs,
    reward_scores,
    rule_check,
    rule_verdicts,
)
from helpers.profiles import DATA_DIR, REPO_ROOT
from scripts import generate_data
from standins.argilla import argilla_rows

ORCA_SWAP_RATE, ORCA_TIE_RATE = 2_000 / 12_859, 4_000 / 12_859  # argilla's card


def pair(question: str, chosen: str, rejected: str, *, system: str = "", kind: str = "x", **extra) -> dict:
    return {"system": system, "question": question, "chosen": chosen, "rejected": rejected, "kind": kind, **extra}


def checksums() -> dict[str, str]:
    return {name: digest for digest, name in (line.split("  ", 1) for line in
                                               (DATA_DIR / "SHA256SUMS").read_text().splitlines())}


# --- the shipped data: the clean splits unchanged, the twin as stated --------------------------------------------


@pytest.mark.parametrize("name", ["train.jsonl", "heldout.jsonl", "sft.jsonl", "train_noisy.jsonl"])
def test_shipped_files_match_sha256sums(name):
    assert hashlib.sha256((DATA_DIR / name).read_bytes()).hexdigest() == checksums()[name]


def test_generator_rewrites_every_split_byte_for_byte():
    """The shipped tiny model was trained on train/heldout/sft: adding the twin must not change a byte of them."""
    train, heldout = generate_data.make_splits()
    files = {"train.jsonl": train, "heldout.jsonl": heldout, "sft.jsonl": generate_data.make_sft(train),
             "train_noisy.jsonl": generate_data.make_noisy_twin(train, heldout)}
    for name, rows in files.items():
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        assert hashlib.sha256(text.encode()).hexdigest() == checksums()[name], name


def test_update_checksums_keeps_other_lines(tmp_path):
    (tmp_path / "a.txt").write_text("new")
    (tmp_path / "SHA256SUMS").write_text("00  tiny_model/x\n11  a.txt\n")
    generate_data.update_checksums(["a.txt"], tmp_path)
    lines = (tmp_path / "SHA256SUMS").read_text().splitlines()
    assert lines == ["00  tiny_model/x", f"{hashlib.sha256(b'new').hexdigest()}  a.txt"]


@pytest.fixture(scope="module")
def twin():
    return read_pairs(DATA_DIR / "train_noisy.jsonl")


def test_twin_defect_rates_are_argillas(twin):
    n = len(twin)
    counts = {d: sum(r["defect"] == d for r in twin) for d in ("swapped", "tie", "identical", "duplicate",
                                                             "eval_overlap")}
    assert n == len(read_pairs(DATA_DIR / "train.jsonl"))
    assert abs(counts["swapped"] / n - ORCA_SWAP_RATE) < 0.01
    assert abs(counts["tie"] / n - ORCA_TIE_RATE) < 0.01
    assert counts["identical"] == 8 and counts["duplicate"] == 16 and counts["eval_overlap"] == 16


def test_twin_rows_are_what_their_defect_says(twin):
    """Fresh rows: none is a row of train; held-out questions only where planted; every tie's chosen is longer."""
    train = {tuple(r[k] for k in ("system", "question", "chosen", "rejected")) for r in read_pairs(DATA_DIR /
                                                                                                  "train.jsonl")}
    held = {r["question"] for r in read_pairs(DATA_DIR / "heldout.jsonl")}
    for row in twin:
        key = tuple(row[k] for k in ("system", "question", "chosen", "rejected"))
        assert key not in train or row["defect"] == "eval_overlap"
        assert (row["question"] in held) == (row["defect"] == "eval_overlap"), row
        if row["defect"] == "tie":
            assert row["chosen"].startswith(row["rejected"]) and len(row["chosen"]) > len(row["rejected"]), row
        if row["defect"] == "identical":
            assert row["chosen"] == row["rejected"]


def test_twin_length_bias_against_the_clean_split(twin):
    clean = audit(read_pairs(DATA_DIR / "train.jsonl"), [])
    noisy = audit(twin, [])
    assert noisy["chosen_longer"] > clean["chosen_longer"] + 0.1
    assert noisy["mean_gap_words"] > clean["mean_gap_words"] + 3


# --- audit and judges on hand-made rows ------------------------------------------------------------------------


def test_audit_counts_by_hand():
    rows = [pair("What is 2+2?", "4", "4"),  # identical
            pair("Name a colour.", "Red.", "Dog."),
            pair("Name a colour.", "Red.", "Dog."),  # exact repeat
            pair("Name a colour.", "Blue.", "Cat."),  # repeated prompt, other answers
            pair("  name a COLOUR ", "Green, a colour.", "No.")]  # overlaps the evaluation question below
    found = audit(rows, eval_questions=["Name a colour"])
    assert (found["identical"], found["duplicate"], found["repeated_prompt"]) == (1, 1, 1)
    assert found["eval_overlap"] == 4  # rows 2-5: the same words as the evaluation question
    # gaps in words: 0, 0, 0, 0, +2 (green a colour vs no)
    assert found["mean_gap_words"] == pytest.approx(2 / 5) and found["chosen_longer"] == pytest.approx(1 / 5)


@pytest.mark.parametrize("row, answer, expected", [
    (pair("Which number is larger, 8 or 66?", "", "", kind="correct_vs_wrong"), "66 is larger than 8.", True),
    (pair("Which number is larger, 8 or 66?", "", "", kind="correct_vs_wrong"), "8 is larger than 66.", False),
    (pair("Which is less: 8 or 66?", "", "", kind="correct_vs_wrong"), "8 is smaller than 66. I hope so.", True),
    (pair("Which is less: 8 or 66?", "", "", kind="correct_vs_wrong"), "Eight.", False),
    (pair("Ben has a red hat. What color is the hat of Ben?", "", "", kind="correct_vs_wrong"),
     "The hat of Ben is red. Happy to help.", True),
    (pair("Ben has a red hat. What color is the hat of Ben?", "", "", kind="correct_vs_wrong"),
     "The hat of Ben is blue.", False),
    (pair("Tips?", "", "", system="Always begin your answer with the word 'Sure'.", kind="follows_system"),
     "Sure, water it.", True),
    (pair("Tips?", "", "", system="Always begin your answer with the word 'Sure'.", kind="follows_system"),
     "Water it.", False),
    (pair("Tips?", "", "", kind="concise_vs_rambling"), "Water it daily.", True),
    (pair("Tips?", "", "", kind="concise_vs_rambling"), "Great question! Water it daily.", False),
    (pair("Tips?", "", "", kind="helpful_vs_evasive"), "Water it daily.", None),
])
def test_rule_check_by_hand(row, answer, expected):
    assert rule_check(row, answer) is expected


def test_rule_verdicts_never_read_the_labels():
    """The same two answers give the opposite verdict when the labels are swapped, and a tie when both are right."""
    q = "Which number is larger, 3 or 9?"
    right, wrong = "9 is larger than 3.", "3 is larger than 9."
    verdicts = rule_verdicts([pair(q, right, wrong, kind="correct_vs_wrong"),
                              pair(q, wrong, right, kind="correct_vs_wrong"),
                              pair(q, right + " I hope this helps.", right, kind="correct_vs_wrong"),
                              pair(q, right, wrong, kind="helpful_vs_evasive")])
    assert [v.status for v in verdicts] == ["agree", "reversed", "tie", None]


def test_margin_verdicts_standardise_by_hand():
    # all six scores: mean 2, deviations 1, -1, 0.05, -1, 1, -0.05: sample sd sqrt(4.005 / 5)
    verdicts = margin_verdicts(torch.tensor([3.0, 1.0, 2.05]), torch.tensor([1.0, 3.0, 1.95]), tie_margin=0.25)
    sd = math.sqrt(4.005 / 5)
    assert [v.status for v in verdicts] == ["agree", "reversed", "tie"]  # the third margin: 0.1 / sd = 0.11
    assert verdicts[0].chosen == pytest.approx(1 / sd) and verdicts[2].rejected == pytest.approx(-0.05 / sd)


def test_argilla_join_and_verdicts_by_hand():
    """argilla lists ratings in the shuffled ``order`` of the generations; a swapped pair's higher rating belongs to
    orca's rejected answer; a pair without a rating has no verdict."""
    rows = [pair("q1", "A", "B"), pair("q2", "C", "D"), pair("q3", "E", "F"), pair("q4 <|im_end|>", "G", "H")]
    rated = [
        {"input": "q1", "original_chosen": "A", "order": ["rejected", "chosen"], "rating": [3.0, 9.0],
         "status": "unchanged"},
        {"input": "q2", "original_chosen": "C", "order": ["chosen", "rejected"], "rating": [2.0, 8.0],
         "status": "swapped"},
        {"input": "q3", "original_chosen": "E", "order": ["chosen", "rejected"], "rating": None, "status": "tie"},
    ]
    joined = join_argilla(rows, rated)
    assert [j["input"] if j else None for j in joined] == ["q1", "q2", "q3", None]
    verdicts = argilla_verdicts(joined)
    assert verdicts[0] == Verdict("agree", 9.0, 3.0)
    assert verdicts[1] == Verdict("reversed", 2.0, 8.0)
    assert verdicts[2].status is None and verdicts[3].status is None


def test_first_verdict_and_agreement():
    a = [Verdict(None), Verdict("tie"), Verdict("agree")]
    b = [Verdict("reversed"), Verdict("agree"), Verdict("agree")]
    assert [v.status for v in first_verdict(a, b)] == ["reversed", "tie", "agree"]
    table = agreement(a, b, ("a", "b"))
    assert table.loc["none", "reversed"] == 1 and table.loc["tie", "agree"] == 1 and table.loc["agree", "agree"] == 1
    assert table.to_numpy().sum() == 3


def test_detection_precision_recall_by_hand():
    truth = ["swapped", "swapped", "none", "none", "tie", "identical", "none", "tie"]
    verdicts = [Verdict(s) for s in ("reversed", None, "reversed", "agree", "tie", "tie", "tie", "agree")]
    found = detection(verdicts, truth)
    # swapped: flagged rows 1 and 3, of which row 1 is swapped; defects rows 1, 2 -> precision 1/2, recall 1/2
    assert found["swapped"] == {"defects": 2, "flagged": 2, "found": 1, "precision": 0.5, "recall": 0.5}
    # ties (identical counts): flagged rows 5, 6, 7; real ties rows 5, 6, 8 -> precision 2/3, recall 2/3
    assert found["tie"]["precision"] == pytest.approx(2 / 3) and found["tie"]["recall"] == pytest.approx(2 / 3)


def test_filter_rules_by_hand():
    rows = [pair("held out?", "a b", "c"),  # 1 evaluation overlap
            pair("q2", "same", "same"),  # 2 identical
            pair("q3", "good", "bad"),  # 3 kept
            pair("q3", "good", "bad"),  # 4 exact repeat of 3
            pair("q5", "x", "y"),  # 5 no verdict
            pair("q6", "x", "y"),  # 6 tie
            pair("q7", "worse", "better"),  # 7 reversed: swapped and kept
            pair("q8", "meh", "bad"),  # 8 chosen scores below the floor
            pair("q9", "x", "y"),  # 9 flagged by the extra overlap column (argilla's in_gsm8k_train)
            pair("q10", "fine", "bad")]  # 10 reversed, but the new chosen scores too low
    verdicts = [Verdict("agree", 9, 1), Verdict("tie", 5, 5), Verdict("agree", 9, 1), Verdict("agree", 9, 1),
                Verdict(None), Verdict("tie", 7, 7), Verdict("reversed", 2, 9), Verdict("agree", 5, 1),
                Verdict("agree", 9, 1), Verdict("reversed", 1, 4)]
    kept, report = filter_pairs(rows, verdicts, eval_questions=["Held out"], min_chosen_score=8,
                                extra_overlap=[False] * 8 + [True, False])
    assert [(r["question"], r["chosen"], r["swapped_by_filter"]) for r in kept] == [
        ("q3", "good", False), ("q7", "better", True)]
    assert report == {"pairs in": 10, "evaluation overlap": 2, "identical pair": 1, "exact repeat": 1,
                      "no verdict": 1, "tie": 1, "chosen score too low": 2, "swapped (kept)": 1, "pairs out": 2}


def test_label_errors_by_hand():
    rows = [{"defect": "swapped", "swapped_by_filter": True},  # fixed
            {"defect": "swapped"},  # still wrong
            {"defect": "none", "swapped_by_filter": True},  # broken by the filter
            {"defect": "none"}, {"defect": "tie"}, {"defect": "duplicate"}]
    assert label_errors(rows) == pytest.approx(3 / 6)


# --- the reward model's scores ---------------------------------------------------------------------------------


def test_reward_scores_batched_equal_one_by_one(profile, tokenizer):
    """Right-padded batches of mixed length score each text as it scores alone (no padding at all)."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(profile.model_id, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    texts = ["<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello there, friend.<|im_end|>",
             "short", "a somewhat longer text, with more tokens than the others in this batch"]
    batched = reward_scores(model, tokenizer, texts, batch_size=3)
    with torch.no_grad():
        alone = [model(**tokenizer(t, return_tensors="pt")).logits[0, 0].item() for t in texts]
    assert batched.tolist() == pytest.approx(alone, abs=1e-4)
    assert tokenizer.padding_side == "right"


# --- the argilla stand-in: the published layout ------------------------------------------------------------------


def test_argilla_standin_rows_have_the_published_layout():
    """16 columns in the datasets-server's order; status, scores and answers consistent as argilla derived them."""
    orca = [{"system": "", "question": f"What is {i} + 1?", "chosen": f"{i + 1}", "rejected": "0"} for i in range(600)]
    rows = argilla_rows(orca, seed=3)
    assert list(rows[0]) == ["system", "input", "chosen", "rejected", "generations", "order", "labelling_model",
                             "labelling_prompt", "raw_labelling_response", "rating", "rationale", "status",
                             "original_chosen", "original_rejected", "chosen_score", "in_gsm8k_train"]
    statuses = [r["status"] for r in rows]
    assert abs(statuses.count("swapped") / len(rows) - ORCA_SWAP_RATE) < 0.05
    assert abs(statuses.count("tie") / len(rows) - ORCA_TIE_RATE) < 0.06
    for orca_row, r in zip(orca, rows):
        assert r["input"] == orca_row["question"] and r["original_chosen"] == orca_row["chosen"]
        assert sorted(r["order"]) == ["chosen", "rejected"] and r["generations"][r["order"].index("chosen")] == \
            orca_row["chosen"]
        if r["rating"] is None:
            assert r["status"] == "tie" and r["chosen_score"] is None
            continue
        by_label = dict(zip(r["order"], r["rating"]))
        assert r["chosen_score"] == max(r["rating"])
        assert r["status"] == ("tie" if by_label["chosen"] == by_label["rejected"] else
                               "swapped" if by_label["rejected"] > by_label["chosen"] else "unchanged")
        assert r["chosen"] == (orca_row["rejected"] if r["status"] == "swapped" else orca_row["chosen"])
    assert sum(r["in_gsm8k_train"] for r in rows) == 3


def test_notebook_11s_gain_check_holds_on_every_committed_seed() -> None:
    """11's self-check (filtered pairs gain more than 0.03 held-out accuracy) and its text (0.10 or more on every
    seed) read back from the committed benchmark (seeds_11.json), with the filter on fewer pairs and fewer errors."""
    seeds = json.loads((REPO_ROOT / "benchmarks" / "results" / "seeds_11.json").read_text())
    assert seeds["notebook"] == "11_data_audit" and len(seeds["seeds"]) >= 5
    every, kept = seeds["rows"]["all pairs"], seeds["rows"]["filtered"]
    for i, seed in enumerate(seeds["seeds"]):
        gain = kept["accuracy"][i] - every["accuracy"][i]
        assert gain > 0.03 and round(gain, 2) >= 0.10, (seed, gain)  # the check, and the text's "0.10 or more"
        assert kept["pairs"][i] < every["pairs"][i] and kept["label_errors"][i] < every["label_errors"][i], seed
