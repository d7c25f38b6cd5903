"""helpers.beyond_dpo (notebook 08): the loss variants, their configs, a real step of each, evaluation and plots."""

from __future__ import annotations

import dataclasses
import math

import pytest

from helpers import beyond_dpo as V

PAIRS = 8  # training pairs of the smoke runs (one optimizer step takes 16: the loader cycles)
HELDOUT = 4


def test_every_dpo_variant_is_a_loss_trl_knows(profile):
    from helpers.training import dpo_config

    known = {"sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
             "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"}
    for name, variant in V.VARIANTS.items():
        if variant.reference_free:
            assert variant.loss_type == ()
            continue
        assert set(variant.loss_type) <= known, name
        config = dpo_config(V.variant_profile(profile, variant), "unused", **variant.overrides)
        assert config.loss_type == list(variant.loss_type)
        assert config.loss_weights is None, "weights of the profile's (sigmoid, sft) must not leak into a variant"
        assert config.beta == profile.dpo.beta
    assert set(V.DEFAULT_VARIANTS) == set(V.VARIANTS)
    assert {"sigmoid", "ipo", "hinge", "robust", "sigmoid_norm", V.ORPO} <= set(V.VARIANTS)


def test_robust_needs_label_smoothing_in_range(profile):
    from helpers.training import dpo_config

    smoothing = V.VARIANTS["robust"].overrides["label_smoothing"]
    assert 0.0 < smoothing < 0.5, "robust with label_smoothing=0 is plain sigmoid; TRL wants it below 0.5"
    assert dpo_config(V.variant_profile(profile, "robust"), "unused", label_smoothing=smoothing).label_smoothing == 0.1


def test_variant_profile_changes_only_the_loss(profile):
    changed = V.variant_profile(profile, "ipo", beta=0.5)
    assert changed.dpo.loss_type == ("ipo",) and changed.dpo.loss_weights is None and changed.dpo.beta == 0.5
    for section in ("model", "data", "quantization", "lora", "training"):
        assert getattr(changed, section) == getattr(profile, section)
    assert changed.dpo.precompute_ref_log_probs, "every DPO-family run reads precomputed reference log-probs"
    assert dataclasses.replace(changed.dpo, loss_type=profile.dpo.loss_type, loss_weights=profile.dpo.loss_weights,
                               beta=profile.dpo.beta, precompute_ref_log_probs=profile.dpo.precompute_ref_log_probs
                               ) == profile.dpo
    assert V.variant_profile(profile, "orpo").dpo.loss_type == profile.dpo.loss_type  # ORPO ignores it


def test_variant_run_ids_are_valid_folder_names():
    from helpers.paths import run_dir

    assert V.variant_run_id("main", "sigmoid+sft") == "main-08-sigmoid-sft"
    assert V.variant_run_id("main", "sigmoid-beta0.01") == "main-08-sigmoid-beta0.01"
    assert V.variant_run_id("main", "sigmoid β=0.5") == "main-08-sigmoid---0.5"
    for name in V.VARIANTS:
        run_dir("tiny", V.variant_run_id("main", name))  # raises on a bad run id
    # notebook 06 trains plain sigmoid DPO of other settings into <run_id>-sigmoid: the comparison never writes there
    assert V.variant_run_id("main", "sigmoid") != "main-sigmoid"


def test_every_profile_has_a_plan_that_fits_its_slot():
    from helpers.profiles import PROFILES

    assert set(V.PLANS) == set(PROFILES)
    tiny, t4 = V.PLANS["tiny"], V.PLANS["t4"]
    assert set(tiny.variants) == set(V.VARIANTS), "on CPU the notebook compares every loss"
    assert tiny.sweep_betas == (0.01, 0.5) and "measured" in tiny.cost
    for name, plan in V.PLANS.items():
        assert set(plan.variants) <= set(V.VARIANTS) and "sigmoid" in plan.variants, name
        assert plan.answers >= 32 and plan.reference_batch_size >= 1, name
    # a T4 gets fewer runs: three losses (one reference-free) and one extra β, with the same short runs
    runs = lambda plan: len(plan.variants) + len(plan.sweep_betas)  # noqa: E731
    assert runs(t4) < runs(tiny) and V.ORPO in t4.variants and t4.steps <= tiny.steps
    for name in ("t4", "full"):
        assert "estimated" in V.PLANS[name].cost, "GPU times cannot be measured here: they must say so"


