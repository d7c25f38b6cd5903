"""helpers.on_policy_dpo (notebook 10): settings, sampling, the two judges, pairs, configs, and real short runs."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import on_policy_dpo as P
from helpers.evaluation import Generation

EOS = "<|im_end|>"


def gen(text: str, *, ended: bool = True, ids: list[int] | None = None, prompt: str = "p") -> Generation:
    """A hand-made answer: token ids only matter for the repetition check of ``is_well_formed``."""
    return Generation(prompt, text, ids if ids is not None else list(range(len(text.split()) + 1)), ended)


# --- settings ---------------------------------------------------------------------------------------------------


def test_every_profile_has_settings_and_the_table_shows_them():
    from helpers.profiles import PROFILE_NAMES

    assert set(P.ON_POLICY_SETTINGS) == set(PROFILE_NAMES) == set(P.ON_POLICY_COSTS)
    table = P.settings_table()
    assert list(table.columns) == list(P.ON_POLICY_SETTINGS)
    assert table.loc["samples_per_prompt", "tiny"] == 4 and table.loc["rounds", "tiny"] == 2
    for name in ("t4", "full"):
        assert "estimated" in P.ON_POLICY_COSTS[name], "GPU costs were never measured: they must say so"
    assert "measured" in P.ON_POLICY_COSTS["tiny"]
    # the GPU profiles sample and train more than the tiny one, never less
    for field in ("prompts_per_round", "max_new_tokens", "round_steps", "reward_steps", "online_steps"):
        assert table.loc[field, "tiny"] <= table.loc[field, "t4"] <= table.loc[field, "full"], field


def test_overrides_none_keeps_the_default_and_bad_values_are_refused(monkeypatch):
    monkeypatch.delenv("COURSE_STANDINS", raising=False)
    tiny = P.on_policy_settings("tiny", rounds=None, temperature=None)
    assert tiny == P.ON_POLICY_SETTINGS["tiny"]
    assert P.on_policy_settings("tiny", rounds=3).rounds == 3
    with pytest.raises(ValueError, match="unknown on-policy setting"):
        P.on_policy_settings("tiny", steps=3)
    with pytest.raises(ValueError, match="no on-policy settings"):
        P.on_policy_settings("huge")
    with pytest.raises(ValueError, match="at least 2"):
        P.on_policy_settings("tiny", samples_per_prompt=1)
    with pytest.raises(ValueError, match="positive"):
        P.on_policy_settings("tiny", temperature=0.0)
    assert P.on_policy_settings("t4") == P.ON_POLICY_SETTINGS["t4"]


def test_standins_run_a_gpu_profile_at_code_path_sizes(monkeypatch):
    monkeypatch.setenv("COURSE_STANDINS", "1")
    t4 = P.on_policy_settings("t4")
    for field, value in P.STANDIN_SIZES.items():
        assert getattr(t4, field) == value
    assert t4.temperature == P.ON_POLICY_SETTINGS["t4"].temperature
    assert P.on_policy_settings("tiny") == P.ON_POLICY_SETTINGS["tiny"], "the tiny profile is not a stand-in"


def test_loss_overrides():
    assert P.loss_overrides(None) == {}
    assert P.loss_overrides(("sigmoid",)) == {"loss_type": ["sigmoid"], "loss_weights": None}
    with pytest.raises(TypeError, match="list"):
        P.loss_overrides("sigmoid")


# --- prompts ----------------------------------------------------------------------------------------------------


def test_prompt_rows_take_fresh_seeded_blocks_and_strip_the_end_of_turn():
    import datasets

    formatted = datasets.Dataset.from_dict({
        "prompt": [f"q{i}" for i in range(10)], "chosen": [f"c{i}{EOS}" for i in range(10)],
        "rejected": [f"r{i}{EOS}" for i in range(10)], "kind": ["k"] * 10})
    first = P.prompt_rows(formatted, EOS, count=4, block=0)
    second = P.prompt_rows(formatted, EOS, count=4, block=1)
    assert first == P.prompt_rows(formatted, EOS, count=4, block=0), "blocks are seeded"
    assert not {r["prompt"] for r in first} & {r["prompt"] for r in second}, "each round answers new prompts"
    row = first[0]
    assert row["chosen"] == "c" + row["prompt"][1:] and not row["chosen"].endswith(EOS)
    assert len(P.prompt_rows(formatted, EOS, count=4, block=2)) == 4, "a block past the end wraps around"
    with pytest.raises(ValueError):
        P.prompt_rows(formatted, EOS, count=0, block=0)


def test_user_turn():
    prompt = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n"
    assert P.user_turn(prompt) == "Why?"
    assert P.user_turn("plain text") == "plain text"


# --- the judges -------------------------------------------------------------------------------------------------


def test_rule_scores_add_well_formed_and_follows_rule():
    row = {"kind": "correct_vs_wrong", "chosen": "66 is larger than 8.", "rejected": "8 is larger than 66."}
    answers = [gen("66 is larger than 8."),  # well-formed and right: 2
               gen("8 is larger than 66."),  # well-formed, wrong: 1
               gen("66 is larger than 8.", ended=False),  # right but cut: 1
               gen("a a a a a a a a a a", ids=[5, 6, 7] * 4)]  # loops and wrong: 0
    assert P.rule_scores([answers], [row]) == [[2.0, 1.0, 1.0, 0.0]]
    with pytest.raises(ValueError):
        P.rule_scores([answers], [])


def test_reward_accuracy_against_a_hand_computed_case():
    # pairs: 1 > 0 win, 2 = 2 tie (a miss), 3 > 1 win, 0 < 5 loss  ->  2 of 4
    assert P.reward_accuracy([1.0, 2.0, 3.0, 0.0], [0.0, 2.0, 1.0, 5.0]) == 0.5
    assert P.reward_accuracy(torch.tensor([1.0]), torch.tensor([0.5])) == 1.0
    with pytest.raises(ValueError):
        P.reward_accuracy([1.0], [1.0, 2.0])


class LengthRewardModel(torch.nn.Module):
    """A stand-in reward model whose score is the number of tokens of the text (no padding counted)."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask, **kwargs):
        from types import SimpleNamespace

        return SimpleNamespace(logits=attention_mask.sum(-1, keepdim=True).float() + self.dummy)


