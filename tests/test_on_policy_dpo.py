"""helpers.on_policy_dpo (notebook 10): the plan's checks, the rule judge, the reward model's scores, pairs from
scores, and the judge as TRL's online reward function - against hand-made cases and TRL's own processing."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, set_seed
from trl import DPOConfig, DPOTrainer
from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer
from trl.experimental.utils import truncate_right

from helpers import on_policy_dpo as P
from helpers.profiles import PROFILES, REPO_ROOT
from helpers.scoring import Generation

EOS = "<|im_end|>"
PROMPT = "<|im_start|>user\nWhich is bigger: 8 or 66?<|im_end|>\n<|im_start|>assistant\n"
RIGHT, WRONG = "66 is larger than 8.", "8 is larger than 66."
CORRECT_ROW = {"kind": "correct_vs_wrong", "chosen": RIGHT, "rejected": WRONG}


def gen(text: str, *, ended: bool = True, ids: list[int] | None = None, prompt: str = PROMPT) -> Generation:
    """A hand-made answer; its token ids matter only to the repetition check of ``is_well_formed``."""
    return Generation(prompt, text, ids if ids is not None else list(range(len(text.split()) + 1)), ended)


# --- the plan ---------------------------------------------------------------------------------------------------


def test_every_profiles_plan_passes_the_check():
    for name, profile in PROFILES.items():
        assert P.check_settings(profile.on_policy) == profile.on_policy, name


@pytest.mark.parametrize("change, message", [
    ({"samples_per_prompt": 1}, "at least 2"),
    ({"temperature": 0.0}, "positive"),
    ({"rounds": 0}, "rounds must be"),
    ({"round_steps": 2.5}, "round_steps must be"),
    ({"warmup_steps": 100}, "warmup_steps"),
    ({"min_judge_accuracy": 75}, "share in"),
    ({"round": 3}, "unknown \\['round'\\]"),  # a typo must not be ignored
])
def test_the_check_refuses_a_plan_that_cannot_work(change, message):
    with pytest.raises(ValueError, match=message):
        P.check_settings({**PROFILES["tiny"].on_policy, **change})
    plan = dict(PROFILES["tiny"].on_policy)
    del plan["online_steps"]
    with pytest.raises(ValueError, match="missing \\['online_steps'\\]"):
        P.check_settings(plan)


# --- prompts ----------------------------------------------------------------------------------------------------


def test_prompt_rows_take_disjoint_seeded_slices_and_strip_the_end_of_turn():
    prompts = [f"<|im_start|>user\nq{i}<|im_end|>\n<|im_start|>assistant\n" for i in range(10)]
    formatted = datasets.Dataset.from_dict({"prompt": prompts, "chosen": [f"c{i}{EOS}" for i in range(10)],
                                            "rejected": [f"r{i}{EOS}" for i in range(10)], "kind": ["k"] * 10})
    first = P.prompt_rows(formatted, EOS, start=0, count=4, seed=1)
    second = P.prompt_rows(formatted, EOS, start=4, count=4, seed=1)
    assert first == P.prompt_rows(formatted, EOS, start=0, count=4, seed=1), "the same seed, the same prompts"
    assert not {r["prompt"] for r in first} & {r["prompt"] for r in second}, "each round answers new prompts"
    row = first[0]
    assert row["chosen"] == "c" + row["question"][1:] and row["rejected"] == "r" + row["question"][1:]
    assert row["question"] in row["prompt"] and not row["chosen"].endswith(EOS)
    assert len(P.prompt_rows(formatted, EOS, start=8, count=4, seed=1)) == 4, "past the end it wraps around"
    with pytest.raises(ValueError):
        P.prompt_rows(formatted, EOS, start=0, count=0, seed=1)


# --- the rule judge on hand-made answers ----------------------------------------------------------------------------


def test_rule_judge_adds_a_point_for_well_formed_and_one_for_the_rule():
    answers = [gen(RIGHT),  # well-formed and right: 2
               gen(WRONG),  # well-formed, the wrong fact: 1
               gen(RIGHT, ended=False),  # right but cut off (no <|im_end|>): 1
               gen("a a a a a a a a a a", ids=[5, 6, 7] * 4)]  # loops, and the wrong answer: 0
    assert P.rule_scores([answers], [CORRECT_ROW]) == [[2.0, 1.0, 1.0, 0.0]]
    system = {"kind": "follows_system", "chosen": "Certainly, boil it.", "rejected": "Boil it."}
    concise = {"kind": "concise_vs_rambling", "chosen": "Boil it.",
               "rejected": "Well, let me think about it for a moment first, then: boil it."}
    assert P.rule_scores([[gen("Certainly, steam it."), gen("Sure, steam it.")],
                          [gen("Steam it."), gen("So, first of all, as I said before, you could steam it.")]],
                         [system, concise]) == [[2.0, 1.0], [2.0, 1.0]]
    with pytest.raises(ValueError):
        P.rule_scores([answers], [])


# --- the reward model's scores ------------------------------------------------------------------------------------


class LengthRewardModel(torch.nn.Module):
    """A reward model whose score is the number of real (non-padding) tokens of the text."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask, **kwargs):
        return type("Out", (), {"logits": attention_mask.sum(-1, keepdim=True).float() + self.unused})()