def test_plan_for_uses_the_profile_default_unless_told(profile):
    from helpers.profiles import get_profile

    assert V.plan_for(profile) == V.PLANS["tiny"]
    assert V.plan_for(get_profile("t4", check_hardware=False)) == V.PLANS["t4"]
    plan = V.plan_for(profile, steps=5, variants=["sigmoid", "orpo"], sweep_betas=[0.5])
    assert (plan.steps, plan.variants, plan.sweep_betas) == (5, ("sigmoid", "orpo"), (0.5,))
    assert plan.answers == V.PLANS["tiny"].answers, "a knob left at None keeps the profile's value"
    with pytest.raises(ValueError, match="unknown variants"):
        V.plan_for(profile, variants=["dpo"])
    with pytest.raises(ValueError, match="β sweep"):
        V.plan_for(profile, variants=["ipo"])
    assert V.plan_for(profile, variants=["ipo"], sweep_betas=()).sweep_betas == ()


def test_the_short_runs_profile(profile):
    plan = V.PLANS["tiny"]
    short = plan.run_profile(profile)
    t = short.training
    assert t.max_steps == plan.steps and t.gradient_accumulation_steps == 1
    assert t.lr_scheduler_type == "constant_with_warmup" and t.learning_rate == profile.training.learning_rate
    assert plan.pairs_per_run(profile) == plan.steps * t.per_device_train_batch_size
    assert short.dpo == profile.dpo and short.lora == profile.lora and short.model == profile.model


def test_orpo_config_keeps_the_profile_and_drops_dpo_fields(profile, tmp_path):
    config = V.orpo_config(profile, tmp_path, max_steps=3)
    t = profile.training
    assert (config.learning_rate, config.per_device_train_batch_size, config.gradient_accumulation_steps) == (
        t.learning_rate, t.per_device_train_batch_size, t.gradient_accumulation_steps)
    assert config.max_steps == 3 and config.beta == profile.dpo.beta and config.max_length == profile.dpo.max_length
    assert not config.bf16 and not config.fp16, "fp32 on CPU, as the DPO runs"
    assert not hasattr(config, "loss_type")
    assert config.remove_unused_columns is False


def test_results_table_and_curves(tmp_path):
    rows = {
        "base": {"accuracy_per_token": 0.6, "margin": 0.0, "chosen_logp_change": 0.0, "well_formed": 1.0,
                 "follows_rule": 0.5},
        "ipo": {"accuracy_per_token": 0.81234, "margin": 1.5, "chosen_logp_change": -3.0, "well_formed": 0.9,
                "follows_rule": 0.25, "seconds_per_step": 0.4},
    }
    table = V.results_table(rows)
    assert list(table.index) == ["base", "ipo"]
    assert list(table.columns) == list(V.TABLE_COLUMNS.values())
    assert table.loc["ipo", "held-out acc. (per token)"] == 0.812
    assert V.results_table({"x": {"accuracy_per_token": 138 / 160}}).iloc[0, 0] == float(f"{138 / 160:.3f}") == 0.863
    assert math.isnan(table.loc["base", "s / step"])

    history = [{"step": 5, "loss": 25.0, "rewards/margins": 0.1, "logps/chosen": -10.0},
               {"step": 10, "loss": 5.0, "rewards/margins": 1.0, "logps/chosen": -9.0},
               {"step": 10, "train_loss": 1.0}]
    assert V.curve(history, "loss", relative=True) == ([5, 10], [1.0, 0.2])
    assert V.curve(history, "rewards/margins") == ([5, 10], [0.1, 1.0])
    path = tmp_path / "plots" / "curves.png"
    fig = V.plot_variant_curves({"ipo": history, "orpo": history}, path)
    assert path.stat().st_size > 1000 and len(fig.axes) == len(V.CURVE_PANELS)

    saved = V.save_results(rows, {"ipo": history}, tmp_path / "results.json")
    assert V.load_results(saved) == (rows, {"ipo": history})


@pytest.fixture(scope="module")
def small_data(profile, tiny_model_path):
    from helpers.data import PreparedData, prepare_data
    from helpers.loading import load_tokenizer

    tokenizer = load_tokenizer(profile, str(tiny_model_path))
    data = prepare_data(profile, tokenizer)
    small = PreparedData(data.train.select(range(PAIRS)), data.heldout.select(range(HELDOUT)),
                         data.heldout_rows[:HELDOUT], data.length_report)
    return tokenizer, small


@pytest.fixture(scope="module")
def base_scores(profile, small_data, tiny_model_path):
    from helpers.evaluation import score_pairs
    from helpers.loading import load_model

    tokenizer, data = small_data
    base = load_model(profile, source=str(tiny_model_path))
    return base, score_pairs(base, tokenizer, data.heldout)


