"""The GPU acceptance run behind ``scripts/gpu_acceptance.sh``: one command, no network, about 5 minutes on one GPU.

Four steps, each in its own process, timed, with its output kept; a step that fails is reported loudly and the next
one still runs:

1. ``pipeline_fp16``: ``python scripts/dpo.py --profile t4 --precision fp16`` - train a few steps in 4-bit, merge,
   score the held-out pairs and generate - on the t4 stand-in at Qwen2.5-0.5B's real width and architecture with
   random weights (``COURSE_STANDINS=real``, the ``standins`` package). fp16 is a T4's path, whose GradScaler needs
   fp32 adapter weights (helpers.training.prepare_trainer).
2. ``pipeline_bf16``: the training in bf16 (skipped, saying why, on a GPU without native bf16), whose adapter stays
   bf16; merging and scoring are the same code in either precision and run once, in step 1.
3. ``dpo_step_7b``: ``python -m benchmarks.gpu step`` - the full profile's DPO step on a Mistral-7B-shaped random model
   in 4-bit: seconds per step, pairs per second, peak memory, MFU.
4. ``reference_7b``: ``python -m benchmarks.gpu reference`` - the reference model three ways, each in a fresh process.

lm-eval runs in the pipeline steps only where ``lm_eval`` is installed; the GPU machine this was sized for has none
(and ``pip download --only-binary`` cannot fetch three of its dependencies, published as source only), so the
pipelines say so and score the held-out pairs with helpers.scoring alone.

The time is a budget (``--budget``, :data:`BUDGET_SECONDS` for the steps), shared out by :data:`SHARES`: while a step
runs, :data:`RESERVED` of every later step's share stays kept for it, so a step may use what earlier steps left but
not what later ones need, and it is stopped when its time is up; the 7B steps also stop training by time, so a slower
card measures fewer steps instead of overrunning.

Writes ONE JSON (benchmarks/results/gpu_acceptance.json: the GPU, the library versions, each step's command, status,
seconds, figures and the tail of its log), rewritten after every step so that a run cut short still leaves what it
measured, and prints a short table. Exit status: 0 when every step passed or was skipped for a stated reason, 1 when
one failed, timed out or found no time left, 2 without CUDA.

Test mode (``GPU_ACCEPTANCE_TEST_MODE=1`` or ``--test-mode``) runs the same steps on the CPU at tiny sizes, so that the
tests prove this script's code path: the tiny-width stand-ins in fp32 (the bf16 step skipped: a CPU trains in neither
fp16 nor bf16), one training step and the merge without the evaluation, and ``benchmarks.gpu --test-mode``. It writes
gpu_acceptance_test_mode.json, never the GPU's file.

    scripts/gpu_acceptance.sh                              # on a GPU machine
    GPU_ACCEPTANCE_TEST_MODE=1 scripts/gpu_acceptance.sh   # anywhere: the code path on CPU
    python -m benchmarks.gpu_acceptance --only dpo_step_7b # one step again
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from benchmarks import _common as C
from helpers.profiles import REPO_ROOT
from helpers.runs import display_path, write_json

TEST_MODE_ENV_VAR = "GPU_ACCEPTANCE_TEST_MODE"
BUDGET_SECONDS = 300.0  # the steps' 5 minutes; start-up, the GPU query and the table add about 15 s
# Each step's share of the budget, from the H200 run of benchmarks/README.md (120, 45, 52 and 109 s, since cut to
# about 100, 37, 45 and 109 s). Every step pays 15-20 s of imports per process; the first pipeline also builds the
# real-width stand-in (about 10 s, 1 GB) and scores and answers the held-out pairs with two models; the reference
# comparison runs three processes.
SHARES = {"pipeline_fp16": 0.35, "pipeline_bf16": 0.13, "dpo_step_7b": 0.16, "reference_7b": 0.36}
STEP_NAMES = tuple(SHARES)
RESERVED, MOST = 0.75, 1.5  # of its share: kept for a step while earlier ones run; the most it may take
MIN_STEP_SECONDS = 20.0  # less budget left than this: the step is not started
TEST_MODE_STEP_TIMEOUT = 900.0  # test mode has no budget, only a limit against a hung step
SMALL_GPU_GIB = 40.0  # below: a T4-class card, where the 7B steps run shorter sequences to stay in the budget
PIPELINE_MAX_STEPS, PIPELINE_LM_EVAL_LIMIT = 4, 8
DPO_STEPS, DPO_WARMUP = 1, 1  # timed optimizer steps (16 pairs of 1536 tokens each; 7.4 s on an H200) after one
# warm-up (11 s): the steps after the first agreed to 0.5% there
LOG_TAIL_LINES = 40
NO_CUDA_MESSAGE = (
    "scripts/gpu_acceptance.sh needs a CUDA GPU and this machine has none (torch.cuda.is_available() is False). "
    f"Run it on a GPU machine; {TEST_MODE_ENV_VAR}=1 (or --test-mode) runs the same steps on the CPU at tiny sizes, "
    "which checks the script, not the GPU.")
NO_LM_EVAL = ("lm-eval skipped (--lm-eval-limit 0): lm_eval is not installed here, and three of its dependencies "
              "(sqlitedict, word2number, rouge-score) are published as source only, so no wheel can bring them; "
              "the held-out pairs are scored by helpers.scoring all the same")


@dataclass
class Step:
    """One step of the run: its command line, environment, time limit, and where its figures land."""

    name: str
    title: str
    argv: list[str]
    timeout_s: float  # the most it may run (less when the budget has less left for it)
    reserve_s: float = 0.0  # budget kept for this step while the steps before it run
    env: dict[str, str] = field(default_factory=dict)
    skip: str | None = None  # why the step does not run on this machine (not a failure)
    note: str | None = None  # what the step leaves out, and why
    output_dir: Path | None = None  # pipeline steps: their --output-dir
    run_id: str | None = None  # pipeline steps: their --run-id
    expect_eval: bool = True  # pipeline steps: eval_results.json must be written
    expect_merge: bool = True  # pipeline steps: merged/ must be written
    result_json: Path | None = None  # benchmarks.gpu steps: their --json


# --------------------------------------------------------------------------------------------- the plan


def test_mode_requested(value: str | None = None) -> bool:
    """Whether $GPU_ACCEPTANCE_TEST_MODE asks for the test mode (1/true/yes/on; 0/false/no/off/empty: not)."""
    value = (os.environ.get(TEST_MODE_ENV_VAR, "") if value is None else value).strip().lower()
    if value in {"", "0", "false", "no", "off"}:
        return False
    if value in {"1", "true", "yes", "on"}:
        return True
    raise ValueError(f"${TEST_MODE_ENV_VAR}={value!r} is not understood; use 1 (test mode) or 0 (the GPU run)")


GPU_PROBE = """
import json, torch
from helpers.profiles import cuda_memory_gib, native_bf16
major, minor = torch.cuda.get_device_capability(0)
print(json.dumps({"name": torch.cuda.get_device_name(0), "memory_gib": round(cuda_memory_gib(), 1),
                  "capability": f"{major}.{minor}", "native_bf16": native_bf16(), "count": torch.cuda.device_count(),
                  "cuda": torch.version.cuda}))
