"""Command line: ``python -m helpers profile NAME``, ``python -m helpers build-tiny [--force] [--quiet]``
and ``python -m helpers run --profile NAME [--standins] [...]`` (train, merge, evaluate headless).

Each subcommand is a ``_cmd_*`` function registered in ``_build_parser``; add one the same way. The heavy libraries
are imported inside the subcommands, not at the top: ``profile`` answers in a fraction of a second, and the
offline stand-ins (``--standins``) must point the Hugging Face libraries at their cache before those are imported.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from helpers.profiles import get_profile


def _cmd_profile(args: argparse.Namespace) -> int:
    """Print a profile's settings as JSON (no hardware check: ``full`` prints on a CPU machine too)."""
    try:
        profile = get_profile(args.name, check_hardware=False)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(profile.to_json())
    return 0


def _cmd_build_tiny(args: argparse.Namespace) -> int:
    """Build (or reuse from the cache) the tiny chat model and print its folder (relative to the repository)."""
    from helpers.notebook import quiet_libraries

    quiet_libraries()  # before transformers is imported: bitsandbytes logs on import
    from helpers.paths import display_path
    from helpers.tiny_model import build_tiny_model

    print(display_path(build_tiny_model(force=args.force, progress=not args.quiet)))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    """Train, merge and evaluate one run headless (helpers.pipeline.run_all), as notebooks 04-06 do step by step."""
    from helpers import standins

    if args.standins and not standins.standins_active():
        os.environ[standins.STANDINS_ENV_VAR] = "1"  # an explicit COURSE_STANDINS=real (full width) stays
    if standins.standins_active():
        standins.activate_standins()  # before any Hugging Face library is imported
        print(standins.standin_note(args.profile or os.environ.get("COURSE_PROFILE", "")))
    from helpers.hardware import training_precision
    from helpers.notebook import quiet_libraries
    from helpers.paths import run_dir

    try:
        profile = get_profile(args.profile)
        if args.precision:
            profile = profile.replace("training", precision=args.precision)
            training_precision(args.precision)  # refuses what this machine cannot run, before anything runs
        run_dir(profile.name, args.run_id)  # refuses a run id with slashes or spaces before anything runs
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    evaluate = not (args.no_eval or args.no_merge)
    if args.no_merge and not args.no_eval:
        print("note: --no-merge skips the evaluation too (it reads the merged model)", file=sys.stderr)
    for setting, why in profile.differences.items():
        if setting.startswith("cpu."):
            print(f"note: {setting[4:]}: {why}")
    quiet_libraries()
    import torch

    workers = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if workers > 1 and not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))  # processes must not fight for cores
    from helpers.pipeline import run_all

    run_all(
        profile,
        run_id=args.run_id,
        max_steps=args.max_steps,
        output_dir=args.output_dir,
        lm_eval_limit=args.lm_eval_limit,
        merge=not args.no_merge,
        evaluate=evaluate,
    )
    return 0


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m helpers", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    profile = commands.add_parser("profile", help="print a profile's settings as JSON")
    profile.add_argument("name", metavar="NAME", help="tiny, t4 or full")
    profile.set_defaults(handler=_cmd_profile)

    build = commands.add_parser("build-tiny", help="build the tiny chat model (cached) and print its folder")
    build.add_argument("--force", action="store_true", help="rebuild even when the cache has it")
    build.add_argument("--quiet", action="store_true", help="no progress bars (for logs)")
    build.set_defaults(handler=_cmd_build_tiny)

    run = commands.add_parser("run", help="train, merge and evaluate a run headless (what notebooks 04-06 do)")
    run.add_argument("--profile", help="tiny, t4 or full (default: $COURSE_PROFILE, else chosen by the hardware)")
    run.add_argument("--standins", action="store_true",
                     help="offline stand-ins of the GPU profiles' model and data (tests; also $COURSE_STANDINS=1)")
    run.add_argument("--max-steps", type=int, metavar="N", help="optimizer steps (default: the profile's)")
    run.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"),
                     help="training precision (default: the profile's; fp16 on an Ampere GPU tests a T4's path)")
    run.add_argument("--output-dir", metavar="DIR", help="where runs/ and eval_results.json go (default: outputs/)")
    run.add_argument("--run-id", default="main", metavar="ID", help="names the run folder <profile>-<ID> (main)")
    run.add_argument("--lm-eval-limit", type=int, metavar="N", help="examples per lm-eval task (default: all)")
    run.add_argument("--no-eval", action="store_true", help="stop after merging")
    run.add_argument("--no-merge", action="store_true", help="stop after training (implies --no-eval)")
    run.set_defaults(handler=_cmd_run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; returns the process exit code."""
    args = _build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
