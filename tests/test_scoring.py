"""helpers/scoring.py, each measurement against an independent reference: PyTorch's plain log-softmax one sequence
at a time, transformers' own unbatched generation, values worked out by hand, and rule checks on pairs the course's
data generator never wrote."""

from __future__ import annotations

import pytest
import torch

from helpers import scoring
from helpers.chatml import prompt_messages
from helpers.scoring import Generation

QUESTIONS = ["What is a spoon used for?", "What is a key used for?", "How do I make tea?"]
ANSWERS = ["A spoon is used for eating soup.<|im_end|>", "It opens a lock.<|im_end|>", "Boil water.<|im_end|>"]


def prompt(tokenizer, question: str, system: str = "") -> str:
    return tokenizer.apply_chat_template(prompt_messages(system, question), add_generation_prompt=True, tokenize=False)


def test_answer_logprobs_equal_the_full_log_softmax_one_sequence_at_a_time(tiny_model, tokenizer,
                                                                          naive_answer_logprob) -> None:
    prompts = [prompt(tokenizer, q, s) for q, s in zip(QUESTIONS, ["", "Be brief.", ""])]
    sums, counts = scoring.answer_logprobs(tiny_model, tokenizer, prompts, ANSWERS, batch_size=2)  # padded batches
    for i, (p, a) in enumerate(zip(prompts, ANSWERS)):
        assert sums[i].item() == pytest.approx(naive_answer_logprob(tiny_model, tokenizer, p, a), abs=2e-4)
        assert counts[i].item() == len(tokenizer(p + a)["input_ids"]) - len(tokenizer(p)["input_ids"])


def test_answer_logprobs_refuse_unequal_lists(tiny_model, tokenizer) -> None:
    with pytest.raises(ValueError, match="3 prompts but 2 answers"):
        scoring.answer_logprobs(tiny_model, tokenizer, ["a", "b", "c"], ["x", "y"])


def scores(chosen, rejected, chosen_n, rejected_n, kinds) -> scoring.PairScores:
    def tensor(values):
        return torch.tensor(values, dtype=torch.float32)

    return scoring.PairScores(tensor(chosen), tensor(rejected), tensor(chosen_n), tensor(rejected_n), kinds)


def test_preference_accuracy_by_hand() -> None:
    # pair 1: chosen -2 vs rejected -6 (4 tokens each)      -> wins summed and per token
    # pair 2: chosen -6 (3 tokens) vs rejected -8 (8 tokens) -> wins summed (-6 > -8), loses per token (-2 < -1)
    # pair 3: chosen -9 vs rejected -3 (3 tokens each)       -> loses both
    accuracy = scoring.preference_accuracy(scores([-2, -6, -9], [-6, -8, -3], [4, 3, 3], [4, 8, 3], ["a", "b", "b"]))
    assert accuracy["sum"] == pytest.approx(2 / 3) and accuracy["per_token"] == pytest.approx(1 / 3)
    assert accuracy["by_kind"] == {"sum": {"a": 1.0, "b": 0.5}, "per_token": {"a": 1.0, "b": 0.0}}


def test_implicit_rewards_by_hand() -> None:
    policy = scores([-2, -5], [-9, -4], [1, 1], [1, 1], ["a", "a"])
    reference = scores([-3, -5], [-6, -6], [1, 1], [1, 1], ["a", "a"])
    rewards = scoring.implicit_rewards(policy, reference, beta=0.5)
    # chosen: 0.5 * (+1, 0) = (0.5, 0); rejected: 0.5 * (-3, +2) = (-1.5, 1); margins (2.0, -1.0)
    assert rewards["mean_chosen"] == pytest.approx(0.25) and rewards["mean_rejected"] == pytest.approx(-0.25)
    assert rewards["mean_margin"] == pytest.approx(0.5)
    assert rewards["accuracy"] == 0.5 and rewards["by_kind"] == {"a": 0.5}


def test_greedy_generate_in_padded_batches_equals_unbatched_generation(tiny_model, tokenizer) -> None:
    prompts = [prompt(tokenizer, q) for q in QUESTIONS]
    batched = scoring.greedy_generate(tiny_model, tokenizer, prompts, max_new_tokens=12, batch_size=3)
    for p, gen in zip(prompts, batched):
        ids = tokenizer(p, return_tensors="pt")
        with torch.no_grad():
            out = tiny_model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                      eos_token_id=tokenizer.eos_token_id)
        alone = out[0, ids["input_ids"].shape[1]:].tolist()
        if tokenizer.eos_token_id in alone:
            alone = alone[: alone.index(tokenizer.eos_token_id) + 1]
        assert gen.token_ids == alone and gen.ended == (tokenizer.eos_token_id in alone)
        assert gen.text == tokenizer.decode(alone, skip_special_tokens=True).strip()