"""


def gpu_facts() -> dict[str, Any] | None:
    """The GPU this run measures (name, memory, compute capability, native bf16), or None without CUDA.

    Asked in a short child process: querying the device creates a CUDA context (hundreds of MiB of GPU memory),
    and this process must not hold one while the steps run (a T4 has 15 GiB for a 7B model).
    """
    if not torch.cuda.is_available():  # does not create a context
        return None
    probe = subprocess.run([sys.executable, "-c", GPU_PROBE], cwd=REPO_ROOT, capture_output=True, text=True,
                           timeout=120, env=base_environment())
    if probe.returncode != 0:
        raise RuntimeError(f"could not query the GPU: {probe.stderr.strip()[-2000:]}")
    return json.loads(probe.stdout.strip().splitlines()[-1])


def plan(*, test_mode: bool, workdir: Path, gpu: dict[str, Any] | None, budget: float = BUDGET_SECONDS,
         python: str = sys.executable, lm_eval: bool | None = None) -> list[Step]:
    """The four steps for this machine: their command lines, environments and time limits.

    ``gpu``: :func:`gpu_facts` (None in test mode). On a GPU with less than :data:`SMALL_GPU_GIB` (a T4) the 7B
    steps use shorter sequences, and a GPU without native bf16 skips the bf16 pipeline (scripts/dpo.py refuses it).
    ``lm_eval``: whether lm-eval is installed (None: look). The stand-ins' width is set in the environment
    (``COURSE_STANDINS``: ``real`` on a GPU, ``1``, the tiny width, in test mode).
    """
    if not test_mode and gpu is None:
        raise RuntimeError(NO_CUDA_MESSAGE)
    lm_eval = importlib.util.find_spec("lm_eval") is not None if lm_eval is None else lm_eval
    limit = {name: TEST_MODE_STEP_TIMEOUT if test_mode else MOST * share * budget for name, share in SHARES.items()}
    reserve = {name: 0.0 if test_mode else RESERVED * share * budget for name, share in SHARES.items()}
    small = not test_mode and gpu["memory_gib"] < SMALL_GPU_GIB
    steps = []
    for precision in ("fp16", "bf16"):
        name, out = f"pipeline_{precision}", workdir / f"pipeline_{precision}"
        argv = [python, "scripts/dpo.py", "--profile", "t4", "--run-id", precision, "--output-dir", str(out)]
        note = None
        if test_mode:
            argv += ["--precision", "fp32", "--max-steps", "1", "--no-eval"]
        elif precision == "fp16":
            argv += ["--precision", precision, "--max-steps", str(PIPELINE_MAX_STEPS),
                     "--lm-eval-limit", str(PIPELINE_LM_EVAL_LIMIT if lm_eval else 0)]
            note = None if lm_eval else NO_LM_EVAL
        else:  # merging and evaluating are the same code in either precision: they run once, in the fp16 step
            argv += ["--precision", precision, "--max-steps", str(PIPELINE_MAX_STEPS), "--no-merge"]
            note = "training only: the merge and the evaluation ran in pipeline_fp16"
        skip = None
        if precision == "bf16" and test_mode:
            skip = "test mode: a CPU trains in neither fp16 nor bf16, and the step before ran this command in fp32"
        elif precision == "bf16" and not gpu["native_bf16"]:
            skip = (f"{gpu['name']} (compute capability {gpu['capability']}) has no native bf16: scripts/dpo.py "
                    "refuses --precision bf16 there, and such a card (a T4) trains in fp16, the step before")
        width = "tiny-width stand-ins, fp32, train + merge" if test_mode else "Qwen2.5-0.5B's real width"
        steps.append(Step(name=name, title=f"scripts/dpo.py --profile t4 --precision {precision} ({width})",
                          argv=argv, timeout_s=limit[name], reserve_s=reserve[name],
                          env={"COURSE_STANDINS": "1" if test_mode else "real"}, skip=skip, note=note, output_dir=out,
                          run_id=precision, expect_eval=not test_mode and precision == "fp16",
                          expect_merge=test_mode or precision == "fp16"))

    step_json = workdir / "dpo_step_7b.json"
    argv = [python, "-m", "benchmarks.gpu", "step", "--json", str(step_json)]
    if test_mode:
        argv.append("--test-mode")
    else:  # training stops by time after half the step's share: imports, building and set-up come first
        argv += ["--steps", str(DPO_STEPS), "--warmup", str(DPO_WARMUP),
                 "--max-train-seconds", f"{0.5 * SHARES['dpo_step_7b'] * budget:.0f}"]
        argv += ["--seq-len", "512"] if small else []
    steps.append(Step("dpo_step_7b", "the full profile's DPO step, Mistral-7B shape in 4-bit (benchmarks.gpu step)",
                      argv, limit["dpo_step_7b"], reserve["dpo_step_7b"], result_json=step_json))

    reference_json = workdir / "reference_7b.json"
    argv = [python, "-m", "benchmarks.gpu", "reference", "--json", str(reference_json)]
    if test_mode:
        argv.append("--test-mode")
    else:  # three fresh processes share the step's time; each trains one warm-up and one timed step
        per_mode = (limit["reference_7b"] - 5) / 3
        argv += ["--steps", "1", "--mode-timeout", f"{per_mode:.0f}", "--max-train-seconds", f"{0.3 * per_mode:.0f}"]
        argv += ["--seq-len", "256"] if small else []
    steps.append(Step("reference_7b", "the reference model three ways, Mistral-7B shape (benchmarks.gpu reference)",
                      argv, limit["reference_7b"], reserve["reference_7b"], result_json=reference_json))
    return steps


def base_environment() -> dict[str, str]:
    """This environment, offline, without progress bars, with the repository first on the import path (a step
    runs scripts/dpo.py by its path; the wheels' folder, where $PYTHONPATH names one, stays on it)."""
    env = {k: v for k, v in os.environ.items() if k not in {"COURSE_OUTPUT_DIR", "COURSE_STANDINS", "COURSE_PROFILE"}}
    env.update(C.WORKER_ENV, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p))
    return env


