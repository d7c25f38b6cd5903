# ruff: noqa: E402  (the offline stand-ins of the tests must be switched on before the Hugging Face imports)
"""The NeuralHermes DPO recipe headless: notebooks 04 (train), 05 (merge) and 06 (evaluate) in one script, shaped
like TRL's ``trl/scripts/dpo.py``, making the same library calls as those notebooks' cells.

    python scripts/dpo.py --profile tiny                        # CPU, offline: a few minutes
    python scripts/dpo.py --profile full --lm-eval-limit 100    # the model card's run on one A100-class GPU
    accelerate launch --config_file configs/accelerate/multi_gpu_ddp.yaml scripts/dpo.py --profile full

It writes ``<output-dir>/runs/<profile>-<run-id>/``: ``adapter/``, ``history.json``, ``run_info.json`` (04),
``merged/`` (05), ``eval_results.json`` (06). Several processes (docs/scale_out.md) each train on a share of every
batch; only the first writes, merges and evaluates. ``COURSE_STANDINS=1``: the tests' offline stand-ins of the GPU
profiles' hub model and data (the ``standins`` package), a switch for test tooling only.
"""

import argparse
import gc
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

if os.environ.get("COURSE_STANDINS"):  # tests only: points the Hugging Face cache at the stand-ins (see above)
    import standins

    standins.activate_cache()

import torch
import torch.distributed as dist
from accelerate.state import AcceleratorState, PartialState
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, set_seed
from trl import DPOConfig, DPOTrainer

from helpers.data import pairs_only, prepare_data
from helpers.merging import probe_inputs
from helpers.models import largest_difference, load_tokenizer, logits_of
from helpers.notebook import quiet_libraries
from helpers.profiles import PROFILES, Profile, describe, get_profile, native_bf16
from helpers.runs import display_path, run_dir, save_atomically, write_json
from helpers.scoring import generation_health, greedy_generate, preference_accuracy, score_pairs
from helpers.training import log_history, prepare_trainer, save_run

PRECISIONS = {"bf16": ("bfloat16", {"bf16": True, "fp16": False}), "fp16": ("float16", {"bf16": False, "fp16": True}),
              "fp32": ("float32", {"bf16": False, "fp16": False})}
LAUNCH_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
                    "MASTER_PORT", "ACCELERATE_USE_FSDP")


def with_precision(profile: Profile, precision: str) -> Profile:
    """The profile in ``precision`` (``auto``: what this machine chose): mixed precision, the model's dtype and the
    4-bit compute dtype together; refused where it cannot train (fp16/bf16 need CUDA, bf16 an Ampere or newer)."""
    if precision == "auto":
        return profile
    if precision != "fp32" and not torch.cuda.is_available():
        raise SystemExit(f"error: --precision {precision} needs a CUDA GPU; a CPU trains in fp32")
    if precision == "bf16" and not native_bf16():
        raise SystemExit("error: --precision bf16 needs an Ampere or newer GPU (a T4 trains in fp16)")
    dtype, flags = PRECISIONS[precision]
    bnb = {**profile.bnb, "bnb_4bit_compute_dtype": dtype} if profile.bnb else None
    why = {**profile.why, **{f"dpo.{key}": f"--precision {precision} on the command line" for key in flags}}
    return replace(profile, dpo={**profile.dpo, **flags}, bnb=bnb, dtype=dtype, why=why)


def load_profile(args: argparse.Namespace) -> Profile:
    """The profile with the command line's changes, each with its reason in ``profile.why``."""
    if os.environ.get("COURSE_STANDINS"):
        profile = standins.activate(args.profile)  # says on its first line that these are not the real model
    else:
        profile = get_profile(args.profile, allow_cpu=args.print_profile)
    profile = with_precision(profile, args.precision)
    if args.max_steps:
        logging = min(profile.dpo["logging_steps"], args.max_steps)  # a short run still logs its last step
        profile = replace(profile.with_changes("dpo", max_steps=args.max_steps, logging_steps=logging),
                          why={**profile.why, "dpo.max_steps": "--max-steps on the command line"})
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and profile.dpo.get("precompute_ref_log_probs"):
        # TRL 1.16 caches the precomputed log-probs in a file beside the data set, and an in-memory data set's
        # cache folder is a temporary folder of each process: another rank cannot find what rank 0 wrote.
        profile = replace(profile.with_changes("dpo", precompute_ref_log_probs=False), why={
            **profile.why, "dpo.precompute_ref_log_probs": "off: more than one process (TRL caches per process)"})
    return profile


def load_model(profile: Profile, *, four_bit: bool):
    """``from_pretrained`` as notebooks 02 and 04 write it, on this process's GPU; in 4-bit for training when the
    profile says so (under FSDP stored in the model's dtype: FSDP shards one floating-point dtype only)."""
    bnb = profile.bnb if four_bit else None
    if bnb and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        bnb = {**bnb, "bnb_4bit_quant_storage": profile.dtype}
    return AutoModelForCausalLM.from_pretrained(
        profile.model_id,
        quantization_config=BitsAndBytesConfig(**bnb) if bnb else None,
        dtype=profile.dtype,
        device_map={"": int(os.environ.get("LOCAL_RANK", "0"))} if torch.cuda.is_available() else None,
    )