def test_heldout_reward_accuracy_of_a_length_judge(tokenizer):
    import datasets

    prompt = "<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n"
    formatted = datasets.Dataset.from_dict({
        "prompt": [prompt] * 3,
        "chosen": [f"a long and careful answer{EOS}", f"short{EOS}", f"another long and careful answer{EOS}"],
        "rejected": [f"short{EOS}", f"a long and careful answer{EOS}", f"no{EOS}"],
        "kind": ["x", "y", "x"]})
    found = P.heldout_reward_accuracy(LengthRewardModel(), tokenizer, formatted)
    # by hand: the longer answer wins in pairs 1 and 3, loses in pair 2
    assert found["accuracy"] == pytest.approx(2 / 3)
    assert found["by_kind"] == {"x": 1.0, "y": 0.0}
    assert found["n"] == 3 and found["mean_margin"] != 0


def test_require_usable_judge_refuses_a_poor_one():
    P.require_usable_judge(0.8, 0.75)
    for poor in (0.6, float("nan")):
        with pytest.raises(P.JudgeRefused, match="below the 75%"):
            P.require_usable_judge(poor, 0.75)


def test_judge_agreement_on_hand_made_scores():
    primary = [[3.0, 1.0, 2.0], [1.0, 1.0, 1.0], [0.0, 5.0, 1.0], [2.0, 0.0, 0.0]]
    other = [[2.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 1.0, 1.0], [0.0, 1.0, 1.0]]
    found = P.judge_agreement(primary, other, ["a", "a", "b", "b"])
    # prompt 1: best 0, worst 1 -> other 2 > 1 agree; prompt 2 ties (skipped); prompt 3: best 1, worst 0 -> 1 = 1 tie;
    # prompt 4: best 0, worst 2 (the last of the lowest) -> 0 < 1 disagree
    assert found["a"] == {"agree": 1.0, "tie": 0.0, "disagree": 0.0, "pairs": 1}
    assert found["b"] == {"agree": 0.0, "tie": 0.5, "disagree": 0.5, "pairs": 2}
    assert found["all"]["pairs"] == 3 and list(found)[-1] == "all"


def test_trl_reward_function_scores_what_trl_passes(tokenizer):
    ended = tokenizer(f"66 is larger than 8.{EOS}", add_special_tokens=False)["input_ids"]
    cut = tokenizer("66 is larger than 8.", add_special_tokens=False)["input_ids"]
    reward = P.trl_reward_function("rules", tokenizer)
    assert reward.__name__ == "rules_judge"
    scores = reward(prompts=["p", "p"], completions=["66 is larger than 8.", "66 is larger than 8."],
                    completion_ids=[ended + [tokenizer.pad_token_id] * 2, cut],
                    kind=["correct_vs_wrong"] * 2, chosen=["66 is larger than 8."] * 2,
                    rejected=["8 is larger than 66."] * 2, trainer_state=None)
    assert scores == [2.0, 1.0], "the same answer scores one point less when it never ended"
    with pytest.raises(ValueError):
        P.trl_reward_function("gpt4", tokenizer)


