"""The real lm-evaluation-harness on the course's own task: it loads, and it measures what the course measures."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from datasets import Dataset

from helpers import evaluation as harness
from helpers.paths import DATA_DIR

HELDOUT_ROWS = [json.loads(line) for line in (DATA_DIR / "heldout.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def course_task():
    """The ``course_preferences`` task as lm_eval loads it from the course's task folder."""
    with harness.course_task_dir() as folder:
        loaded = harness.make_task_manager(folder).load([harness.COURSE_TASK])
        yield loaded["tasks"][harness.COURSE_TASK]


@pytest.fixture(scope="module")
def tiny_results(tiny_model_path):
    """One lm_eval run of the tiny model on the course's task and its per-kind group."""
    return harness.run_lm_eval(
        tiny_model_path, [harness.COURSE_TASK, harness.COURSE_TASK_BY_KIND], batch_size=16, device="cpu"
    )


@pytest.fixture(scope="module")
def course_accuracy(tiny_model_path):
    """The course's own summed log-likelihood preference accuracy of the tiny model on the same pairs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from helpers.chatml import format_dataset
    from helpers.evaluation import preference_accuracy, score_pairs

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype="float32")
    formatted = format_dataset(Dataset.from_json(str(DATA_DIR / "heldout.jsonl")), tokenizer, split="heldout")
    scores = score_pairs(model, tokenizer, formatted)
    accuracy = preference_accuracy(scores)
    # preference_accuracy averages in float32 (0.69375 comes back as 0.6937500238...); the exact share of
    # wins, in float64, is what lm_eval's mean of 0/1 scores must equal to 1e-9.
    wins = (scores.chosen_sum > scores.rejected_sum).tolist()
    accuracy["exact_sum"] = sum(wins) / len(wins)
    accuracy["exact_by_kind"] = {
        kind: sum(w for w, k in zip(wins, scores.kinds) if k == kind) / scores.kinds.count(kind)
        for kind in set(scores.kinds)
    }
    return accuracy


def test_task_loads_every_heldout_pair(course_task):
    docs = list(course_task.test_docs())
    assert len(HELDOUT_ROWS) > 0
    assert len(docs) == len(HELDOUT_ROWS)
    assert [d["question"] for d in docs] == [r["question"] for r in HELDOUT_ROWS]


def test_task_renders_the_course_chatml_prompt_and_answers(course_task, tiny_model_path):
    from transformers import AutoTokenizer

    from helpers.chatml import format_orca_row

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    docs = list(course_task.test_docs())
    assert {bool(r["system"]) for r in HELDOUT_ROWS} == {True, False}  # both prompt shapes are covered
    for doc, row in zip(docs, HELDOUT_ROWS):
        expected = format_orca_row(row, tokenizer)
        assert course_task.doc_to_text(doc) == expected["prompt"]
        assert course_task.doc_to_choice(doc) == [expected["chosen"], expected["rejected"]]
        assert course_task.doc_to_target(doc) == 0
    assert course_task.config.target_delimiter == ""


def test_lm_eval_acc_equals_course_preference_accuracy(tiny_results, course_accuracy):
    acc = tiny_results[harness.COURSE_TASK]["acc"]
    assert 0.0 < acc < 1.0  # a real, non-degenerate measurement
    assert acc == pytest.approx(course_accuracy["exact_sum"], abs=1e-9)
    assert acc == pytest.approx(course_accuracy["sum"], abs=1e-6)  # the helper's float32 rounding only
    assert set(tiny_results[harness.COURSE_TASK]) >= {"acc", "acc_norm", "acc_stderr", "acc_norm_stderr"}


def test_per_kind_tasks_match_course_by_kind(tiny_results, course_accuracy):
    by_kind = course_accuracy["by_kind"]["sum"]
    assert set(by_kind) == set(Counter(r["kind"] for r in HELDOUT_ROWS))
    assert set(course_accuracy["exact_by_kind"]) == set(by_kind)
    for kind, value in course_accuracy["exact_by_kind"].items():
        assert tiny_results[f"{harness.COURSE_TASK}_{kind}"]["acc"] == pytest.approx(value, abs=1e-9)
        assert value == pytest.approx(by_kind[kind], abs=1e-6)
    group = tiny_results[harness.COURSE_TASK_BY_KIND]["acc"]
    assert group == pytest.approx(tiny_results[harness.COURSE_TASK]["acc"], abs=1e-9)


def test_tasks_for_profile():
    suite = ["agieval_nous", "arc_challenge", "arc_easy", "boolq", "hellaswag", "openbookqa", "piqa", "winogrande"]
    suite.append("truthfulqa_mc2")
    assert harness.tasks_for_profile("tiny") == ["course_preferences"]
    assert sorted(harness.tasks_for_profile("full")) == sorted(suite)
    assert harness.tasks_for_profile("t4") == harness.tasks_for_profile("full")
    assert harness.HEADLINE_METRICS["truthfulqa_mc2"] == "mc2"
    assert harness.HEADLINE_METRICS["agieval_nous"] == "acc_norm"
    with pytest.raises(ValueError, match="nope"):
        harness.tasks_for_profile("nope")


def test_suite_tasks_are_known_to_lm_eval():
    with harness.course_task_dir() as folder:
        manager = harness.task_manager_for(harness.suite_tasks(), [folder])
    assert set(harness.suite_tasks()) <= set(manager.all_tasks)


def test_unknown_task_is_named_in_the_error(tiny_model_path):
    with pytest.raises(ValueError, match="no_such_task_xyz") as info:
        harness.run_lm_eval(tiny_model_path, ["course_preferences", "no_such_task_xyz"], device="cpu")
    assert "include_path" in str(info.value)
    assert "'course_preferences'" not in str(info.value).split("(asked for")[0]  # only the unknown one is blamed


def test_compare_models_block_holds_each_models_own_accuracy(tiny_model_path, other_model_path):
    """Two different models through lm-eval: each number is that model's summed preference accuracy, as the course's
    own scoring (helpers.evaluation.score_pairs, another implementation) computes it on the same pairs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from helpers.chatml import format_dataset
    from helpers.evaluation import preference_accuracy, score_pairs

    block = harness.compare_models(tiny_model_path, other_model_path, ["course_preferences"], device="cpu")
    assert list(block) == ["course_preferences"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    formatted = format_dataset(Dataset.from_json(str(DATA_DIR / "heldout.jsonl")), tokenizer, split="heldout")
    for side, path in (("base", tiny_model_path), ("dpo", other_model_path)):
        model = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
        expected = preference_accuracy(score_pairs(model, tokenizer, formatted))["sum"]
        assert block["course_preferences"][side] == pytest.approx(expected, abs=1e-9), side
    assert block["course_preferences"]["base"] != block["course_preferences"]["dpo"]  # two models, two scores