def test_a_variants_row_against_the_textbook_log_likelihoods(profile, small_data, base_scores, other_model_path,
                                                             naive_answer_logprob):
    """evaluate_variant on another model (the tiny one with a random LoRA update merged in), with the base as the
    reference: its margin, chosen-likelihood change and accuracy equal what one-sequence-at-a-time log-softmax
    log-likelihoods (an independent implementation) give on the same pairs."""
    from helpers.loading import load_model

    tokenizer, data = small_data
    base, scores = base_scores
    other = load_model(profile, source=str(other_model_path))
    row = V.evaluate_variant(other, tokenizer, data, scores, profile.dpo.beta, max_new_tokens=8)
    pairs = list(data.heldout)
    ref = {(i, side): naive_answer_logprob(base, tokenizer, p["prompt"], p[side])
           for i, p in enumerate(pairs) for side in ("chosen", "rejected")}
    pol = {(i, side): naive_answer_logprob(other, tokenizer, p["prompt"], p[side])
           for i, p in enumerate(pairs) for side in ("chosen", "rejected")}
    margins = [profile.dpo.beta * ((pol[i, "chosen"] - ref[i, "chosen"]) - (pol[i, "rejected"] - ref[i, "rejected"]))
               for i in range(len(pairs))]
    assert row["margin"] == pytest.approx(sum(margins) / len(margins), abs=1e-4)
    assert row["margin"] != 0.0, "another model: the margin must not vanish"
    chosen_change = [pol[i, "chosen"] - ref[i, "chosen"] for i in range(len(pairs))]
    assert row["chosen_logp_change"] == pytest.approx(sum(chosen_change) / len(chosen_change), abs=1e-3)
    tokens = {(i, side): len(tokenizer(p[side], add_special_tokens=False)["input_ids"])
              for i, p in enumerate(pairs) for side in ("chosen", "rejected")}
    wins = [pol[i, "chosen"] / tokens[i, "chosen"] > pol[i, "rejected"] / tokens[i, "rejected"]
            for i in range(len(pairs))]
    assert row["accuracy_per_token"] == pytest.approx(sum(wins) / len(wins))
    assert row["answers"] == HELDOUT, "answers=None: every held-out prompt is answered"
    assert isinstance(row["sample"], str)


@pytest.fixture(scope="module")
def short_profile(profile):
    """The comparison's short-run profile (4 pairs a step, constant learning rate), without warm-up."""
    return V.PLANS["tiny"].run_profile(profile).replace("training", warmup_steps=0, logging_steps=1)


@pytest.fixture(scope="module")
def reference(short_profile, small_data):
    _, data = small_data
    return V.shared_reference(short_profile, data.train)


def test_shared_reference_is_the_base_model_on_the_train_pairs(short_profile, small_data, base_scores, reference):
    import torch

    from helpers.evaluation import score_pairs

    tokenizer, data = small_data
    base, _ = base_scores
    assert len(reference) == len(data.train)
    assert set(V.REFERENCE_COLUMNS) <= set(reference.column_names)
    scores = score_pairs(base, tokenizer, data.train)  # another code path: plain logits, no fused LM head
    for column, mine in (("ref_chosen_logps", scores.chosen_sum), ("ref_rejected_logps", scores.rejected_sum)):
        assert torch.allclose(torch.tensor(reference[column]), mine.float(), rtol=1e-4, atol=1e-4), column


def test_plain_trl_would_score_the_pairs_again(short_profile, small_data, reference, tmp_path, monkeypatch):
    """Why SharedReferenceDPOTrainer exists: TRL 1.16 recomputes the reference and trips over the columns."""
    import trl.trainer.dpo_trainer as dpo_module
    from trl import DPOTrainer

    from helpers.loading import load_model
    from helpers.lora import lora_config
    from helpers.training import dpo_config

    tokenizer, _ = small_data
    passes = []
    original = dpo_module.DPOTrainer.compute_ref_log_probs
    monkeypatch.setattr(dpo_module.DPOTrainer, "compute_ref_log_probs",
                        lambda self, *a, **k: passes.append(1) or original(self, *a, **k))
    args = dpo_config(V.variant_profile(short_profile, "sigmoid"), tmp_path)
    with pytest.raises(ValueError, match="duplicated"):
        DPOTrainer(model=load_model(short_profile), args=args, train_dataset=reference, processing_class=tokenizer,
                   peft_config=lora_config(short_profile))
    assert passes, "TRL ran its reference pass although the columns were there"
    passes.clear()
    trainer = V.SharedReferenceDPOTrainer(model=load_model(short_profile), args=args, train_dataset=reference,
                                          processing_class=tokenizer, peft_config=lora_config(short_profile))
    assert not passes, "the shared trainer must not score the pairs again"
    assert trainer.train_dataset["ref_chosen_logps"] == reference["ref_chosen_logps"]