# --- pairs ------------------------------------------------------------------------------------------------------


def test_pairs_from_hand_made_scores():
    rows = [{"kind": "a"}, {"kind": "b"}, {"kind": "c"}, {"kind": "d"}]
    samples = [[gen("x"), gen("y"), gen("z")], [gen("u"), gen("v"), gen("w")], [gen("s"), gen("s"), gen("t")],
               [gen("m"), gen("n"), gen("o")]]
    scores = [[0.5, 2.0, 2.0],  # best: the first of the highest (y), worst x
              [1.0, 1.0, 1.0],  # all tie: dropped
              [1.0, 0.0, 2.0],  # best t, worst the second s ...
              [3.0, 1.0, 1.0]]  # best m, worst the last of the lowest (o)
    pairs, stats = P.build_pairs(samples, scores, rows, EOS)
    assert (stats.prompts, stats.ties, stats.pairs) == (4, 1, 3)
    assert [(p["chosen"], p["rejected"], p["kind"]) for p in pairs] == [
        (f"y{EOS}", f"x{EOS}", "a"), (f"t{EOS}", f"s{EOS}", "c"), (f"m{EOS}", f"o{EOS}", "d")]
    assert all(p["chosen_score"] > p["rejected_score"] for p in pairs)
    assert str(stats) == "4 prompts: 3 pairs, 1 dropped (their samples tie)"
    dataset = P.pairs_dataset(pairs)
    assert dataset.column_names == ["prompt", "chosen", "rejected", "kind"] and len(dataset) == 3


def test_identical_best_and_worst_texts_count_as_a_tie():
    same = [[gen("same", ended=True), gen("same", ended=False)]]
    pairs, stats = P.build_pairs(same, [[2.0, 1.0]], [{"kind": "k"}], EOS)
    assert pairs == [] and stats.ties == 1
    with pytest.raises(ValueError, match="no pairs"):
        P.pairs_dataset(pairs)
    with pytest.raises(ValueError):
        P.best_and_worst([1.0])


def test_pairs_and_comparison_round_trip(tmp_path):
    pairs = [{"prompt": "p", "chosen": f"a{EOS}", "rejected": f"b{EOS}", "kind": "k", "chosen_score": 1.0,
              "rejected_score": 0.0}]
    assert P.load_pairs(P.save_pairs(pairs, tmp_path / "pairs.json")) == pairs
    rows = {"SFT model": {"accuracy": 0.6, "margin": 0.0, "well_formed": 1.0, "follows_rule": 0.5}}
    histories = {"SFT model": [{"step": 1.0, "logps/chosen": -3.0}]}
    assert P.load_comparison(P.save_comparison(rows, histories, tmp_path / "c.json")) == (rows, histories)


# --- the table and the figure -------------------------------------------------------------------------------------


def test_logs_table_and_figure(tmp_path):
    log = [{"step": s, "logps/chosen": v, "loss": 1.0} for s, v in zip((2, 4, 6, 8), (-6.0, -5.0, -4.0, -2.0))]
    assert P.curve(log) == ([2.0, 4.0, 6.0, 8.0], [-6.0, -5.0, -4.0, -2.0])
    assert P.logps_trend(log) == 4.0  # (last quarter: -2) - (first quarter: -6)
    assert math.isnan(P.logps_trend([{"step": 1, "loss": 1.0}]))
    assert [r["step"] for r in P.shift_steps(log, 16)] == [18, 20, 22, 24]
    row = {"accuracy": 0.7, "margin": 0.1, "chosen_logp_change": 0.2, "well_formed": 1.0, "follows_rule": 0.6,
           "mean_words": 9.0, "logps_trend": 4.0, "steps": 16}
    table = P.comparison_table({"SFT model": {**row, "steps": float("nan")}, "on-policy round 1": row})
    assert list(table.columns) == list(P.TABLE_COLUMNS.values())
    assert table.loc["on-policy round 1", "steps"] == 16 and math.isnan(table.loc["SFT model", "steps"])
    path = tmp_path / "plots" / "cmp.png"
    fig = P.plot_comparison({"SFT model": row, "on-policy round 1": row}, {"on-policy round 1": log}, path)
    assert path.stat().st_size > 1000 and len(fig.axes) == 2
    assert P.summary_line("x", row).startswith("x: held-out accuracy 0.700")