def step_environment(step: Step, *, test_mode: bool) -> dict[str, str]:
    """The environment a step runs in: :func:`base_environment` and the step's own; test mode: no GPU, and OpenMP
    threads that sleep while they wait (shared CI machines: benchmarks/README.md, finding 1)."""
    env = base_environment()
    if test_mode:
        env.update(CUDA_VISIBLE_DEVICES="", OMP_WAIT_POLICY="PASSIVE")
    env.update(step.env)
    return env


# --------------------------------------------------------------------------------------------- running


def run_command(argv: Sequence[str], *, env: dict[str, str], log_path: Path, timeout: float) -> tuple[int, bool]:
    """Run ``argv`` from the repository root, its output into ``log_path``; returns (exit status, timed out).

    The command runs in its own process group, so that past ``timeout`` seconds it is stopped with everything it
    started (SIGTERM, then SIGKILL 10 s later).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w", encoding="utf-8") as log:
        proc = subprocess.Popen(list(argv), cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            return proc.wait(timeout=timeout), False
        except subprocess.TimeoutExpired:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                    return proc.wait(timeout=10), True
                except ProcessLookupError:
                    return proc.wait(), True
                except subprocess.TimeoutExpired:
                    continue
            return proc.wait(), True


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> list[str]:
    """The last ``lines`` lines of a log (progress-bar carriage returns resolved to their final state)."""
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    return [line.rsplit("\r", 1)[-1] for line in text.splitlines()][-lines:]


def run_step(step: Step, *, test_mode: bool, log_dir: Path, remaining: float | None) -> dict[str, Any]:
    """Run one step (unless skipped or out of time) and judge it: its record for the JSON."""
    record: dict[str, Any] = {"name": step.name, "title": step.title, "command": shlex.join(step.argv),
                              "environment": step.env, **({"note": step.note} if step.note else {})}
    if step.skip:
        return {**record, "status": "skipped", "reason": step.skip}
    if remaining is not None and remaining < MIN_STEP_SECONDS:
        return {**record, "status": "not run", "reason": f"only {max(remaining, 0):.0f} s of the budget left for it"}
    timeout = step.timeout_s if remaining is None else min(step.timeout_s, remaining)
    record["timeout_s"] = round(timeout)
    print(f"      $ {record['command']}   (at most {timeout:.0f} s)", flush=True)
    log_path = log_dir / f"{step.name}.log"
    started = time.perf_counter()
    code, timed_out = run_command(step.argv, env=step_environment(step, test_mode=test_mode), log_path=log_path,
                                  timeout=timeout)
    record.update(seconds=round(time.perf_counter() - started, 1), exit_status=code, log_tail=log_tail(log_path),
                  log=str(log_path))
    try:
        figures, problem = read_figures(step)
    except Exception as exc:  # a file half-written by a step that was stopped: say so, keep going
        figures, problem = {}, f"its output could not be read ({type(exc).__name__}: {exc})"
    record["figures"] = figures
    if timed_out:
        return {**record, "status": "timed out", "reason": f"stopped at its limit of {timeout:.0f} s"}
    if code != 0:
        return {**record, "status": "failed", "reason": f"exited with status {code}"}
    if problem:
        return {**record, "status": "failed", "reason": problem}
    return {**record, "status": "passed"}


def run_steps(steps: Sequence[Step], *, test_mode: bool, log_dir: Path, budget: float | None,
              on_record=None) -> list[dict[str, Any]]:
    """Run ``steps`` one after another; a failure is printed loudly and recorded, and the next step runs all the
    same. ``budget``: seconds for all of them (None: no limit); a step runs for at most its ``timeout_s`` and at most
    what is left of the budget after the ``reserve_s`` of the later steps. ``on_record(records)`` after each step."""
    deadline = None if budget is None else time.perf_counter() + budget
    records: list[dict[str, Any]] = []
    for index, step in enumerate(steps, 1):
        print(f"\n[{index}/{len(steps)}] {step.name}: {step.title}", flush=True)
        later = sum(s.reserve_s for s in steps[index:] if not s.skip)
        remaining = None if deadline is None else deadline - time.perf_counter() - later
        record = run_step(step, test_mode=test_mode, log_dir=log_dir, remaining=remaining)
        records.append(record)
        if record["status"] == "passed":
            print(f"      passed in {record['seconds']:.0f} s: {summary_line(step.name, record['figures'])}"
                  + (f"\n      note: {step.note}" if step.note else ""), flush=True)
        elif record["status"] == "skipped":
            print(f"      skipped: {record['reason']}", flush=True)
        else:
            tail = "\n".join("        " + line for line in record.get("log_tail", [])[-25:])
            print(f"      {record['status'].upper()}: {step.name} {record['reason']}"
                  + (f" after {record['seconds']:.0f} s; the end of its log ({record['log']}):\n{tail}"
                     if "seconds" in record else ""), file=sys.stderr, flush=True)
        if on_record is not None:
            on_record(records)
    return records


# --------------------------------------------------------------------------------------------- figures


def safetensors_dtypes(path: Path) -> list[str]:
    """The dtypes stored in a safetensors file, read from its JSON header (8-byte length, then the header)."""
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return sorted({entry["dtype"] for key, entry in header.items() if key != "__metadata__"})


def pipeline_figures(output_dir: Path, run_id: str, *, expect_eval: bool, expect_merge: bool = True
                     ) -> tuple[dict[str, Any], str | None]:
    """What a scripts/dpo.py run wrote: the training log, the adapter's dtypes and precision, the merge, the scores.

    Returns (figures, problem): ``problem`` names the first expected file that is missing, None when all are there.
    """
    run = output_dir / "runs" / f"t4-{run_id}"
    adapter = run / "adapter" / "adapter_model.safetensors"
    history_path, results_path, profile_path = run / "history.json", run / "eval_results.json", \
        run / "adapter" / "course_profile.json"
    history = json.loads(history_path.read_text()) if history_path.is_file() else []
    figures: dict[str, Any] = {"losses": [row["loss"] for row in history if "loss" in row],
                               "adapter_dtypes": safetensors_dtypes(adapter) if adapter.is_file() else None,
                               "merged": (run / "merged" / "config.json").is_file()}
    if profile_path.is_file():
        dpo = json.loads(profile_path.read_text())["dpo"]
        figures["precision"] = "bf16" if dpo.get("bf16") else "fp16" if dpo.get("fp16") else "fp32"
    if results_path.is_file():
        results = json.loads(results_path.read_text())
        figures.update(heldout_pairs=results["heldout_pairs"], models=results["models"],
                       merge_max_logit_diff=results["merge_max_logit_diff"], lm_eval=results.get("lm_eval"))
    for missing, problem in ((not history, f"no training log ({display_path(history_path)})"),
                             (not adapter.is_file(), f"no adapter ({display_path(adapter)})"),
                             (expect_merge and not figures["merged"], "no merged model"),
                             (expect_eval and not results_path.is_file(), "no eval_results.json")):
        if missing:
            return figures, f"exited 0 but wrote {problem}"
    return figures, None


def gpu_script_figures(path: Path) -> tuple[dict[str, Any], str | None]:
    """The figures a ``benchmarks.gpu`` command wrote with ``--json`` (and whether it says it measured)."""
    if not path.is_file():
        return {}, f"exited 0 but wrote no {display_path(path)}"
    payload = json.loads(path.read_text())
    return payload["figures"], None if payload.get("ok") else "its run reported a failure (a loss not finite?)"


def read_figures(step: Step) -> tuple[dict[str, Any], str | None]:
    """A finished step's figures, and what is missing or wrong in its output (None when nothing)."""
    if step.output_dir is not None:
        return pipeline_figures(step.output_dir, step.run_id or "main", expect_eval=step.expect_eval,
                                expect_merge=step.expect_merge)
    if step.result_json is not None:
        return gpu_script_figures(step.result_json)
    return {}, None


