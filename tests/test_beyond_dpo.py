"""helpers.beyond_dpo (notebook 08): the plan, a variant's settings, the shared reference pass, the losses TRL
computes from them, and the evaluation of a trained model - each against TRL itself or an independent reference."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import beyond_dpo as V
from helpers.profiles import REPO_ROOT

PAIRS = 8
HELDOUT = 4
TOLERANCE = 1e-5  # fp32 on a CPU: two routes to the same log-prob sums differ by float rounding


def test_the_plan_is_the_profiles_unless_a_knob_says_otherwise(profile):
    assert V.plan_for(profile) == profile.beyond
    plan = V.plan_for(profile, steps=5, variants=["sigmoid", "orpo"], betas=[0.5], answers=3)
    assert (plan["steps"], plan["variants"], plan["betas"], plan["answers"]) == (5, ["sigmoid", "orpo"], [0.5], 3)
    assert plan["training"] == profile.beyond["training"], "a knob left at None keeps the profile's value"
    with pytest.raises(ValueError, match="unknown variants"):
        V.plan_for(profile, variants=["dpo"])
    with pytest.raises(ValueError, match="β sweep"):
        V.plan_for(profile, variants=["ipo"])
    assert V.plan_for(profile, variants=["ipo"], betas=[])["betas"] == []
    with pytest.raises(ValueError, match="at least 1"):
        V.plan_for(profile, steps=0)


def test_the_run_profile_changes_only_the_schedule_and_the_reference_pass(profile):
    plan = V.plan_for(profile)
    run = V.run_profile(profile, plan)
    changed = {k for k in run.dpo if run.dpo[k] != profile.dpo.get(k)}
    assert changed <= {"max_steps", "save_strategy", "precompute_ref_log_probs", "precompute_ref_batch_size",
                       *plan["training"]}
    assert run.dpo["max_steps"] == plan["steps"] and run.dpo["precompute_ref_log_probs"] is True
    assert run.dpo["precompute_ref_batch_size"] == plan["reference_batch_size"]
    assert (run.lora, run.bnb, run.model_id) == (profile.lora, profile.bnb, profile.model_id)


@pytest.mark.parametrize("name", list(V.LOSSES))
def test_a_variants_profile_changes_only_the_loss(profile, name, tmp_path):
    from trl import DPOConfig

    run = V.run_profile(profile, V.plan_for(profile))
    variant = V.variant_profile(run, name, beta=0.5)
    changed = {k for k in {*run.dpo, *variant.dpo} if run.dpo.get(k, "unset") != variant.dpo.get(k, "unset")}
    assert changed <= set(V.LOSS_SETTINGS), f"{name} changes more than its loss: {changed - set(V.LOSS_SETTINGS)}"
    for section in ("bnb", "lora", "lm_eval", "beyond", "model_id", "dataset", "max_prompt_length"):
        assert getattr(variant, section) == getattr(run, section), section
    args = DPOConfig(output_dir=str(tmp_path), **variant.dpo)
    assert args.loss_type == V.LOSSES[name]["loss_type"] and args.beta == 0.5
    assert args.loss_weights is None, "the tiny profile's weights for (sigmoid, sft) must not leak into a variant"
    assert args.label_smoothing == V.LOSSES[name].get("label_smoothing", 0.0)
    assert 0.0 <= args.label_smoothing < 0.5, "TRL's robust loss takes label_smoothing in [0, 0.5)"


# --- the shared reference pass, against TRL's own --------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(profile, tokenizer, tmp_path_factory):
    """The comparison's run profile (no warm-up), a few train pairs, and TRL's own reference pass over them."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from helpers.data import pairs_only, prepare_data
    from helpers.notebook import quiet_libraries

    quiet_libraries()
    run = V.run_profile(profile, V.plan_for(profile)).with_changes("dpo", warmup_steps=0, logging_steps=1)
    data = prepare_data(profile, tokenizer)
    pairs = pairs_only(data.train.select(range(PAIRS)))
    base = AutoModelForCausalLM.from_pretrained(profile.model_id, dtype="float32")
    own = DPOTrainer(model=base, ref_model=None, args=DPOConfig(output_dir=str(tmp_path_factory.mktemp("own")),
                                                                **run.dpo),
                     train_dataset=pairs, processing_class=tokenizer, peft_config=LoraConfig(**profile.lora))
    return run, data, pairs, own.train_dataset, tmp_path_factory.mktemp("runs")