@pytest.mark.parametrize("name", ["ipo", "robust"])
def test_shared_reference_logs_exactly_what_its_own_precompute_logs(name, short_profile, small_data, reference,
                                                                    tmp_path, monkeypatch):
    """A variant trained on the shared columns logs the very losses it logs when TRL precomputes for it alone."""
    import trl.trainer.dpo_trainer as dpo_module

    _, data = small_data
    own = V.train_variant(short_profile, name, tmp_path / "own", data=data, max_steps=3, progress=False)
    passes = []
    original = dpo_module.DPOTrainer.compute_ref_log_probs
    monkeypatch.setattr(dpo_module.DPOTrainer, "compute_ref_log_probs",
                        lambda self, *a, **k: passes.append(1) or original(self, *a, **k))
    shared = V.train_variant(short_profile, name, tmp_path / "shared", data=data, max_steps=3, progress=False,
                             reference=reference)
    assert not passes, "no reference pass may run in a run given the shared reference"
    assert type(shared.trainer) is V.SharedReferenceDPOTrainer and type(own.trainer).__name__ == "DPOTrainer"
    assert own.trainer.precompute_ref_logps and shared.trainer.precompute_ref_logps
    keys = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")
    assert len(own.history) == len(shared.history) == 3
    for mine, theirs in zip(shared.history, own.history):
        assert {k: mine[k] for k in keys} == {k: theirs[k] for k in keys}, "bit for bit, not approximately"


def test_train_on_reference_refuses_a_train_set_without_the_columns(short_profile, small_data, tmp_path):
    _, data = small_data
    with pytest.raises(ValueError, match="shared_reference"):
        V.train_on_reference(V.variant_profile(short_profile, "ipo"), tmp_path, data.train, progress=False)


@pytest.mark.parametrize("name", ["robust", V.ORPO])
def test_one_real_step(name, short_profile, small_data, base_scores, reference, tmp_path):
    """A real optimizer step of robust DPO (with its label_smoothing) and of ORPO, saved and evaluated."""
    tokenizer, data = small_data
    _, scores = base_scores
    outcome = V.train_variant(short_profile, name, tmp_path / name, data=data, max_steps=1, progress=False,
                              reference=reference)
    assert outcome.steps == outcome.trainer.state.global_step == 1
    assert (outcome.adapter_dir / "adapter_model.safetensors").exists()
    assert not (tmp_path / name / "checkpoints").exists() or not any((tmp_path / name / "checkpoints").iterdir())
    history = outcome.history
    assert history and math.isfinite(history[0]["loss"]) and "rewards/margins" in history[0]
    if name == "robust":
        assert outcome.trainer.label_smoothing == 0.1 and outcome.trainer.loss_types == ["robust"]
        assert outcome.trainer.ref_model is None, "the reference is the adapter switched off"
    else:
        assert type(outcome.trainer).__name__ == "ORPOTrainer"
    assert V.seconds_per_step(outcome) > 0
    row = V.evaluate_variant(outcome.model, tokenizer, data, scores, short_profile.dpo.beta, answers=2,
                             max_new_tokens=8)
    assert row["answers"] == 2
    assert row["margin"] != 0.0, "after a step at lr 2e-3 the adapter should move the held-out log-probs"


def test_comparison_runs_a_variant(short_profile, small_data, base_scores, reference, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COURSE_OUTPUT_DIR", str(tmp_path))
    tokenizer, data = small_data
    _, scores = base_scores
    comparison = V.Comparison(short_profile, data, tokenizer, scores, run_id="t", steps=1, reference=reference,
                              answers=2)
    comparison.run("hinge", beta=0.5, label="hinge-beta0.5", progress=False)
    row = comparison.rows["hinge-beta0.5"]
    assert row["beta"] == 0.5 and row["steps"] == 1 and row["answers"] == 2
    assert math.isclose(row["margin_nats"] * 0.5, row["margin"], rel_tol=1e-9)
    assert (tmp_path / "runs" / "tiny-t-08-hinge-beta0.5" / "adapter").is_dir()
    assert "hinge-beta0.5: held-out accuracy" in capsys.readouterr().out
    rows, histories = V.load_results(comparison.save(tmp_path / "r.json"))
    assert set(rows) == set(histories) == {"hinge-beta0.5"}


def test_comparison_data_keeps_the_pairs_one_run_draws(profile, small_data):
    _, data = small_data
    plan = V.plan_for(profile, steps=1)  # 1 step x 4 pairs
    cut = V.comparison_data(profile, data, plan)
    assert len(cut.train) == 4 and cut.train["prompt"] == data.train["prompt"][:4]
    assert cut.heldout is data.heldout
    assert len(V.comparison_data(profile, data, V.plan_for(profile, steps=100)).train) == len(data.train)