# --- configs ----------------------------------------------------------------------------------------------------


def test_reward_round_and_online_configs(profile, tmp_path):
    from trl import DPOConfig, RewardConfig
    from trl.experimental.online_dpo import OnlineDPOConfig

    from helpers.profiles import PROFILES

    settings = P.on_policy_settings(profile)
    reward = RewardConfig(**P.reward_config_kwargs(profile, settings, tmp_path))
    assert (reward.max_steps, reward.learning_rate) == (settings.reward_steps, settings.reward_learning_rate)
    assert not reward.bf16 and not reward.fp16 and reward.gradient_checkpointing is False, \
        "RewardConfig's own defaults (bf16, checkpointing on) must not leak in on the tiny profile"
    assert reward.max_length == profile.dpo.max_length and reward.save_strategy == "no"

    round_config = DPOConfig(**P.round_config_kwargs(profile, settings, tmp_path, **P.loss_overrides(["sigmoid"])))
    assert round_config.max_steps == settings.round_steps and round_config.loss_type == ["sigmoid"]
    assert round_config.beta == profile.dpo.beta and round_config.learning_rate == profile.training.learning_rate
    assert DPOConfig(**P.round_config_kwargs(profile, settings, tmp_path)).loss_type == list(profile.dpo.loss_type)

    kwargs = P.online_config_kwargs(profile, settings, tmp_path)
    online = OnlineDPOConfig(**kwargs)
    assert online.max_steps == settings.online_steps and online.loss_type == "sigmoid"
    assert online.temperature == settings.temperature and online.max_new_tokens == settings.max_new_tokens
    assert online.beta == profile.dpo.beta and online.remove_unused_columns is False
    for name, defaults in P.ON_POLICY_SETTINGS.items():  # an answer fits after the longest prompt, uncut
        dpo = PROFILES[name].dpo
        assert dpo.max_prompt_length + defaults.max_new_tokens <= dpo.max_length, name
    t = profile.training
    assert P.prompts_per_step(kwargs) == t.per_device_train_batch_size * t.gradient_accumulation_steps
    assert online.gradient_accumulation_steps == 1, "on a CPU one micro-batch a step (one generate call)"


# --- real short runs on the tiny model ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sft_model(profile, tiny_model_path):
    from helpers.loading import load_model

    return load_model(profile, source=str(tiny_model_path))


@pytest.fixture(scope="module")
def formatted(profile, tokenizer):
    from helpers.data import prepare_data

    return prepare_data(profile, tokenizer)


def test_sampling_is_deterministic_with_a_seed(sft_model, tokenizer, formatted):
    prompts = list(formatted.train["prompt"][:3])
    draw = dict(n=3, temperature=1.0, max_new_tokens=12)
    torch.manual_seed(0)
    expected_next = torch.rand(1)
    torch.manual_seed(0)
    first = P.sample_answers(sft_model, tokenizer, prompts, seed=5, **draw)
    assert torch.equal(torch.rand(1), expected_next), "sampling must leave the global random state as it was"
    again = P.sample_answers(sft_model, tokenizer, prompts, seed=5, **draw)
    other = P.sample_answers(sft_model, tokenizer, prompts, seed=6, **draw)

    def texts(found):
        return [[g.text for g in answers] for answers in found]

    assert len(first) == 3 and all(len(answers) == 3 for answers in first)
    assert all(g.prompt == p for p, answers in zip(prompts, first) for g in answers)
    assert texts(first) == texts(again)
    assert [[g.token_ids for g in a] for a in first] == [[g.token_ids for g in a] for a in again]
    assert texts(first) != texts(other)
    assert tokenizer.padding_side == "right", "the tokenizer's padding side is restored"