def build(run, dataset, tokenizer, folder, trainer_class=V.SharedReferenceDPOTrainer, **changes):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig

    return trainer_class(model=AutoModelForCausalLM.from_pretrained(run.model_id, dtype="float32"), ref_model=None,
                         args=DPOConfig(output_dir=str(folder), **{**run.dpo, **changes}), train_dataset=dataset,
                         processing_class=tokenizer, peft_config=LoraConfig(**run.lora))


def counting_reference_passes(monkeypatch) -> list[int]:
    import trl.trainer.dpo_trainer as dpo_module

    passes: list[int] = []
    original = dpo_module.DPOTrainer.compute_ref_log_probs
    monkeypatch.setattr(dpo_module.DPOTrainer, "compute_ref_log_probs",
                        lambda self, *a, **k: passes.append(1) or original(self, *a, **k))
    return passes


def test_plain_trl_would_score_the_pairs_again_and_trip(setup, tokenizer, monkeypatch):
    """Why SharedReferenceDPOTrainer exists: TRL 1.16 runs its pass whatever the train set holds, then fails on the
    columns it adds a second time. When a TRL release stops doing so, this test fails: drop the subclass then."""
    from trl import DPOTrainer

    run, _, _, reference, folder = setup
    passes = counting_reference_passes(monkeypatch)
    with pytest.raises(ValueError, match="duplicated"):
        build(run, reference, tokenizer, folder, trainer_class=DPOTrainer)
    assert passes, "TRL ran no reference pass although precompute_ref_log_probs=True"


def test_the_shared_trainer_reads_trls_own_reference_and_scores_nothing(setup, tokenizer, monkeypatch):
    run, _, pairs, reference, folder = setup
    passes = counting_reference_passes(monkeypatch)
    shared = build(run, reference, tokenizer, folder)
    assert not passes, "the shared trainer must not score the pairs again"
    batch = shared.data_collator([shared.train_dataset[i] for i in range(PAIRS)])
    again = build(run, pairs, tokenizer, folder)  # no columns: TRL's own pass, in this trainer
    assert passes, "without the columns the shared trainer is TRL's trainer and runs its pass"
    own = again.data_collator([again.train_dataset[i] for i in range(PAIRS)])
    for column in V.REFERENCE_COLUMNS:
        assert torch.allclose(batch[column], own[column], rtol=TOLERANCE, atol=TOLERANCE), column


def test_a_short_run_on_the_shared_reference_logs_what_trl_logs_with_its_reference_at_every_step(
        setup, tokenizer):
    """Two steps of robust DPO on the shared columns, and the same two steps with TRL running the reference (the
    adapter off) at each step: the same losses and rewards, within float rounding."""
    run, _, pairs, reference, folder = setup
    robust = V.variant_profile(run, "robust").with_changes("dpo", max_steps=2)
    shared = build(robust, reference, tokenizer, folder / "shared")
    per_step = build(robust, pairs, tokenizer, folder / "per-step", precompute_ref_log_probs=False)
    histories = []
    for trainer in (shared, per_step):
        trainer.train()
        histories.append([row for row in trainer.state.log_history if "loss" in row])
    assert len(histories[0]) == len(histories[1]) == 2
    for mine, theirs in zip(*histories):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-5), key