def test_heldout_accuracy_of_a_length_judge_by_hand(tokenizer):
    formatted = datasets.Dataset.from_dict({
        "prompt": [PROMPT] * 3,
        "chosen": [f"a long and careful answer{EOS}", f"short{EOS}", f"another long and careful answer{EOS}"],
        "rejected": [f"short{EOS}", f"a long and careful answer{EOS}", f"short{EOS}"],
        "kind": ["x", "y", "x"]})
    found = P.heldout_reward_accuracy(LengthRewardModel(), tokenizer, formatted)
    # the longer answer wins pairs 1 and 3 (kind x) and loses pair 2 (kind y)
    assert found["accuracy"] == pytest.approx(2 / 3) and found["by_kind"] == {"x": 1.0, "y": 0.0}
    assert found["pairs"] == 3


def test_reward_model_reads_the_end_of_turn_only_when_the_answer_ended(tokenizer):
    scores = P.reward_model_scores(LengthRewardModel(), tokenizer, [[gen(RIGHT), gen(RIGHT, ended=False)]])
    expected = [len(tokenizer(PROMPT + RIGHT + EOS)["input_ids"]), len(tokenizer(PROMPT + RIGHT)["input_ids"])]
    assert scores == [[float(n) for n in expected]] and expected[0] == expected[1] + 1


@pytest.fixture(scope="module")
def reward_model(tiny_model_path, tokenizer):
    """The tiny model with a one-output score head (random, seeded), as notebook 10 builds its judge."""
    set_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_path, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def test_reward_scores_do_not_depend_on_padding(reward_model, tokenizer):
    texts = [PROMPT + RIGHT + EOS, PROMPT + "No." + EOS, PROMPT + WRONG + " " + WRONG + EOS]
    together = P.reward_scores(reward_model, tokenizer, texts)  # padded to the longest
    alone = torch.cat([P.reward_scores(reward_model, tokenizer, [t]) for t in texts])
    assert torch.allclose(together, alone, atol=1e-4), "the score is read at the last real token, not at padding"
    assert tokenizer.padding_side == "right", "the tokenizer's padding side is restored"


# --- pairs from scores ----------------------------------------------------------------------------------------------


def test_pairs_from_hand_made_scores():
    rows = [{"kind": k} for k in "abcde"]
    samples = [[gen("x"), gen("y"), gen("z")], [gen("u"), gen("v"), gen("w")], [gen("s"), gen("s2"), gen("t")],
               [gen("m"), gen("n"), gen("o")], [gen("same"), gen("same", ended=False)]]
    scores = [[0.5, 2.0, 2.0],  # best: the first of the highest (y); worst x
              [1.0, 1.0, 1.0],  # all tie: dropped
              [1.0, 0.0, 2.0],  # best t, worst s2
              [3.0, 1.0, 1.0],  # best m, worst the last of the lowest (o)
              [2.0, 1.0]]  # best and worst are the same text: dropped
    pairs, stats = P.build_pairs(samples, scores, rows, EOS)
    assert stats == {"prompts": 5, "ties": 2, "pairs": 3}
    assert [(p["chosen"], p["rejected"], p["kind"]) for p in pairs] == [
        (f"y{EOS}", f"x{EOS}", "a"), (f"t{EOS}", f"s2{EOS}", "c"), (f"m{EOS}", f"o{EOS}", "d")]
    assert [(p["chosen_score"], p["rejected_score"]) for p in pairs] == [(2.0, 0.5), (2.0, 0.0), (3.0, 1.0)]
    with pytest.raises(ValueError):
        P.build_pairs(samples, scores[:2], rows, EOS)
    with pytest.raises(ValueError):
        P.best_and_worst([1.0])