def _peak(r: dict[str, Any]) -> str:
    if r.get("peak_train_gib") is not None:
        return f"{r['peak_train_gib']:.1f} GiB"
    return f"{r['peak_rss_train_mib']:.0f} MiB RSS" if r.get("peak_rss_train_mib") is not None else "-"


def summary_line(name: str, figures: dict[str, Any]) -> str:
    """The figures of one step in one line, for the table."""
    if not figures:
        return "-"
    if name.startswith("pipeline"):
        losses = figures.get("losses") or []
        parts = [f"loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else "no loss logged",
                 f"adapter {'/'.join(figures.get('adapter_dtypes') or ['-'])}"]
        if figures.get("models"):
            base, dpo = figures["models"]["base"], figures["models"]["dpo"]
            parts.append(f"held-out acc {base['accuracy']:.2f} -> {dpo['accuracy']:.2f}, well-formed "
                         f"{base['well_formed']:.0%} -> {dpo['well_formed']:.0%}")
        return "; ".join(parts)
    if name == "dpo_step_7b":
        mfu = f"{figures['mfu']:.0%}" if figures.get("mfu") is not None else "-"
        return (f"{figures['seconds_per_step']:.2f} s/step ({figures['steps_done']} steps), "
                f"{figures['pairs_per_second']:.2f} pairs/s ({figures['vs_anchor']:.1f}x anchor), "
                f"peak {_peak(figures)}, MFU {mfu}")
    if name == "reference_7b":
        parts = []
        for mode, r in figures.get("results", {}).items():
            short = mode.replace("separate_ref", "(a)").replace("peft_precompute", "(c)").replace("peft_ref", "(b)")
            parts.append(f"{short} FAILED" if "error" in r else f"{short} {r['seconds_per_step']:.2f} s {_peak(r)}")
        ratios = [f"{key} {v['ratio']:.2f}" for key, v in figures.get("verdict", {}).items()]
        return ", ".join(parts) + (f"; {', '.join(ratios)}" if ratios else "")
    return "-"


