"""The course's steps as functions: format the data, train, merge, evaluate - one implementation.

Notebooks 04-06 call these one step at a time and show what happens; ``python -m helpers run`` calls
:func:`run_all` to do the same headless (instructors pre-building artefacts, clusters doing the full run).
Every step reads and writes fixed paths in the run folder ``outputs/runs/<profile>-<run_id>/``:

- ``adapter/``: the trained LoRA adapter (+ tokenizer, + the resolved profile)
- ``checkpoints/``: trainer checkpoints, to resume an interrupted run
- ``history.json``: the training log (loss, rewards, log-probs per logged step)
- ``merged/``: the merged model in safetensors with tokenizer and chat template
- ``eval_results.json``: the evaluation (also copied to ``outputs/eval_results.json``)
- ``plots/``: the PNG figures of the notebooks
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from helpers.paths import outputs_dir, run_dir
from helpers.profiles import Profile

TARGETS = {"dpo_accuracy": 0.85, "gain_over_base": 0.25, "well_formed": 0.95}
GENERATION_BUDGET = 64  # new tokens a well-formed greedy answer must end within


@dataclass
class PreparedData:
    """ChatML-formatted train and held-out pairs (over-long pairs dropped) and the raw held-out rows."""

    train: Any
    heldout: Any
    heldout_rows: list[dict]
    length_report: Any


def prepare_data(profile: Profile, tokenizer) -> PreparedData:
    """Load the profile's preference data, format it in ChatML, drop pairs over the length limits."""
    from helpers.chatml import filter_by_length, format_dataset
    from helpers.data import load_preference_data

    splits = load_preference_data(profile)
    train = format_dataset(splits["train"], tokenizer, split="train")
    train, report = filter_by_length(train, tokenizer, profile.dpo.max_prompt_length, profile.dpo.max_length)
    heldout = format_dataset(splits["heldout"], tokenizer, split="heldout")
    rows = [dict(r) for r in splits["heldout"]]
    if "kind" not in splits["heldout"].column_names:
        rows = [{**r, "kind": "all"} for r in rows]
        heldout = heldout.add_column("kind", ["all"] * len(heldout))
    return PreparedData(train, heldout, rows, report)


@dataclass
class TrainOutcome:
    """What a training run produced."""

    trainer: Any
    history: list[dict[str, float]]
    adapter_dir: Path
    seconds: float


def train_dpo(
    profile: Profile,
    run_folder: str | Path,
    *,
    resume: bool | str = False,
    progress: bool = True,
    data: PreparedData | None = None,
    **overrides: Any,
) -> TrainOutcome:
    """Train the profile's LoRA adapter with DPO and save it, its log and its profile in the run folder.

    ``resume=True`` continues from the newest checkpoint in ``<run>/checkpoints`` (or a given path).
    """
    from helpers.loading import load_model, load_tokenizer, model_source
    from helpers.training import (
        compact_progress,
        latest_complete_checkpoint,
        log_history_table,
        make_trainer,
        save_adapter,
        set_seed,
        write_history,
    )

    run_folder = Path(run_folder)
    run_folder.mkdir(parents=True, exist_ok=True)
    if resume is True:
        found = latest_complete_checkpoint(run_folder / "checkpoints")
        if found is None:
            raise FileNotFoundError(
                f"resume=True but {run_folder / 'checkpoints'} holds no complete checkpoint; the run never reached "
                "its first save - start it again with resume=False"
            )
        resume = str(found)
    # the profile saved next to the weights must be the one that ran: fold training overrides into it
    training_fields = {f.name for f in dataclasses.fields(profile.training)}
    profile = profile.replace("training", **{k: v for k, v in overrides.items() if k in training_fields})
    set_seed(profile.training.seed)
    source = model_source(profile)
    tokenizer = load_tokenizer(profile, source)
    data = data or prepare_data(profile, tokenizer)
    model = load_model(profile, source=source)
    if not progress:
        overrides.setdefault("disable_tqdm", True)
    trainer = make_trainer(profile, model, tokenizer, data.train, run_folder / "checkpoints", **overrides)
    if progress:
        compact_progress(trainer)
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume or None)
    seconds = time.perf_counter() - started
    history = log_history_table(trainer)
    # only the main process writes (under FSDP every process takes part in gathering the adapter)
    if trainer.is_world_process_zero() or getattr(trainer, "is_fsdp_enabled", False):
        adapter = save_adapter(trainer, run_folder, profile)
    else:
        adapter = run_folder / "adapter"
    if trainer.is_world_process_zero():
        write_history(history, run_folder / "history.json")
    return TrainOutcome(trainer, history, adapter, seconds)