def test_reward_model_trains_a_step_and_scores_without_padding_effects(profile, tokenizer, formatted, tiny_model_path,
                                                                     tmp_path):
    from trl import RewardConfig, RewardTrainer

    from helpers.training import pairs_only, prepare_trainer

    settings = P.on_policy_settings(profile, reward_steps=1, warmup_steps=0)
    model = P.load_reward_model(profile, tokenizer, source=str(tiny_model_path))
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id
    trainer = RewardTrainer(model=model, args=RewardConfig(**P.reward_config_kwargs(profile, settings, tmp_path)),
                            train_dataset=pairs_only(formatted.train.select(range(16))), processing_class=tokenizer,
                            peft_config=P.reward_lora_config(profile))
    prepare_trainer(trainer, profile, progress=False)
    trainer.train()
    assert trainer.state.global_step == 1
    trained = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert any("score" in n for n in trained) and any("lora_A" in n for n in trained)
    texts = [formatted.heldout[i]["prompt"] + formatted.heldout[i]["chosen"] for i in range(4)]
    together = P.reward_scores(trainer.model, tokenizer, texts)  # padded to the longest
    alone = torch.cat([P.reward_scores(trainer.model, tokenizer, [t]) for t in texts])
    assert torch.allclose(together, alone, atol=1e-4), "the score must be read at the last real token, not at padding"
    found = P.heldout_reward_accuracy(trainer.model, tokenizer, formatted.heldout.select(range(8)))
    assert 0.0 <= found["accuracy"] <= 1.0 and found["n"] == 8


def test_iterative_round_uses_the_previous_adapter_as_its_reference(profile, tokenizer, tiny_model_path, tmp_path):
    """The notebook's claim about TRL 1.16: a PeftModel passed with ref_model=None gets a frozen "ref" copy."""
    from trl import DPOConfig, DPOTrainer

    from helpers.loading import load_model
    from helpers.lora import lora_config
    from helpers.training import pairs_only, prepare_trainer, set_seed

    sft_model = load_model(profile, source=str(tiny_model_path))  # its own copy: LoRA is injected into it

    settings = P.on_policy_settings(profile, round_steps=1, warmup_steps=0)
    samples = P.sample_answers(sft_model, tokenizer, ["<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n"] * 4,
                               n=2, temperature=1.0, seed=0, max_new_tokens=8)
    pairs = [{"prompt": a[0].prompt, "chosen": a[0].text + EOS, "rejected": a[1].text + "x" + EOS, "kind": "k"}
             for a in samples]
    dataset = pairs_only(P.pairs_dataset(pairs))
    set_seed(profile.training.seed)
    first = DPOTrainer(model=sft_model, ref_model=None, processing_class=tokenizer, train_dataset=dataset,
                       args=DPOConfig(**P.round_config_kwargs(profile, settings, tmp_path / "r1", logging_steps=1)),
                       peft_config=lora_config(profile))
    prepare_trainer(first, profile, progress=False)
    first.train()
    policy = first.model
    round_one = {n: p.detach().clone() for n, p in policy.named_parameters() if ".default." in n}
    second = DPOTrainer(model=policy, ref_model=None, processing_class=tokenizer, train_dataset=dataset,
                        args=DPOConfig(**P.round_config_kwargs(profile, settings, tmp_path / "r2", logging_steps=1)))
    prepare_trainer(second, profile, progress=False)
    assert "ref" in second.model.peft_config, "TRL should have copied the trained adapter as the reference"
    for name, value in round_one.items():
        assert torch.equal(second.model.get_parameter(name.replace(".default.", ".ref.")), value)
    assert not any(p.requires_grad for n, p in second.model.named_parameters() if ".ref." in n), "ref is frozen"
    second.train()
    for name, value in round_one.items():
        assert torch.equal(second.model.get_parameter(name.replace(".default.", ".ref.")), value), "ref stayed put"
    assert not all(torch.equal(second.model.get_parameter(n), v) for n, v in round_one.items()), "round 2 trained"
    second.model.delete_adapter("ref")
    assert list(second.model.peft_config) == ["default"]


def test_trl_online_dpo_runs_a_step_on_cpu_with_the_course_judge(profile, tokenizer, formatted, tiny_model_path,
                                                                 tmp_path):
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    from helpers.loading import load_model
    from helpers.lora import lora_config
    from helpers.training import prepare_trainer

    settings = P.on_policy_settings(profile, online_steps=1, max_new_tokens=8)
    kwargs = P.online_config_kwargs(profile, settings, tmp_path, per_device_train_batch_size=2)
    rows = P.prompt_rows(formatted.train, tokenizer.eos_token, count=P.prompts_per_step(kwargs), block=0)
    trainer = OnlineDPOTrainer(model=load_model(profile, source=str(tiny_model_path)),
                               reward_funcs=P.trl_reward_function("rules", tokenizer), args=OnlineDPOConfig(**kwargs),
                               train_dataset=P.online_dataset(rows), processing_class=tokenizer,
                               peft_config=lora_config(profile))
    prepare_trainer(trainer, profile, progress=False)
    trainer.train()
    assert trainer.state.global_step == 1
    logged = trainer.state.log_history[0]
    assert math.isfinite(logged["loss"]) and "logps/chosen" in logged and "objective/scores" in logged
