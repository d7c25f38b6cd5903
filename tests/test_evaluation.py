"""Evaluation (notebook 06): answer log-likelihoods, preference accuracy, implicit rewards and generation health,
each against an independent reference - PyTorch's plain log-softmax, transformers' own unbatched generation, values
worked out by hand - and the rule checks on pairs the course's data generator never wrote."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import evaluation as ev
from helpers.chatml import render_prompt
from helpers.loading import load_model


@pytest.fixture(scope="module")
def model(profile, tiny_model_path):
    return load_model(profile, four_bit=False, source=str(tiny_model_path))


QUESTIONS = ["What is a spoon used for?", "What is a key used for?", "How do I make tea?"]
ANSWERS = ["A spoon is used for eating soup.<|im_end|>", "It opens a lock.<|im_end|>", "Boil water.<|im_end|>"]


def test_answer_logprobs_equal_the_full_log_softmax_one_sequence_at_a_time(model, tokenizer,
                                                                          naive_answer_logprob) -> None:
    prompts = [render_prompt(tokenizer, "", q) for q in QUESTIONS]
    sums, counts = ev.answer_logprobs(model, tokenizer, prompts, ANSWERS, batch_size=2)  # padded batches
    for i, (prompt, answer) in enumerate(zip(prompts, ANSWERS)):
        assert sums[i].item() == pytest.approx(naive_answer_logprob(model, tokenizer, prompt, answer), abs=2e-4)
        assert counts[i].item() == len(tokenizer(answer, add_special_tokens=False)["input_ids"])


def test_answer_logprobs_refuse_unequal_lists(model, tokenizer) -> None:
    with pytest.raises(ValueError, match="3 prompts but 2 answers"):
        ev.answer_logprobs(model, tokenizer, ["a", "b", "c"], ["x", "y"])


def _scores(chosen, rejected, chosen_n, rejected_n, kinds) -> ev.PairScores:
    as_tensor = lambda values: torch.tensor(values, dtype=torch.float32)  # noqa: E731
    return ev.PairScores(as_tensor(chosen), as_tensor(rejected), as_tensor(chosen_n), as_tensor(rejected_n), kinds)


def test_preference_accuracy_by_hand() -> None:
    # pair 1: chosen -2 vs rejected -6 (4 tokens each)      -> wins summed and per token
    # pair 2: chosen -6 (3 tokens) vs rejected -8 (8 tokens) -> wins summed (-6 > -8), loses per token (-2 < -1)
    # pair 3: chosen -9 vs rejected -3 (3 tokens each)       -> loses both
    scores = _scores([-2, -6, -9], [-6, -8, -3], [4, 3, 3], [4, 8, 3], ["a", "b", "b"])
    accuracy = ev.preference_accuracy(scores)
    assert accuracy["sum"] == pytest.approx(2 / 3)
    assert accuracy["per_token"] == pytest.approx(1 / 3)
    assert accuracy["by_kind"]["sum"] == {"a": 1.0, "b": 0.5}
    assert accuracy["by_kind"]["per_token"] == {"a": 1.0, "b": 0.0}


def test_implicit_rewards_by_hand() -> None:
    policy = _scores([-2, -5], [-9, -4], [1, 1], [1, 1], ["a", "a"])
    reference = _scores([-3, -5], [-6, -6], [1, 1], [1, 1], ["a", "a"])
    rewards = ev.implicit_rewards(policy, reference, beta=0.5)
    # chosen: 0.5 * (+1, 0) = (0.5, 0); rejected: 0.5 * (-3, +2) = (-1.5, 1); margins (2.0, -1.0)
    assert rewards["mean_chosen"] == pytest.approx(0.25)
    assert rewards["mean_rejected"] == pytest.approx(-0.25)
    assert rewards["mean_margin"] == pytest.approx(0.5)
    assert rewards["accuracy"] == 0.5 and rewards["by_kind"] == {"a": 0.5}


def test_greedy_generate_in_padded_batches_equals_unbatched_generation(model, tokenizer) -> None:
    prompts = [render_prompt(tokenizer, "", q) for q in QUESTIONS]
    batched = ev.greedy_generate(model, tokenizer, prompts, max_new_tokens=12, batch_size=3)
    for prompt, gen in zip(prompts, batched):
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
        alone = out[0, ids["input_ids"].shape[1]:].tolist()
        if tokenizer.eos_token_id in alone:
            alone = alone[: alone.index(tokenizer.eos_token_id) + 1]
        assert gen.token_ids == alone
        assert gen.ended == (tokenizer.eos_token_id in alone)


def test_greedy_generation_ignores_a_repetition_penalty_in_the_generation_config(model, tokenizer) -> None:
    prompts = [render_prompt(tokenizer, "", q) for q in QUESTIONS]
    plain = ev.greedy_generate(model, tokenizer, prompts, max_new_tokens=16)
    saved = model.generation_config.repetition_penalty
    model.generation_config.repetition_penalty = 3.0  # what a hub generation_config could carry (Qwen2.5: 1.05)
    try:
        penalised = ev.greedy_generate(model, tokenizer, prompts, max_new_tokens=16)
    finally:
        model.generation_config.repetition_penalty = saved
    assert [g.token_ids for g in penalised] == [g.token_ids for g in plain]


@pytest.mark.parametrize(
    ("ids", "loops"),
    [([1, 2, 3, 1, 2, 3, 1, 2, 3], True), ([1, 2, 3, 1, 2, 3, 1, 2, 4], False), ([5] * 9, True), ([5] * 8, False),
     ([7, 1, 2, 3, 1, 2, 3, 1, 2, 3, 8], True), ([], False)],
)
def test_repetition_loop(ids, loops) -> None:
    assert ev.has_repetition_loop(ids) is loops


def test_well_formed_needs_an_end_some_text_and_no_loop() -> None:
    assert ev.is_well_formed(ev.Generation("p", "Fine.", [10, 11, 2], True))
    assert not ev.is_well_formed(ev.Generation("p", "Fine and", [10, 11], False))  # ran out of budget
    assert not ev.is_well_formed(ev.Generation("p", "", [2], True))  # said nothing
    assert not ev.is_well_formed(ev.Generation("p", "la la la", [4, 5, 6] * 3 + [2], True))


def test_overlap_f1_by_hand() -> None:
    # answer words: the cat sat (3); reference: the cat ran away (4); common: the, cat -> P 2/3, R 2/4, F1 4/7
    assert ev.overlap_f1("The cat sat.", "the cat ran away") == pytest.approx(4 / 7)
    assert ev.overlap_f1("the the the", "the") == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))  # clipped counts
    assert ev.overlap_f1("", "anything") == 0.0 and ev.overlap_f1("a b", "c d") == 0.0


# Pairs written for this test, in words the course's data generator never uses: the rules must still judge them.
OTHER_PAIRS = {
    "helpful_vs_evasive": ("Preheat the oven to 200 degrees and bake the bread for thirty minutes.",
                           "As an AI language model I am unable to assist with baking."),
    "concise_vs_rambling": ("Paris is the capital of France.",
                            "Well, so, thinking about it at length and from every angle, I would say that Paris, "
                            "a lovely old city, happens to be the capital of France, as many people know."),
    "correct_vs_wrong": ("The train leaves at nine.", "The train leaves at ten."),
    "follows_system": ("Certainly, the river is long.", "The river is long."),
    "Intel/orca_dpo_pairs": ("Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
                             "I do not know what photosynthesis is."),
}


@pytest.mark.parametrize("kind", sorted(OTHER_PAIRS))
def test_rules_judge_pairs_from_outside_the_course(kind) -> None:
    chosen, rejected = OTHER_PAIRS[kind]
    assert ev.follows_rule(kind, chosen, rejected, chosen), f"{kind}: the chosen answer itself must pass"
    assert not ev.follows_rule(kind, chosen, rejected, rejected), f"{kind}: the rejected answer itself must fail"
    assert not ev.follows_rule(kind, chosen, rejected, "   "), "an empty answer never follows a rule"


def test_rules_on_new_answers() -> None:
    chosen, rejected = OTHER_PAIRS["correct_vs_wrong"]
    assert ev.follows_rule("correct_vs_wrong", chosen, rejected, "Yes: the train leaves at nine, on time.")
    chosen, rejected = OTHER_PAIRS["follows_system"]
    assert ev.follows_rule("follows_system", chosen, rejected, "Certainly! Rivers are long.")
    assert not ev.follows_rule("follows_system", chosen, rejected, "Rivers are long, certainly.")
    chosen, rejected = OTHER_PAIRS["Intel/orca_dpo_pairs"]  # a hub row's kind is the data set's id
    assert ev.follows_rule("Intel/orca_dpo_pairs", chosen, rejected, "Plants use light to make sugar and oxygen.")


def test_generation_health_by_hand() -> None:
    rows = [{"kind": k, "chosen": c, "rejected": r} for k, (c, r) in sorted(OTHER_PAIRS.items())]
    gens = [ev.Generation("p", row["chosen"], [10, 2], True) for row in rows]
    gens[0] = ev.Generation("p", rows[0]["rejected"], [10, 11], False)  # not ended, and the rejected answer
    health = ev.generation_health(gens, rows)
    n = len(rows)
    assert health["well_formed"] == pytest.approx((n - 1) / n)
    assert health["follows_rule"] == pytest.approx((n - 1) / n)
    assert health["follows_rule_by_kind"][rows[0]["kind"]] == 0.0
    with pytest.raises(ValueError, match="generations but"):
        ev.generation_health(gens[:-1], rows)


def test_side_by_side_takes_the_kinds_in_turn() -> None:
    rows = [{"kind": k, "system": "", "question": f"q{i}"} for i, k in enumerate("aabbbc")]
    gens = [ev.Generation("p", f"answer {i}", [], True) for i in range(len(rows))]
    picked = ev.side_by_side(gens, gens, rows, n=5)
    assert [p["kind"] for p in picked] == ["a", "b", "c", "a", "b"]
    assert [p["question"] for p in picked] == ["q0", "q2", "q5", "q1", "q3"]
    assert len(ev.side_by_side(gens, gens, rows, n=50)) == len(rows)


def test_targets_by_hand() -> None:
    results = {"heldout_preference_accuracy": {"base": 0.6, "dpo": 0.86}, "well_formed": {"dpo": 0.95}}
    assert ev.targets_met(results) == {"dpo_accuracy": True, "gain_over_base": True, "well_formed": True}
    results["heldout_preference_accuracy"]["base"] = 0.62
    assert ev.targets_met(results)["gain_over_base"] is False


def test_results_go_to_the_run_folder_and_the_outputs_copy(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("COURSE_OUTPUT_DIR", str(tmp_path / "outputs"))
    path = ev.write_results({"profile": "tiny", "value": 1}, tmp_path / "run")
    assert json.loads(path.read_text()) == {"profile": "tiny", "value": 1}
    assert json.loads((tmp_path / "outputs" / "eval_results.json").read_text()) == {"profile": "tiny", "value": 1}
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["eval_results.json"]  # no temporary left


@pytest.mark.parametrize("reference", ["Qwen/Qwen2.5-0.5B-Instruct", "teknium/OpenHermes-2.5-Mistral-7B"])
def test_a_hub_id_is_a_model_reference_for_lm_eval(reference) -> None:
    assert ev.check_model_reference(reference) == reference


def test_a_folder_without_a_model_or_a_bad_name_is_refused(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        ev.check_model_reference(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither a model folder"):
        ev.check_model_reference("not a model")


def test_lm_eval_limit_defaults_per_profile() -> None:
    """A free T4 evaluates 100 documents per task unless asked otherwise (the card's nine tasks in full would take
    hours there); tiny and full evaluate every document."""
    assert [ev.default_lm_eval_limit(name) for name in ("tiny", "t4", "full")] == [None, 100, None]
    assert ev.default_lm_eval_limit("t4", 8) == 8 and ev.default_lm_eval_limit("full", 0.5) == 0.5