def merge_run(profile: Profile, run_folder: str | Path, *, overwrite: bool = False):
    """Merge ``<run>/adapter`` into the base and save ``<run>/merged`` (see helpers.merging.merge_adapter)."""
    from helpers.merging import MERGED_DIRNAME, merge_adapter
    from helpers.training import ADAPTER_DIRNAME

    run_folder = Path(run_folder)
    return merge_adapter(profile, run_folder / ADAPTER_DIRNAME, run_folder / MERGED_DIRNAME, overwrite=overwrite)


def side_by_side(base_gens, dpo_gens, rows: list[dict], n: int = 5) -> list[dict[str, str]]:
    """``n`` held-out prompts (kinds taken in turn) with the base's and the DPO model's greedy answers."""
    picked: list[int] = []
    kinds = sorted({r["kind"] for r in rows})
    while len(picked) < min(n, len(rows)):
        for kind in kinds:
            index = next((i for i, r in enumerate(rows) if r["kind"] == kind and i not in picked), None)
            if index is not None and len(picked) < n:
                picked.append(index)
        left = [i for i, r in enumerate(rows) if i not in picked]
        if not left:
            break
    return [
        {
            "kind": rows[i]["kind"],
            "system": rows[i]["system"],
            "question": rows[i]["question"],
            "base": base_gens[i].text,
            "dpo": dpo_gens[i].text,
        }
        for i in picked
    ]


def evaluate_models(profile: Profile, base_model, dpo_model, tokenizer, data: PreparedData) -> dict[str, Any]:
    """Held-out preference accuracy, implicit rewards and generation health of the base and the DPO model."""
    from helpers.evaluation import (
        generation_health,
        greedy_generate,
        implicit_rewards,
        preference_accuracy,
        score_pairs,
    )

    base_scores = score_pairs(base_model, tokenizer, data.heldout)
    dpo_scores = score_pairs(dpo_model, tokenizer, data.heldout)
    base_acc, dpo_acc = preference_accuracy(base_scores), preference_accuracy(dpo_scores)
    prompts = list(data.heldout["prompt"])
    base_gens = greedy_generate(base_model, tokenizer, prompts, max_new_tokens=GENERATION_BUDGET)
    dpo_gens = greedy_generate(dpo_model, tokenizer, prompts, max_new_tokens=GENERATION_BUDGET)
    base_health = generation_health(base_gens, data.heldout_rows)
    dpo_health = generation_health(dpo_gens, data.heldout_rows)
    kinds = sorted(base_acc["by_kind"]["per_token"])
    return {
        "heldout_preference_accuracy": {
            "metric": "per_token",
            "base": base_acc["per_token"],
            "dpo": dpo_acc["per_token"],
            "base_sum": base_acc["sum"],
            "dpo_sum": dpo_acc["sum"],
            "by_kind": {
                k: {
                    "base": base_acc["by_kind"]["per_token"][k],
                    "dpo": dpo_acc["by_kind"]["per_token"][k],
                    "base_sum": base_acc["by_kind"]["sum"][k],
                    "dpo_sum": dpo_acc["by_kind"]["sum"][k],
                }
                for k in kinds
            },
        },
        "implicit_rewards": implicit_rewards(dpo_scores, base_scores, profile.dpo.beta),
        "well_formed": {"base": base_health["well_formed"], "dpo": dpo_health["well_formed"]},
        "follows_rule": {
            "base": base_health["follows_rule"],
            "dpo": dpo_health["follows_rule"],
            "by_kind": {
                k: {"base": base_health["follows_rule_by_kind"][k], "dpo": dpo_health["follows_rule_by_kind"][k]}
                for k in sorted(base_health["follows_rule_by_kind"])
            },
        },
        "side_by_side": side_by_side(base_gens, dpo_gens, data.heldout_rows),
        "n_heldout": len(prompts),
    }


def targets_met(results: dict[str, Any]) -> dict[str, bool]:
    """The tiny path's targets: DPO accuracy >= 0.85, >= 0.25 above base, >= 95% well-formed answers."""
    acc = results["heldout_preference_accuracy"]
    return {
        "dpo_accuracy": acc["dpo"] >= TARGETS["dpo_accuracy"],
        "gain_over_base": acc["dpo"] - acc["base"] >= TARGETS["gain_over_base"],
        "well_formed": results["well_formed"]["dpo"] >= TARGETS["well_formed"],
    }


def write_results(results: dict[str, Any], run_folder: str | Path) -> Path:
    """Write ``eval_results.json`` to the run folder and copy it to ``outputs/eval_results.json`` (atomically)."""
    text = json.dumps(results, indent=2)
    targets = [Path(run_folder) / "eval_results.json", outputs_dir() / "eval_results.json"]
    for path in targets:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return targets[0]