def test_a_spelt_out_end_of_turn_in_an_answer_is_made_inert():
    """A model can write "<|im_end|>" out of ordinary tokens; in a pair it would end the answer early."""
    pairs, _ = P.build_pairs([[gen(f"Yes.{EOS} More."), gen("No.")]], [[1.0, 0.0]], [{"kind": "k"}], EOS)
    assert pairs[0]["chosen"].endswith(EOS) and pairs[0]["chosen"].count(EOS) == 1
    assert pairs[0]["chosen"].replace("\u2060", "") == f"Yes.{EOS} More.{EOS}", "only the control string changes"


def test_judge_agreement_on_hand_made_scores():
    primary = [[3.0, 1.0, 2.0], [1.0, 1.0, 1.0], [0.0, 5.0, 1.0], [2.0, 0.0, 0.0]]
    other = [[2.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 1.0, 1.0], [0.0, 1.0, 1.0]]
    found = P.judge_agreement(primary, other, ["a", "a", "b", "b"])
    # prompt 1: best 0, worst 1 -> 2 > 1 agree; prompt 2 ties (skipped); prompt 3: best 1, worst 0 -> 1 = 1 tie;
    # prompt 4: best 0, worst 2 (the last of the lowest) -> 0 < 1 disagree
    assert found["a"] == {"agree": 1.0, "tie": 0.0, "disagree": 0.0, "pairs": 1}
    assert found["b"] == {"agree": 0.0, "tie": 0.5, "disagree": 0.5, "pairs": 2}
    assert found["all"]["pairs"] == 3 and list(found)[-1] == "all"


# --- the judge as TRL's online reward function ----------------------------------------------------------------------


def trl_call(tokenizer, answers: list[tuple[str, bool]], rows: list[dict]) -> dict:
    """What OnlineDPOTrainer.training_step passes a reward function for these answers: token ids as generate leaves
    them (junk after the end-of-turn token, right-padded), cut by TRL's own ``truncate_right``, decoded as TRL does."""
    raw = []
    for text, ended in answers:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        raw.append(ids + ([tokenizer.eos_token_id] + tokenizer("junk after", add_special_tokens=False)["input_ids"]
                          if ended else []))
    width = max(len(ids) for ids in raw)
    padded = torch.tensor([ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids in raw])
    completion_ids, _ = truncate_right(padded, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    return {"prompts": [PROMPT] * len(answers),
            "completions": tokenizer.batch_decode(completion_ids, skip_special_tokens=True),
            "completion_ids": completion_ids.tolist(), "trainer_state": None,
            **{key: [row[key] for row in rows] for key in ("kind", "chosen", "rejected")}}


def test_reward_function_gives_the_judges_own_scores(tokenizer, reward_model):
    answers = [(RIGHT, True), (WRONG, True), (RIGHT, False), ("I cannot say.", True)]
    rows = [CORRECT_ROW] * len(answers)
    direct = [gen(text, ended=ended) for text, ended in answers]
    rules = P.as_reward_function(P.rule_scores, tokenizer, name="rules_judge")
    assert rules.__name__ == "rules_judge"
    assert rules(**trl_call(tokenizer, answers, rows)) == [2.0, 1.0, 1.0, 1.0], "by hand: right+ended scores 2"

    def model_judge(samples, rows):
        return P.reward_model_scores(reward_model, tokenizer, samples)

    adapted = P.as_reward_function(model_judge, tokenizer)(**trl_call(tokenizer, answers, rows))
    expected = [s[0] for s in model_judge([[g] for g in direct], rows)]
    assert adapted == pytest.approx(expected, abs=1e-4), "the online run must be scored as the rounds were"


@pytest.fixture()
def policy(tiny_model_path):
    """A fresh copy of the tiny model (LoRA is injected into the model a trainer gets)."""
    return AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)