def summary_table(records: Sequence[dict[str, Any]]) -> str:
    """The short table printed at the end: step, status, seconds, figures."""
    rows = [{"step": r["name"], "status": r["status"], "seconds": r.get("seconds"),
             "figures": summary_line(r["name"], r.get("figures") or {}) if r["status"] == "passed"
             else r.get("reason", "")} for r in records]
    return C.format_table(rows, [("step", "step"), ("status", "status"), ("seconds", "s"), ("figures", "figures")])


# --------------------------------------------------------------------------------------------- command line


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """The command line of scripts/gpu_acceptance.sh."""
    parser = argparse.ArgumentParser(prog="scripts/gpu_acceptance.sh", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--test-mode", action="store_true",
                        help=f"the same steps on CPU at tiny sizes (also ${TEST_MODE_ENV_VAR}=1)")
    parser.add_argument("--json", metavar="FILE", default=None,
                        help="where the results go (default benchmarks/results/gpu_acceptance.json; test mode "
                        "gpu_acceptance_test_mode.json)")
    parser.add_argument("--only", default=None, metavar="STEPS",
                        help=f"comma-separated steps to run, of: {', '.join(STEP_NAMES)}")
    parser.add_argument("--budget", type=float, default=BUDGET_SECONDS,
                        help="seconds the steps may take together (%(default).0f); they share it")
    parser.add_argument("--workdir", default=None, help="where the steps write (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the working folder (models, logs) at the end")
    return parser.parse_args(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the acceptance steps, write the JSON (after every step), print the table; the exit status says whether
    all passed."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    try:
        test_mode = args.test_mode or test_mode_requested()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    only = args.only.split(",") if args.only else list(STEP_NAMES)
    unknown = [name for name in only if name not in STEP_NAMES]
    if unknown:
        print(f"error: unknown step(s) {', '.join(unknown)}; the steps are {', '.join(STEP_NAMES)}", file=sys.stderr)
        return 2
    if not test_mode and not torch.cuda.is_available():
        print(f"error: {NO_CUDA_MESSAGE}", file=sys.stderr)
        return 2
    json_path = Path(args.json) if args.json else \
        C.RESULTS_DIR / ("gpu_acceptance_test_mode.json" if test_mode else "gpu_acceptance.json")
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="gpu-acceptance-"))
    workdir.mkdir(parents=True, exist_ok=True)
    budget = None if test_mode else args.budget
    started, started_utc = time.perf_counter(), datetime.now(UTC).isoformat(timespec="seconds")
    payload: dict[str, Any] = {
        "benchmark": "gpu_acceptance", "command": shlex.join(["scripts/gpu_acceptance.sh", *argv]),
        "test_mode": test_mode, "started_utc": started_utc, "budget_seconds": budget, "shares": SHARES,
        "libraries": C.library_versions(), "gpu": None, "all_passed": False, "steps": []}

    def save(records: list[dict[str, Any]]) -> None:
        payload.update(steps=records, wall_seconds=round(time.perf_counter() - started, 1),
                       all_passed=bool(records) and all(r["status"] in {"passed", "skipped"} for r in records))
        write_json(json_path, payload)

    try:
        payload["gpu"] = None if test_mode else gpu_facts()
        steps = [s for s in plan(test_mode=test_mode, workdir=workdir, gpu=payload["gpu"], budget=args.budget)
                 if s.name in only]
        where = "TEST MODE on the CPU (tiny sizes; checks the script, measures nothing)" if test_mode else \
            f"{payload['gpu']['name']} ({payload['gpu']['memory_gib']} GiB), budget {budget:.0f} s for the steps"
        print(f"GPU acceptance run: {where}; working folder {workdir}", flush=True)
        records = run_steps(steps, test_mode=test_mode, log_dir=workdir / "logs", budget=budget, on_record=save)
    except Exception as exc:  # the GPU query or the plan failed: the JSON says what happened
        payload["error"] = f"{type(exc).__name__}: {exc}"
        save(payload["steps"])
        print(f"error: the acceptance run stopped: {payload['error']}; wrote {display_path(json_path)}",
              file=sys.stderr)
        return 1
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    payload["machine"] = C.machine_info()  # after the steps: it creates a CUDA context in this process
    save(records)
    print("\n" + summary_table(records))
    verdict = "all steps passed" if payload["all_passed"] else "NOT ALL STEPS PASSED"
    print(f"\n{verdict} in {payload['wall_seconds']:.0f} s; wrote {display_path(json_path)}", flush=True)
    return 0 if payload["all_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