def evaluate_run(
    profile: Profile, run_folder: str | Path, *, run_id: str = "main", lm_eval_limit: int | None = None,
    with_lm_eval: bool = True,
) -> dict[str, Any]:
    """Evaluate ``<run>/merged`` against the base on held-out pairs (+ lm-eval) and write the results file."""
    from helpers.loading import load_model, load_tokenizer, model_source
    from helpers.merging import MERGED_DIRNAME, load_merged

    run_folder = Path(run_folder)
    source = model_source(profile)
    tokenizer = load_tokenizer(profile, source)
    data = prepare_data(profile, tokenizer)
    base = load_model(profile, four_bit=False, source=source)
    merged, _ = load_merged(run_folder / MERGED_DIRNAME)
    results: dict[str, Any] = {"profile": profile.name, "run_id": run_id, "run_folder": str(run_folder)}
    results.update(evaluate_models(profile, base, merged, tokenizer, data))
    if with_lm_eval:
        from helpers.harness import compare_models, tasks_for_profile

        results["lm_eval"] = compare_models(
            source, run_folder / MERGED_DIRNAME, tasks_for_profile(profile), limit=lm_eval_limit
        )
    else:
        results["lm_eval"] = {}
    results["targets_met"] = targets_met(results)
    write_results(results, run_folder)
    return results


def _leave_distributed() -> bool:
    """End a multi-process launch after training; True in the one process that goes on (rank 0).

    Merging and evaluating are single-process work: the other processes stop here, and rank 0 forgets the
    process group (and the launcher's variables) so that lm-eval's own accelerate set-up does not wait for
    processes that have gone.
    """
    import os

    import torch.distributed as dist

    from helpers.training import is_main_process, world_size

    if world_size() <= 1:
        return True
    main = is_main_process()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    if main:
        for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK"):
            os.environ.pop(var, None)
        try:
            from accelerate.state import AcceleratorState, PartialState

            AcceleratorState._reset_state(reset_partial_state=True)
            PartialState._reset_state()
        except Exception:  # pragma: no cover - only a safety net around accelerate internals
            pass
    return main


def run_all(
    profile: Profile, *, run_id: str = "main", max_steps: int | None = None, output_dir: str | Path | None = None,
    lm_eval_limit: int | None = None, overwrite: bool = True, merge: bool = True, evaluate: bool = True,
) -> dict[str, Any]:
    """Format, train, merge and evaluate in one go; returns the results written to ``eval_results.json``.

    ``merge=False`` stops after training (the adapter is saved); ``evaluate=False`` stops after merging.
    Evaluation reads the merged model, so it needs ``merge=True``. Under a multi-process launch (torchrun,
    accelerate launch) every process trains; only the main process merges, evaluates and writes, and the
    others return an empty dict.
    """
    import os

    from helpers.training import is_main_process

    if evaluate and not merge:
        raise ValueError("evaluation reads the merged model: skipping the merge (merge=False) needs evaluate=False")
    if output_dir is not None:
        os.environ["COURSE_OUTPUT_DIR"] = str(Path(output_dir).resolve())
    folder = run_dir(profile.name, run_id)
    overrides = {"max_steps": max_steps} if max_steps else {}
    steps = 1 + merge + evaluate
    say = print if is_main_process() else (lambda *_args, **_kwargs: None)
    say(f"[1/{steps}] training in {folder}")
    outcome = train_dpo(profile, folder, **overrides)
    if not _leave_distributed():
        return {}
    print(f"      adapter saved to {outcome.adapter_dir} ({outcome.seconds:.0f} s)")
    summary: dict[str, Any] = {
        "profile": profile.name,
        "run_id": run_id,
        "run_folder": str(folder),
        "adapter": str(outcome.adapter_dir),
        "train_seconds": round(outcome.seconds, 1),
    }
    if not merge:
        return summary
    print(f"[2/{steps}] merging")
    merged = merge_run(profile, folder, overwrite=overwrite)
    print(f"      merged model in {merged.path} (largest logit difference {merged.max_logit_diff:.1e})")
    summary["merged"] = str(merged.path)
    if not evaluate:
        return summary
    print(f"[3/{steps}] evaluating")
    results = evaluate_run(profile, folder, run_id=run_id, lm_eval_limit=lm_eval_limit)
    acc = results["heldout_preference_accuracy"]
    print(
        f"      held-out preference accuracy: base {acc['base']:.3f} -> DPO {acc['dpo']:.3f}; "
        f"well-formed answers: base {results['well_formed']['base']:.0%} -> DPO {results['well_formed']['dpo']:.0%}"
    )
    print(f"      results: {folder / 'eval_results.json'}")
    return results