def test_online_trainer_scores_with_our_function(profile, tokenizer, policy, tmp_path):
    """One OnlineDPOTrainer step on the tiny model: TRL hands our function the data set's columns, and the scores it
    logs are the ones our function returned."""
    returned, columns = [], []

    def recording_judge(samples, rows):
        scores = P.rule_scores(samples, rows)
        returned.extend(s[0] for s in scores)
        columns.append(rows)
        return scores

    rows = [{"prompt": PROMPT, **CORRECT_ROW}] * 2
    config = OnlineDPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, max_new_tokens=8,
                             learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                             bf16=False, gradient_checkpointing=False,  # TRL's own defaults turn both on
                             max_length=profile.dpo["max_length"])
    trainer = OnlineDPOTrainer(model=policy, reward_funcs=P.as_reward_function(recording_judge, tokenizer),
                               args=config, train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer,
                               peft_config=LoraConfig(**profile.lora))
    trainer.train()
    assert len(returned) == 4, "two answers for each of the two prompts"
    assert all(row == CORRECT_ROW for row in columns[0]), "TRL passes kind, chosen and rejected to the judge"
    logged = trainer.state.log_history[0]
    assert logged["objective/scores"] == pytest.approx(sum(returned) / len(returned), abs=1e-6)


def test_a_later_round_is_held_to_the_previous_rounds_adapter(profile, tokenizer, policy, tmp_path):
    """Notebook 10's claim about TRL 1.16: a model that already has an adapter, with ref_model=None, gets a frozen
    copy of it named "ref" as the reference, and the copy does not move while the round trains."""
    pairs = datasets.Dataset.from_list([{"prompt": PROMPT, "chosen": RIGHT + EOS, "rejected": WRONG + EOS}] * 4)
    config = {**profile.dpo, "max_steps": 1, "warmup_steps": 0, "save_strategy": "no", "logging_steps": 1}
    first = DPOTrainer(model=policy, ref_model=None, args=DPOConfig(output_dir=str(tmp_path / "1"), **config),
                       train_dataset=pairs, processing_class=tokenizer, peft_config=LoraConfig(**profile.lora))
    first.train()
    round_one = {n: p.detach().clone() for n, p in first.model.named_parameters() if ".default." in n}
    second = DPOTrainer(model=first.model, ref_model=None, args=DPOConfig(output_dir=str(tmp_path / "2"), **config),
                        train_dataset=pairs, processing_class=tokenizer)
    assert "ref" in second.model.peft_config, "TRL should have copied the trained adapter as the reference"
    second.train()
    for name, value in round_one.items():
        assert torch.equal(second.model.get_parameter(name.replace(".default.", ".ref.")), value), "ref moved"
    assert not all(torch.equal(second.model.get_parameter(n), v) for n, v in round_one.items()), "round 2 trained"


def test_notebook_10s_self_checks_hold_on_every_committed_seed() -> None:
    """10's comparison self-check read back from the committed benchmark (seeds_10.json), seed by seed."""
    seeds = json.loads((REPO_ROOT / "benchmarks" / "results" / "seeds_10.json").read_text())
    assert seeds["notebook"] == "10_on_policy_dpo" and len(seeds["seeds"]) >= 5
    rows = seeds["rows"]
    rounds = [rows[name] for name in sorted(rows) if name.startswith("on-policy round ")]
    assert len(rounds) == PROFILES["tiny"].on_policy["rounds"]
    off, sft = rows["off-policy (04)"], rows["SFT model"]
    for i, seed in enumerate(seeds["seeds"]):
        best_round = max(r["accuracy"][i] for r in rounds)
        assert off["accuracy"][i] > best_round + 0.08, seed
        assert best_round - sft["accuracy"][i] < (off["accuracy"][i] - sft["accuracy"][i]) / 2, seed
        assert all(later["margin"][i] > earlier["margin"][i] for earlier, later in zip(rounds, rounds[1:])), seed
        assert abs(rows["online"]["margin"][i]) < rounds[0]["margin"][i], seed
