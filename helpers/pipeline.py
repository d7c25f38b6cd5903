"""``python -m helpers run``: the course's steps one after another, headless - train, merge, evaluate.

Notebooks 04-06 do these steps one cell at a time; this module only chains the same functions (from
:mod:`helpers.training`, :mod:`helpers.merging` and :mod:`helpers.evaluation`) for instructors pre-building
artefacts and clusters doing the full run. Every step reads and writes fixed paths in the run folder
``outputs/runs/<profile>-<run_id>/``:

- ``adapter/``: the trained LoRA adapter (+ tokenizer, + the resolved profile)
- ``checkpoints/``: trainer checkpoints, to resume an interrupted run
- ``history.json``: the training log (loss, rewards, log-probs per logged step)
- ``merged/``: the merged model in safetensors with tokenizer and chat template
- ``eval_results.json``: the evaluation (also copied to ``outputs/eval_results.json``)
- ``plots/``: the PNG figures of the notebooks
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from helpers.distributed import is_main_process, leave_distributed
from helpers.evaluation import evaluate_run
from helpers.merging import merge_run
from helpers.paths import display_path, run_dir
from helpers.profiles import Profile
from helpers.training import train_dpo


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
    if evaluate and not merge:
        raise ValueError("evaluation reads the merged model: skipping the merge (merge=False) needs evaluate=False")
    if output_dir is not None:
        os.environ["COURSE_OUTPUT_DIR"] = str(Path(output_dir).resolve())
    folder = run_dir(profile.name, run_id)
    overrides = {"max_steps": max_steps} if max_steps else {}
    steps = 1 + merge + evaluate
    say = print if is_main_process() else (lambda *_args, **_kwargs: None)
    say(f"[1/{steps}] training in {display_path(folder)}")
    outcome = train_dpo(profile, folder, **overrides)
    if not leave_distributed():
        return {}
    print(f"      adapter saved to {display_path(outcome.adapter_dir)} ({outcome.seconds:.0f} s)")
    summary: dict[str, Any] = {
        "profile": profile.name,
        "run_id": run_id,
        "run_folder": display_path(folder),
        "adapter": display_path(outcome.adapter_dir),
        "train_seconds": round(outcome.seconds, 1),
    }
    if not merge:
        return summary
    print(f"[2/{steps}] merging")
    merged = merge_run(profile, folder, overwrite=overwrite)
    print(f"      merged model in {display_path(merged.path)} (largest logit difference {merged.max_logit_diff:.1e})")
    summary["merged"] = display_path(merged.path)
    if not evaluate:
        return summary
    print(f"[3/{steps}] evaluating")
    results = evaluate_run(profile, folder, run_id=run_id, lm_eval_limit=lm_eval_limit)
    acc = results["heldout_preference_accuracy"]
    print(
        f"      held-out preference accuracy: base {acc['base']:.3f} -> DPO {acc['dpo']:.3f}; "
        f"well-formed answers: base {results['well_formed']['base']:.0%} -> DPO {results['well_formed']['dpo']:.0%}"
    )
    print(f"      results: {display_path(folder / 'eval_results.json')}")
    return results