def per_pair_logps(model, batch) -> torch.Tensor:
    """The policy's answer log-probs of a TRL batch, plain logits in float64 ([2B])."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    token = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    return token * batch["completion_mask"][:, 1:]


@pytest.mark.parametrize("name", list(V.LOSSES))
def test_each_variant_trains_the_formula_of_the_notebooks_table(setup, tokenizer, name):
    """The loss TRL computes for a variant's settings on the shared reference, against the table's formula written
    here with the reference log-probs of the columns and the policy's own (a random adapter)."""
    from helpers.dpo_from_scratch import trl_batch_metrics

    run, _, _, reference, folder = setup
    trainer = build(V.variant_profile(run, name), reference, tokenizer, folder)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param_name, parameter in trainer.model.named_parameters():
            if "lora_B" in param_name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(PAIRS)])
    tokens = per_pair_logps(trainer.model.eval(), batch)
    policy_c, policy_r = tokens.sum(-1).chunk(2)
    ref_c, ref_r = batch["ref_chosen_logps"].double(), batch["ref_rejected_logps"].double()
    length_c, length_r = batch["completion_mask"].sum(1).double().chunk(2)
    beta, eps = run.dpo["beta"], V.LOSSES["robust"]["label_smoothing"]
    delta = (policy_c - ref_c) - (policy_r - ref_r)
    per_token = (policy_c - ref_c) / length_c - (policy_r - ref_r) / length_r
    nll = -tokens[:PAIRS].sum() / batch["completion_mask"][:PAIRS, 1:].sum()
    formula = {
        "sigmoid": -F.logsigmoid(beta * delta),
        "sigmoid+sft": -F.logsigmoid(beta * delta) + nll,
        "ipo": (per_token - 1 / (2 * beta)) ** 2,
        "hinge": torch.relu(1 - beta * delta),
        "robust": (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps),
        "sigmoid_norm": -F.logsigmoid(beta * per_token),
    }[name].mean().item()
    assert trl_batch_metrics(trainer, batch)["loss"] == pytest.approx(formula, rel=1e-4, abs=1e-5)


