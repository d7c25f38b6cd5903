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
    assert dataclasses.replace(changed.dpo, loss_type=profile.dpo.loss_type, loss_weights=profile.dpo.loss_weights,
                               beta=profile.dpo.beta) == profile.dpo
    assert V.variant_profile(profile, "orpo").dpo.loss_type == profile.dpo.loss_type  # ORPO ignores it


def test_variant_run_ids_are_valid_folder_names():
    from helpers.paths import run_dir

    assert V.variant_run_id("main", "sigmoid+sft") == "main-sigmoid-sft"
    assert V.variant_run_id("main", "sigmoid-beta0.01") == "main-sigmoid-beta0.01"
    assert V.variant_run_id("main", "sigmoid β=0.5") == "main-sigmoid---0.5"
    for name in V.VARIANTS:
        run_dir("tiny", V.variant_run_id("main", name))  # raises on a bad run id


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
        "base": {"accuracy_per_token": 0.6, "margin": 0.0, "chosen_logp_change": 0.0, "well_formed": 1.0},
        "ipo": {"accuracy_per_token": 0.81234, "margin": 1.5, "chosen_logp_change": -3.0, "well_formed": 0.9,
                "seconds_per_step": 0.4},
    }
    table = V.results_table(rows)
    assert list(table.index) == ["base", "ipo"]
    assert list(table.columns) == list(V.TABLE_COLUMNS.values())
    assert table.loc["ipo", "held-out acc. (per token)"] == 0.812
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


def test_base_against_itself(profile, small_data, base_scores):
    tokenizer, data = small_data
    base, scores = base_scores
    row = V.evaluate_variant(base, tokenizer, data, scores, profile.dpo.beta, max_new_tokens=8)
    assert row["margin"] == 0.0 and row["margin_nats"] == 0.0 and row["chosen_logp_change"] == 0.0
    assert 0.0 <= row["accuracy_per_token"] <= 1.0 and 0.0 <= row["well_formed"] <= 1.0
    assert isinstance(row["sample"], str)


@pytest.mark.parametrize("name", ["robust", V.ORPO])
def test_one_real_step(name, profile, small_data, base_scores, tmp_path):
    """A real optimizer step of robust DPO (with its label_smoothing) and of ORPO, saved and evaluated."""
    tokenizer, data = small_data
    _, scores = base_scores
    outcome = V.train_variant(profile, name, tmp_path / name, data=data, max_steps=1, progress=False,
                              logging_steps=1, warmup_steps=0)  # warm-up would make the first step's lr 0
    assert outcome.trainer.state.global_step == 1
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
    row = V.evaluate_variant(outcome.trainer.model, tokenizer, data, scores, profile.dpo.beta, max_new_tokens=8)
    assert row["margin"] != 0.0, "after a step at lr 2e-3 the adapter should move the held-out log-probs"


def test_comparison_runs_a_variant(profile, small_data, base_scores, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COURSE_OUTPUT_DIR", str(tmp_path))
    tokenizer, data = small_data
    _, scores = base_scores
    comparison = V.Comparison(profile, data, tokenizer, scores, run_id="t", steps=1)
    comparison.run("hinge", beta=0.5, label="hinge-beta0.5", progress=False, logging_steps=1)
    row = comparison.rows["hinge-beta0.5"]
    assert row["beta"] == 0.5 and row["steps"] == 1
    assert math.isclose(row["margin_nats"] * 0.5, row["margin"], rel_tol=1e-9)
    assert (tmp_path / "runs" / "tiny-t-hinge-beta0.5" / "adapter").is_dir()
    assert "hinge-beta0.5: held-out accuracy" in capsys.readouterr().out
    rows, histories = V.load_results(comparison.save(tmp_path / "r.json"))
    assert set(rows) == set(histories) == {"hinge-beta0.5"}