def test_greedy_generation_ignores_a_repetition_penalty_in_the_generation_config(tiny_model, tokenizer) -> None:
    prompts = [prompt(tokenizer, q) for q in QUESTIONS]
    plain = scoring.greedy_generate(tiny_model, tokenizer, prompts, max_new_tokens=16)
    saved = tiny_model.generation_config.repetition_penalty
    tiny_model.generation_config.repetition_penalty = 3.0  # what a hub generation_config can carry (Qwen2.5: 1.05)
    try:
        penalised = scoring.greedy_generate(tiny_model, tokenizer, prompts, max_new_tokens=16)
    finally:
        tiny_model.generation_config.repetition_penalty = saved
    assert [g.token_ids for g in penalised] == [g.token_ids for g in plain]


def test_sampling_is_seeded_and_leaves_the_global_random_state_alone(tiny_model, tokenizer) -> None:
    prompts = [prompt(tokenizer, q) for q in QUESTIONS[:2]]
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = scoring.generate(tiny_model, tokenizer, prompts, samples=3, temperature=1.0, seed=5, max_new_tokens=8)
    assert torch.rand(1).equal(expected_next)  # the global generator was not advanced
    again = scoring.generate(tiny_model, tokenizer, prompts, samples=3, temperature=1.0, seed=5, max_new_tokens=8)
    assert [len(answers) for answers in first] == [3, 3]
    assert [[g.token_ids for g in a] for a in first] == [[g.token_ids for g in a] for a in again]


@pytest.mark.parametrize(("ids", "loops"), [([1, 2, 3] * 3, True), ([1, 2, 3, 1, 2, 3, 1, 2, 4], False),
                                            ([5] * 9, True), ([5] * 8, False), ([7, *[1, 2, 3] * 3, 8], True),
                                            ([], False)])
def test_repetition_loop(ids, loops) -> None:
    assert scoring.has_repetition_loop(ids) is loops


def test_well_formed_needs_an_end_some_text_and_no_loop() -> None:
    assert scoring.is_well_formed(Generation("p", "Fine.", [10, 11, 2], True))
    assert not scoring.is_well_formed(Generation("p", "Fine and", [10, 11], False))  # ran out of budget
    assert not scoring.is_well_formed(Generation("p", "", [2], True))  # said nothing
    assert not scoring.is_well_formed(Generation("p", "la la la", [4, 5, 6] * 3 + [2], True))  # a loop


def test_overlap_f1_by_hand() -> None:
    # answer words: the cat sat (3); reference: the cat ran away (4); common: the, cat -> P 2/3, R 2/4, F1 4/7
    assert scoring.overlap_f1("The cat sat.", "the cat ran away") == pytest.approx(4 / 7)
    assert scoring.overlap_f1("the the the", "the") == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))  # clipped counts
    assert scoring.overlap_f1("", "anything") == 0.0 and scoring.overlap_f1("a b", "c d") == 0.0


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
    assert scoring.follows_rule(kind, chosen, rejected, chosen), f"{kind}: the chosen answer itself must pass"
    assert not scoring.follows_rule(kind, chosen, rejected, rejected), f"{kind}: the rejected answer must fail"
    assert not scoring.follows_rule(kind, chosen, rejected, "   "), "an empty answer never follows a rule"


def test_rules_on_new_answers() -> None:
    chosen, rejected = OTHER_PAIRS["correct_vs_wrong"]
    assert scoring.follows_rule("correct_vs_wrong", chosen, rejected, "Yes: the train leaves at nine, on time.")
    chosen, rejected = OTHER_PAIRS["follows_system"]
    assert scoring.follows_rule("follows_system", chosen, rejected, "Certainly! Rivers are long.")
    assert not scoring.follows_rule("follows_system", chosen, rejected, "Rivers are long, certainly.")
    chosen, rejected = OTHER_PAIRS["Intel/orca_dpo_pairs"]  # a hub row's kind is the data set's id
    assert scoring.follows_rule("Intel/orca_dpo_pairs", chosen, rejected, "Plants use light to make sugar and oxygen.")


def test_generation_health_by_hand() -> None:
    rows = [{"kind": k, "chosen": c, "rejected": r} for k, (c, r) in sorted(OTHER_PAIRS.items())]
    gens = [Generation("p", row["chosen"], [10, 2], True) for row in rows]
    gens[0] = Generation("p", rows[0]["rejected"], [10, 11], False)  # not ended, and the rejected answer
    health = scoring.generation_health(gens, rows)
    n = len(rows)
    assert health["well_formed"] == pytest.approx((n - 1) / n) and health["follows_rule"] == pytest.approx((n - 1) / n)
    assert health["follows_rule_by_kind"][rows[0]["kind"]] == 0.0
    with pytest.raises(ValueError, match="generations but"):
        scoring.generation_health(gens[:-1], rows)


def test_by_length_batches_keep_every_index_once_and_respect_the_token_cap() -> None:
    lengths = [5, 50, 7, 48, 6, 49, 3]
    batches = scoring.by_length(lengths, batch_size=3, max_tokens=100)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    assert all(len(b) <= 3 and len(b) * max(lengths[i] for i in b) <= 100 for b in batches if len(b) > 1)