@pytest.fixture(scope="module")
def sentencepiece(tmp_path_factory):
    """The OpenHermes stand-in (sentencepiece-style tokenizer, ``<s>`` first; random weights), course pairs formatted
    for it, and TRL's reference pass over them."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig

    from helpers.chatml import format_orca_row
    from helpers.data import load_pairs
    from helpers.models import load_tokenizer
    from helpers.profiles import DATA_DIR, get_profile
    from standins import OPENHERMES_ID
    from standins.build import build_standins, snapshot_dir

    folder = snapshot_dir(build_standins(), OPENHERMES_ID)
    tokenizer = load_tokenizer(str(folder))
    rows = load_pairs(DATA_DIR / "train.jsonl").select(range(PAIRS))
    pairs = rows.map(lambda row: format_orca_row(row, tokenizer), remove_columns=rows.column_names)
    settings = get_profile("tiny").with_changes("dpo", precompute_ref_log_probs=True, loss_type=["sigmoid"],
                                                loss_weights=None)
    trainer = V.SharedReferenceDPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(folder, dtype="float32"), ref_model=None,
        args=DPOConfig(output_dir=str(tmp_path_factory.mktemp("sp")), **settings.dpo), train_dataset=pairs,
        processing_class=tokenizer, peft_config=LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    return tokenizer, trainer


def test_scoring_splits_a_pair_where_trl_does(sentencepiece):
    """TRL cuts both answers of a pair at the shorter of their two common prefixes with the prompt; where the
    stand-in's BPE merges the prompt's final newline into an answer ("\\nI"), both answers then start one token
    early. helpers.chatml.tokenize_pair, given both answers, must cut exactly where TRL's own preprocessing did."""
    from helpers.chatml import tokenize_pair

    tokenizer, trainer = sentencepiece
    merged = 0
    for row in trainer.train_dataset:
        prompt, chosen, rejected = tokenize_pair(tokenizer, row["prompt"], row["chosen"], row["rejected"])
        assert (prompt, chosen, rejected) == (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"])
        merged += len(tokenize_pair(tokenizer, row["prompt"], row["chosen"])[0]) != len(prompt)
    assert merged, "the stand-in's pairs should show the merged case ('\\nI' is one of its tokens)"


def test_the_reference_is_the_base_model_on_a_sentencepiece_tokenizer_with_bos(sentencepiece):
    """Notebook 08's self-check on the recipe's own kind of tokenizer: TRL's shared reference log-probs equal
    helpers.scoring's, because both tokenise with the BOS. Scored without it, as the course once scored, they
    differ far beyond float rounding: this test would have caught that."""
    from helpers.scoring import score_pairs

    tokenizer, trainer = sentencepiece
    assert tokenizer("x")["input_ids"][0] == tokenizer.bos_token_id, "the stand-in must put <s> first"
    reference = trainer.train_dataset
    with trainer.model.disable_adapter():
        scores = score_pairs(trainer.model, tokenizer, reference)
        without_bos = []
        for row in reference:
            prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
            ids = tokenizer(row["prompt"] + row["chosen"], add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = trainer.model(input_ids=torch.tensor([ids])).logits[0].double()
            log_probs = torch.log_softmax(logits, -1)
            without_bos.append(sum(log_probs[t - 1, ids[t]].item() for t in range(len(prompt), len(ids))))
    trl_chosen = torch.tensor(reference["ref_chosen_logps"], dtype=torch.float64)
    assert torch.allclose(trl_chosen, scores.chosen_sum.double(), rtol=1e-4, atol=1e-4)
    assert torch.allclose(torch.tensor(reference["ref_rejected_logps"], dtype=torch.float64),
                          scores.rejected_sum.double(), rtol=1e-4, atol=1e-4)
    assert (trl_chosen - torch.tensor(without_bos)).abs().max() > 1e-2, "this check must see a missing BOS"


# --- the evaluation of a trained model ---------------------------------------------------------------------------


def test_a_variants_row_against_the_textbook_log_likelihoods(profile, tokenizer, setup, other_model_path,
                                                             naive_answer_logprob):
    """evaluate_variant on another model (the tiny one with a random LoRA update merged in), the base model as its
    reference: its margin, chosen-likelihood change and per-token accuracy equal what one-sequence-at-a-time
    log-likelihoods (an independent implementation) give on the same pairs."""
    from transformers import AutoModelForCausalLM

    from helpers.data import PreparedData
    from helpers.scoring import score_pairs

    _, data, _, _, _ = setup
    small = PreparedData(data.train, data.heldout.select(range(HELDOUT)), data.heldout_rows[:HELDOUT], data.report,
                         data.heldout_report)
    base = AutoModelForCausalLM.from_pretrained(profile.model_id, dtype="float32").eval()
    other = AutoModelForCausalLM.from_pretrained(other_model_path, dtype="float32").eval()
    beta = profile.dpo["beta"]
    row = V.evaluate_variant(other, tokenizer, small, score_pairs(base, tokenizer, small.heldout), beta, answers=2)
    pairs = list(small.heldout)
    ref = {(i, s): naive_answer_logprob(base, tokenizer, p["prompt"], p[s]) for i, p in enumerate(pairs)
           for s in ("chosen", "rejected")}
    pol = {(i, s): naive_answer_logprob(other, tokenizer, p["prompt"], p[s]) for i, p in enumerate(pairs)
           for s in ("chosen", "rejected")}
    n = len(pairs)
    deltas = [(pol[i, "chosen"] - ref[i, "chosen"]) - (pol[i, "rejected"] - ref[i, "rejected"]) for i in range(n)]
    assert row["margin"] == pytest.approx(beta * sum(deltas) / n, abs=1e-4) and abs(row["margin"]) > 1e-3
    assert row["margin_nats"] == pytest.approx(sum(deltas) / n, abs=1e-3)
    change = [pol[i, "chosen"] - ref[i, "chosen"] for i in range(n)]
    assert row["chosen_logp_change"] == pytest.approx(sum(change) / n, abs=1e-3)
    count = {(i, s): len(tokenizer(p["prompt"] + p[s])["input_ids"]) - len(tokenizer(p["prompt"])["input_ids"])
             for i, p in enumerate(pairs) for s in ("chosen", "rejected")}
    wins = [pol[i, "chosen"] / count[i, "chosen"] > pol[i, "rejected"] / count[i, "rejected"] for i in range(n)]
    assert row["accuracy_per_token"] == pytest.approx(sum(wins) / n)
    assert row["answers"] == 2 and 0.0 <= row["well_formed"] <= 1.0 and isinstance(row["sample"], str)


def test_the_table_and_the_curves(tmp_path):
    rows = {"base": {"accuracy_per_token": 0.6, "margin": 0.0, "well_formed": 1.0},
            "ipo": {"accuracy_per_token": 0.81234, "margin": 1.5, "well_formed": 0.9, "seconds_per_step": 0.4}}
    table = V.results_table(rows)
    assert list(table.index) == ["base", "ipo"]
    assert list(table.columns) == [V.COLUMNS[k] for k in ("accuracy_per_token", "margin", "well_formed",
                                                           "seconds_per_step")]
    assert table.loc["ipo", V.COLUMNS["accuracy_per_token"]] == 0.812
    assert math.isnan(table.loc["base", V.COLUMNS["seconds_per_step"]])
    history = [{"step": 5, "loss": 25.0, "rewards/margins": 0.1, "logps/chosen": -10.0},
               {"step": 10, "loss": 5.0, "rewards/margins": 1.0, "logps/chosen": -9.0}, {"step": 10, "train_loss": 1}]
    fig = V.plot_variant_curves({"ipo": history, V.ORPO: history}, tmp_path / "plots" / "curves.png")
    assert (tmp_path / "plots" / "curves.png").stat().st_size > 1000
    loss = fig.axes[0].lines[0]
    assert list(loss.get_xdata()) == [5, 10] and list(loss.get_ydata()) == pytest.approx([1.0, 0.2])
    assert fig.axes[1].lines[1].get_linestyle() == "--", "ORPO is drawn dashed"


def test_notebook_08s_self_checks_hold_on_every_committed_seed(profile) -> None:
    """08's self-checks (sections 5 and 6) read back from the committed benchmark (seeds_08.json): a rerun of the
    benchmark that no longer supports them fails here, not in a learner's notebook."""
    seeds = json.loads((REPO_ROOT / "benchmarks" / "results" / "seeds_08.json").read_text())
    assert seeds["notebook"] == "08_beyond_dpo" and len(seeds["seeds"]) >= 5
    rows = seeds["rows"]
    betas = sorted([0.1, *profile.beyond["betas"]])
    for i, seed in enumerate(seeds["seeds"]):
        for name in profile.beyond["variants"]:
            assert rows[name]["accuracy_per_token"][i] > rows["base"]["accuracy_per_token"][i] + 0.05, (name, seed)
            if name != "sigmoid+sft":
                assert rows[name]["chosen_logp_change"][i] < 0, (name, seed)
        assert rows["sigmoid+sft"]["chosen_logp_change"][i] > 0, seed
        for name in ("sigmoid+sft", "hinge", "orpo"):
            assert rows[name]["well_formed"][i] >= 0.9, (name, seed)
        deltas = [rows["sigmoid" if beta == 0.1 else f"sigmoid-beta{beta}"]["margin_nats"][i] for beta in betas]
        assert deltas == sorted(deltas, reverse=True), (seed, deltas)  # Δ shrinks as β grows
