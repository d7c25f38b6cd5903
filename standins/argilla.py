"""Offline stand-in of ``argilla/distilabel-intel-orca-dpo-pairs`` (notebook 11 on the GPU profiles' stand-ins).

argilla re-judged every pair of Intel/orca_dpo_pairs with GPT-4 (``gpt-4-1106-preview``) and published the result in
16 columns (12,859 rows): ``system``, ``input`` (orca's ``question``), ``chosen``/``rejected`` (swapped where the
judge preferred the rejected answer), ``generations`` (the two answers in a shuffled ``order``, e.g.
``["rejected", "chosen"]``), ``labelling_model``, ``labelling_prompt`` (chat messages), ``raw_labelling_response``,
``rating`` (one float per generation, null where the judge's answer could not be parsed), ``rationale``, ``status``
("unchanged", "tie" - equal ratings or no rating - or "swapped"), ``original_chosen``/``original_rejected``,
``chosen_score`` (the higher rating) and ``in_gsm8k_train`` (bool). Column names and types as the datasets-server
``/info`` endpoint lists them, checked against the card's first row (docs/standins.md).

The stand-in rates the orca stand-in's own rows (so notebook 11's join on the question finds them) with random
ratings at argilla's reported shares: about 2,000 swapped and 4,000 ties of 12,859. NOT argilla's data.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Mapping, Sequence
from pathlib import Path

ARGILLA_ID = "argilla/distilabel-intel-orca-dpo-pairs"
SWAPPED, TIES, ROWS = 2_000, 4_000, 12_859  # argilla's card: about 2,000 swapped and 4,000 ties of 12,859
JUDGE = "gpt-4-1106-preview"
_DATASET_DIR = ("argilla___distilabel-intel-orca-dpo-pairs", "default", "0.0.0")  # where `datasets` looks offline


def _features():
    """The 16 columns with their published types."""
    from datasets import Features, List, Value  # here: building stand-ins must not import datasets at start-up

    text = Value("string")
    return Features({"system": text, "input": text, "chosen": text, "rejected": text, "generations": List(text),
                     "order": List(text), "labelling_model": text,
                     "labelling_prompt": List({"content": text, "role": text}), "raw_labelling_response": text,
                     "rating": List(Value("float64")), "rationale": text, "status": text, "original_chosen": text,
                     "original_rejected": text, "chosen_score": Value("float64"), "in_gsm8k_train": Value("bool")})


def argilla_rows(orca_rows: Sequence[Mapping[str, str]], seed: int) -> list[dict]:
    """argilla's columns for each orca row: a random status at argilla's shares, ratings that agree with it, the
    answers swapped where the status says so; the first arithmetic row is flagged ``in_gsm8k_train`` and one row has
    no rating (a tie with no score, as argilla's unparsed judgements)."""
    rng = random.Random(seed)
    rows, flagged = [], 0
    for index, orca in enumerate(orca_rows):
        draw = rng.random()
        status = "swapped" if draw < SWAPPED / ROWS else "tie" if draw < (SWAPPED + TIES) / ROWS else "unchanged"
        order = rng.sample(["chosen", "rejected"], 2)
        high, low, same = float(rng.randint(6, 10)), float(rng.randint(1, 5)), float(rng.randint(4, 10))
        score = {"unchanged": {"chosen": high, "rejected": low}, "swapped": {"chosen": low, "rejected": high},
                 "tie": {"chosen": same, "rejected": same}}[status]
        rating = None if index == 5 else [score[label] for label in order]
        status = "tie" if rating is None else status
        answers = {"chosen": orca["chosen"], "rejected": orca["rejected"]}
        chosen, rejected = (answers["rejected"], answers["chosen"]) if status == "swapped" else (orca["chosen"],
                                                                                                 orca["rejected"])
        generations = [answers[label] for label in order]
        rationale = f"Stand-in rationale: Assistant {1 + order.index('chosen')} answers the question more fully."
        gsm8k = flagged < 3 and orca["question"].startswith("What is ") and any(c.isdigit() for c in orca["question"])
        flagged += gsm8k
        rows.append({
            "system": orca["system"], "input": orca["question"], "chosen": chosen, "rejected": rejected,
            "generations": generations, "order": order, "labelling_model": JUDGE,
            "labelling_prompt": [
                {"content": "You are a helpful and precise assistant for checking the quality of the answer.",
                 "role": "system"},
                {"content": f"[Question]\n{orca['question']}\n\n[Answer 1]\n{generations[0]}\n\n[Answer 2]\n"
                            f"{generations[1]}\n\nRate each answer from 1 to 10.", "role": "user"}],
            "raw_labelling_response": "unparsable" if rating is None else f"{rating[0]:g} {rating[1]:g}\n{rationale}",
            "rating": rating, "rationale": rationale, "status": status, "original_chosen": orca["chosen"],
            "original_rejected": orca["rejected"], "chosen_score": None if rating is None else max(rating),
            "in_gsm8k_train": gsm8k,
        })
    return rows


def write_dataset(root: Path, orca_rows: Sequence[Mapping[str, str]], seed: int) -> Path:
    """The stand-in as `datasets` caches a hub data set (dataset_info.json and the train split's arrow file) under
    ``root`` (the stand-ins' HF_DATASETS_CACHE), so ``load_dataset(ARGILLA_ID)`` finds it offline."""
    from datasets import DatasetInfo, SplitDict, SplitInfo  # see _features
    from datasets.arrow_writer import ArrowWriter

    rows = argilla_rows(orca_rows, seed)
    name = _DATASET_DIR[0].split("___")[1]
    digest = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]
    folder = root.joinpath(*_DATASET_DIR, digest)
    folder.mkdir(parents=True)
    features = _features()
    writer = ArrowWriter(features=features, path=str(folder / f"{name}-train.arrow"))
    for row in rows:
        writer.write(features.encode_example(row))
    examples, size = writer.finalize()
    DatasetInfo(
        description=f"Offline stand-in for {ARGILLA_ID}: the orca stand-in's rows rated at random, NOT the real data.",
        features=features, builder_name="parquet", dataset_name=name, config_name="default", version="0.0.0",
        splits=SplitDict({"train": SplitInfo(name="train", num_bytes=size, num_examples=examples, dataset_name=name)}),
        dataset_size=size,
    ).write_to_directory(str(folder))
    return folder