def train(profile: Profile, run_folder: Path, tokenizer, data) -> DPOTrainer:
    """Notebook 04: ``DPOTrainer`` with the profile's ``DPOConfig`` and LoRA on the base, trained; rank 0 saves."""
    set_seed(profile.dpo["seed"])  # before the trainer: it creates (and initialises) the LoRA weights
    trainer = DPOTrainer(
        model=load_model(profile, four_bit=True),
        ref_model=None,  # the reference is the same model with its adapter switched off
        args=DPOConfig(output_dir=str(run_folder / "checkpoints"), **profile.dpo),
        train_dataset=pairs_only(data.train),
        processing_class=tokenizer,
        peft_config=LoraConfig(**profile.lora),
    )
    prepare_trainer(trainer, desc=f"DPO steps ({profile.name})", progress=trainer.is_world_process_zero())
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    if trainer.is_fsdp_enabled:  # every rank gathers the adapter's shards into one state dict; rank 0 writes it
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
        trainer.save_model(str(run_folder / ".adapter-fsdp"))
        if trainer.is_world_process_zero():
            save_fsdp_adapter(trainer, profile, run_folder, seconds)
    elif trainer.is_world_process_zero():
        save_run(trainer, profile, run_folder, seconds)
    trainer.accelerator.wait_for_everyone()
    return trainer


def save_fsdp_adapter(trainer, profile: Profile, run_folder: Path, seconds: float) -> None:
    """What :func:`helpers.training.save_run` writes, from the adapter ``Trainer.save_model`` gathered under FSDP."""
    gathered = run_folder / ".adapter-fsdp"

    def save(folder: Path) -> None:
        for item in gathered.iterdir():
            item.replace(folder / item.name)
        trainer.processing_class.save_pretrained(folder)
        (folder / "course_profile.json").write_text(profile.to_json())

    save_atomically(save, run_folder / "adapter")
    gathered.rmdir()
    write_json(run_folder / "history.json", log_history(trainer))
    write_json(run_folder / "run_info.json", {"train_seconds": round(seconds, 2), "steps": trainer.state.global_step})


def leave_distributed(trainer) -> bool:
    """True in the one process that goes on to merge and evaluate; the others stop. Rank 0 leaves the process group
    and forgets the launch, so that lm-eval's accelerate set-up does not wait for processes that have gone."""
    if trainer.args.world_size == 1:
        return True
    main = trainer.is_world_process_zero()
    if dist.is_initialized():
        dist.destroy_process_group()
    if main:
        for name in LAUNCH_VARIABLES:
            os.environ.pop(name, None)
        AcceleratorState._reset_state(reset_partial_state=True)
        PartialState._reset_state()
    return main


def merge(profile: Profile, run_folder: Path, tokenizer) -> tuple[object, float]:
    """Notebook 05: the adapter merged into the unquantised base (an NF4 base would round the update away), checked
    on the probe prompts against base + adapter, saved atomically to ``merged/``. Returns it and the difference."""
    model = PeftModel.from_pretrained(load_model(profile, four_bit=False), str(run_folder / "adapter"))
    probes = probe_inputs(tokenizer)
    before = logits_of(model, probes)
    merged = model.merge_and_unload()
    difference = largest_difference(before, logits_of(merged, probes))

    def save(folder: Path) -> None:
        merged.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    save_atomically(save, run_folder / "merged")
    return merged, difference


def model_row(model, tokenizer, data) -> dict[str, float]:
    """Notebook 06's numbers for one model on the held-out pairs: preference accuracy (per token and summed), and
    the shares of its greedy answers that are well formed and that follow their pair's rule."""
    accuracy = preference_accuracy(score_pairs(model, tokenizer, data.heldout))
    batch = 32 if torch.cuda.is_available() else 16  # answers generated at once: a GPU has room for more
    answers = greedy_generate(model, tokenizer, list(data.heldout["prompt"]), batch_size=batch)
    health = generation_health(answers, data.heldout_rows)
    return {"accuracy": accuracy["per_token"], "accuracy_sum": accuracy["sum"],
            "well_formed": health["well_formed"], "follows_rule": health["follows_rule"]}


def run_lm_eval(profile: Profile, run_folder: Path, limit: int | None) -> dict[str, dict[str, float]]:
    """Notebook 06's ``lm_eval.simple_evaluate`` with the profile's tasks, on the base (by its hub id) and the merged
    model: ``{task: {"base": x, "dpo": y}}`` in the metric the card reports for each task."""
    import lm_eval  # only here: seconds to import, and no run with --lm-eval-limit 0 needs it (nor has it, maybe)

    from helpers.evaluation import lm_eval_table, quiet_lm_eval, task_manager  # imports lm_eval too

    settings = {key: value for key, value in profile.lm_eval.items() if key != "metrics"}
    settings["limit"] = settings["limit"] if limit is None else limit
    device, outputs = "cuda" if torch.cuda.is_available() else "cpu", {}
    with quiet_lm_eval():
        for name, path in (("base", profile.model_id), ("dpo", str(run_folder / "merged"))):
            outputs[name] = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": path, "dtype": profile.dtype},
                                                    task_manager=task_manager(settings["tasks"]), device=device,
                                                    log_samples=False, **settings)
    return lm_eval_table(outputs, profile.lm_eval["metrics"])


def main(args: argparse.Namespace) -> int:
    """Train, then (rank 0) merge and evaluate; returns the exit status."""
    if args.output_dir:
        os.environ["COURSE_OUTPUT_DIR"] = str(Path(args.output_dir).resolve())
    try:
        profile = load_profile(args)
        run_folder = run_dir(profile.name, args.run_id)  # refuses a run id with slashes or spaces
    except (ValueError, RuntimeError) as exc:  # a GPU profile on a CPU, a bad run id: say so, before any work
        raise SystemExit(f"error: {exc}") from None
    if args.print_profile:
        print(profile.to_json())
        return 0
    quiet_libraries()
    started = time.perf_counter()
    if int(os.environ.get("RANK", "0")) == 0:
        print("\n  ".join([describe(profile.name), *(f"{key}: {why}" for key, why in profile.why.items())]))
        print(f"[1/3] training {profile.dpo['max_steps']} steps into {display_path(run_folder)}", flush=True)
    tokenizer = load_tokenizer(profile.model_id)
    data = prepare_data(profile, tokenizer)
    trainer = train(profile, run_folder, tokenizer, data)
    if not leave_distributed(trainer):
        return 0
    losses = [row["loss"] for row in log_history(trainer)]
    print(f"      loss {losses[0]:.4f} -> {losses[-1]:.4f} ({time.perf_counter() - started:.0f} s)", flush=True)
    del trainer
    gc.collect()
    torch.cuda.empty_cache()
    if args.no_merge:
        return 0
    print("[2/3] merging", flush=True)
    merged, difference = merge(profile, run_folder, tokenizer)
    print(f"      largest logit difference to base + adapter {difference:.1e} ({time.perf_counter() - started:.0f} s)",
          flush=True)
    if args.no_eval:
        return 0
    print(f"[3/3] evaluating on {len(data.heldout)} held-out pairs", flush=True)
    dpo_row = model_row(merged, tokenizer, data)
    del merged  # one model on the GPU at a time
    results = {"profile": profile.name, "run_id": args.run_id, "standins": profile.why.get("standins"),
               "heldout_pairs": len(data.heldout), "merge_max_logit_diff": difference,
               "models": {"base": model_row(load_model(profile, four_bit=False), tokenizer, data), "dpo": dpo_row}}
    if args.lm_eval_limit != 0:
        results["lm_eval"] = run_lm_eval(profile, run_folder, args.lm_eval_limit)
    write_json(run_folder / "eval_results.json", results)
    for name, row in results["models"].items():
        print(f"      {name:>4}: held-out accuracy {row['accuracy']:.3f} (per token), well-formed answers "
              f"{row['well_formed']:.0%}, answers that follow their rule {row['follows_rule']:.0%}")
    for task, scores in results.get("lm_eval", {}).items():
        print(f"      lm-eval {task}: base {scores['base']:.3f} -> DPO {scores['dpo']:.3f}")
    print(f"      {display_path(run_folder)} ({time.perf_counter() - started:.0f} s)", flush=True)
    return 0


def make_parser() -> argparse.ArgumentParser:
    """The command line (every setting not named here comes from the profile)."""
    parser = argparse.ArgumentParser(prog="scripts/dpo.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=list(PROFILES), help="default: $COURSE_PROFILE, else by the GPU")
    parser.add_argument("--max-steps", type=int, metavar="N", help="optimizer steps (default: the profile's)")
    parser.add_argument("--precision", choices=["auto", *PRECISIONS], default="auto", help="auto: by the machine")
    parser.add_argument("--output-dir", metavar="DIR", help="where runs/ goes (default: $COURSE_OUTPUT_DIR, outputs/)")
    parser.add_argument("--run-id", default="main", metavar="ID", help="the run folder is runs/<profile>-<ID>")
    parser.add_argument("--lm-eval-limit", type=int, metavar="N", help="documents per lm-eval task (0: no lm-eval)")
    parser.add_argument("--no-eval", action="store_true", help="stop after merging")
    parser.add_argument("--no-merge", action="store_true", help="stop after training (no merge, no evaluation)")
    parser.add_argument("--print-profile", action="store_true", help="print the profile's settings and stop")
    return parser


if __name__ == "__main__":
    sys.exit(main(make_parser().parse_args()))
