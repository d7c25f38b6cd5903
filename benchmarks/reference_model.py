"""The DPO reference model three ways, on the same model and data, each in a fresh process:

(a) ``separate_ref``: a second copy of the base model loaded as ``ref_model`` (the seed's first version);
(b) ``peft_ref``: ``ref_model=None``, the reference is the policy with its LoRA adapter switched off
    (notebook 04's ``DPOTrainer``, what the course does);
(c) ``peft_precompute``: (b) + ``precompute_ref_log_probs=True``: the reference log-probs are computed in one
    pass before training, so a training step has no reference forward at all.

Reports seconds per step, peak memory (peak RSS while training; on CUDA also max allocated) and the ratios
against (a). Targets: (b) <= 0.6 x the peak memory of (a); (c) >= 1.2 x the steps per second of (b).

    .venv/bin/python -m benchmarks.reference_model            # ~3 min on a loaded 2-core machine
    .venv/bin/python -m benchmarks.reference_model --quick    # smaller model and shorter sequences

(run from the repository root; every configuration trains with notebook 04's ``DPOTrainer``
(``benchmarks._common.dpo_trainer``), (a) with ``ref_model=`` a second loaded copy)
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from dataclasses import asdict

from benchmarks import _common as C
from helpers.runs import display_path

NAME = "reference_model"
MEMORY_TARGET = 0.6  # (b) peak / (a) peak
SPEED_TARGET = 1.2  # (c) steps/s / (b) steps/s


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{NAME}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 layers, 128 tokens, one timed step")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 128; quick 96)")
    parser.add_argument("--batch", type=int, default=2, help="pairs per step (each pair = 2 sequences)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 3, median taken; quick 1)")
    parser.add_argument("--fp32", action="store_true", help="fp32 base model instead of 4-bit NF4")
    parser.add_argument("--modes", default="separate_ref,peft_ref,peft_precompute")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the configurations this many times, alternating the order (a b c, c b a, ...), "
                        "and pool their timed steps: on a shared machine this spreads the disturbances over all")
    parser.add_argument("--allow-cpu-packing", action="store_true",
                        help="let bitsandbytes repack NF4 weights for its CPU inference kernel (breaks the backward "
                        "pass after (c)'s precompute; see helpers.models.keep_nf4_trainable)")
    return parser.parse_args(argv)


def model_spec(quick: bool) -> C.BenchModel:
    return C.BenchModel(num_hidden_layers=4) if quick else C.BenchModel()


def main(argv: list[str]) -> int:
    args = parse(argv)
    seq_len = args.seq_len or (96 if args.quick else 128)
    steps = args.steps or (1 if args.quick else 3)
    warmup = args.warmup
    started, load_start = time.perf_counter(), C.loadavg()
    spec = model_spec(args.quick)
    folder = C.temp_folder("bench-refmodel-")
    try:
        print(f"building the benchmark model ({spec.hidden_size} hidden, {spec.num_hidden_layers} layers) ...",
              flush=True)
        facts = C.build_bench_model(folder, spec)
        print(f"  {facts['parameters']:,} parameters; load average {C.loadavg()}", flush=True)
        modes = args.modes.split(",")
        runs: dict[str, list[dict]] = {mode: [] for mode in modes}
        for repeat in range(args.repeat):
            for mode in modes if repeat % 2 == 0 else modes[::-1]:
                job = {"model_dir": str(folder), "mode": mode, "seq_len": seq_len, "batch": args.batch,
                       "warmup": warmup, "steps": steps, "four_bit": not args.fp32, "lora_r": 16,
                       "cpu_packing": args.allow_cpu_packing}
                print(f"running {mode}: {C.REFERENCE_MODES[mode]} ...", flush=True)
                r = C.run_worker(f"benchmarks.{NAME}", job)
                runs[mode].append(r)
                report(r)
        results = {mode: pool(mode_runs) for mode, mode_runs in runs.items()}
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    rows, summary = summarise(results)
    payload = {
        **C.run_header(NAME, argv, load_start, started),
        "model": facts,
        "settings": {"seq_len": seq_len, "batch_pairs": args.batch, "warmup_steps": warmup, "repeat": args.repeat,
                     "cpu_nf4_packing": args.allow_cpu_packing,
                     "timed_steps": steps, "base_weights": "fp32" if args.fp32 else "4-bit NF4 (compute fp32)",
                     "lora_r": 16, "gradient_checkpointing": True, "loss": "sigmoid DPO",
                     "spec": asdict(spec)},
        "modes": C.REFERENCE_MODES,
        "results": results,
        "rows": rows,
        "summary": summary,
    }
    path = C.write_result(NAME, payload)
    print()
    print(table(rows))
    print()
    for line in summary["statements"]:
        print("- " + line)
    print(f"\nload average: start {load_start}, end {payload['loadavg_end']} ({payload['load_note']})")
    print(f"wrote {display_path(path)} in {payload['wall_seconds']:.0f} s")
    return 0 if all("error" not in r for r in results.values()) else 1


def report(r: dict) -> None:
    if "error" in r:
        print(f"  FAILED: {r['error']}\n{r['log_tail']}", flush=True)
    else:
        print(f"  {r['seconds_per_step']:.2f} s/step (steps {r['step_seconds_all']}), peak {r['peak_train_mib']:.0f} "
              f"MiB while training (load average {r['loadavg_end']})", flush=True)


def pool(runs: list[dict]) -> dict:
    """One result from repeated runs of a configuration: timed steps pooled (median, best), memory medians."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]
    if len(ok) == 1:
        return ok[0]
    merged = dict(ok[-1])
    warmup = ok[0]["job"]["warmup"]
    wall = [s for r in ok for s in r["step_seconds_all"][warmup:]]
    cpu = [s for r in ok for s in r["cpu_seconds_all"][warmup:]]
    merged.update(seconds_per_step=C.median(wall), min_seconds_per_step=min(wall), cpu_seconds_per_step=C.median(cpu),
                  min_cpu_seconds_per_step=min(cpu))
    for key in ("peak_train_mib", "rss_after_imports_mib", "rss_after_setup_mib", "rss_after_load_mib",
                "speed_probe_before", "speed_probe_after", "trainer_setup_seconds", "load_seconds"):
        merged[key] = C.median([r[key] for r in ok])
    merged["step_seconds_all"] = [s for r in ok for s in r["step_seconds_all"]]
    merged["runs"] = ok
    return merged


COLUMNS = [
    ("label", "configuration"),
    ("seconds_per_step", "s/step (wall, median)"),
    ("min_seconds_per_step", "best s/step"),
    ("steps_per_second", "steps/s"),
    ("speed_vs_a", "speed vs (a)"),
    ("cpu_seconds_per_step", "CPU s/step"),
    ("cpu_speed_vs_a", "CPU-time speed vs (a)"),
    ("speed_probe", "speed probe (s)"),
    ("peak_train_mib", "peak RSS training (MiB)"),
    ("peak_vs_a", "peak vs (a)"),
    ("above_imports_mib", "peak above imports (MiB)"),
    ("above_imports_vs_a", "above-imports vs (a)"),
    ("setup_seconds", "load + set-up (s)"),
    ("loadavg", "load avg (1 min, end)"),
]


def summarise(results: dict) -> tuple[list[dict], dict]:
    """Rows for the table (ratios against (a)) and the target verdicts, with the reasons."""
    ok = {k: v for k, v in results.items() if "error" not in v}
    rows = []
    base = ok.get("separate_ref")
    for mode, r in ok.items():
        row = {
            "mode": mode,
            "label": {"separate_ref": "(a) separate ref_model", "peft_ref": "(b) adapter off (ref_model=None)",
                      "peft_precompute": "(c) (b) + precompute_ref_log_probs"}[mode],
            "seconds_per_step": r["seconds_per_step"],
            "steps_per_second": 1 / r["seconds_per_step"],
            "min_seconds_per_step": r["min_seconds_per_step"],
            "cpu_seconds_per_step": r["cpu_seconds_per_step"],
            "speed_probe": (r["speed_probe_before"] + r["speed_probe_after"]) / 2,
            "peak_train_mib": r["peak_train_mib"],
            "above_imports_mib": r["peak_train_mib"] - r["rss_after_imports_mib"],
            "setup_seconds": r["load_seconds"] + r["trainer_setup_seconds"],
            "precompute_included_in_setup": mode == "peft_precompute",
            "loadavg": r["loadavg_end"][0] if r["loadavg_end"] else None,
        }
        if base:
            row["speed_vs_a"] = base["seconds_per_step"] / r["seconds_per_step"]
            row["cpu_speed_vs_a"] = base["cpu_seconds_per_step"] / r["cpu_seconds_per_step"]
            row["peak_vs_a"] = r["peak_train_mib"] / base["peak_train_mib"]
            row["above_imports_vs_a"] = row["above_imports_mib"] / (
                base["peak_train_mib"] - base["rss_after_imports_mib"]
            )
        rows.append(row)
    by = {row["mode"]: row for row in rows}
    statements, verdict = [], {}
    if "separate_ref" in by and "peft_ref" in by:
        a, b = ok["separate_ref"], ok["peft_ref"]
        ratio = by["peft_ref"]["peak_vs_a"]
        ratio_above = by["peft_ref"]["above_imports_vs_a"]
        saved = a["peak_train_mib"] - b["peak_train_mib"]
        copy = a["model_footprint_mib"]
        verdict["memory_b_vs_a"] = {"target": f"<= {MEMORY_TARGET}", "ratio": ratio,
                                    "ratio_above_imports": ratio_above, "met": ratio <= MEMORY_TARGET}
        statements.append(
            f"memory: (b) peaks at {ratio:.2f} x (a) ({b['peak_train_mib']:.0f} vs {a['peak_train_mib']:.0f} MiB; "
            f"{ratio_above:.2f} x counting only what the run adds above the {b['rss_after_imports_mib']:.0f} MiB "
            f"the imported libraries take) - target <= {MEMORY_TARGET}: "
            + ("MET" if ratio <= MEMORY_TARGET else "NOT MET")
            + f". (b) saves {saved:.0f} MiB; one copy of the base model is {copy:.0f} MiB (get_memory_footprint). "
            "With LoRA, (a) holds only one extra frozen copy of the base weights: the ratio can only "
            "approach 0.5 when those weights are nearly all of the memory, which they are not here (the Python "
            "libraries, the optimizer, activations and allocator slack are paid once by both)."
        )
    if "peft_ref" in by and "peft_precompute" in by:
        b, c = ok["peft_ref"], ok["peft_precompute"]
        speed = b["seconds_per_step"] / c["seconds_per_step"]
        cpu_speed = b["cpu_seconds_per_step"] / c["cpu_seconds_per_step"]
        best_speed = b["min_seconds_per_step"] / c["min_seconds_per_step"]
        verdict["speed_c_vs_b"] = {"target": f">= {SPEED_TARGET}", "ratio": speed, "cpu_time_ratio": cpu_speed,
                                   "best_step_ratio": best_speed, "met": speed >= SPEED_TARGET,
                                   "met_by_best_step": best_speed >= SPEED_TARGET}
        pre = c["trainer_setup_seconds"] - b["trainer_setup_seconds"]
        total_steps = c["job"]["warmup"] + c["job"]["steps"]
        statements.append(
            f"speed: (c) runs {speed:.2f} x the steps per second of (b) ({c['seconds_per_step']:.2f} vs "
            f"{b['seconds_per_step']:.2f} s/step) - target >= {SPEED_TARGET}: "
            + ("MET" if speed >= SPEED_TARGET else "NOT MET")
            + f" (best step against best step: {best_speed:.2f} x; by CPU time per step: {cpu_speed:.2f} x)"
            + f". The precompute pass cost about {pre:.1f} s up front for {total_steps * c['job']['batch']} pairs "
            f"({pre / max(total_steps, 1):.2f} s per step's worth of pairs): it saves the reference forward of "
            "every step but spends one forward per pair of the whole dataset before training, so it only pays "
            "when training sees each pair at least about once (the recipe's 200 x 16 = 3,200 pairs are a quarter "
            "of Intel/orca_dpo_pairs' ~12,900, so there it would cost more than it saves unless the data is cut "
            "to the pairs actually used)."
        )
    if "separate_ref" in by and "peft_ref" in by:
        rel = by["peft_ref"].get("speed_vs_a", float("nan"))
        statements.append(
            f"time: (a) and (b) both run one reference forward per step; (b) runs at {rel:.2f} x the speed of (a). "
            "(b)'s reference pass goes through PEFT's LoRA wrappers with the adapter switched off, and TRL switches "
            "gradient checkpointing off and on around it; (a)'s goes through a plain second model. Either way the "
            "reference costs a forward per step: only (c) removes it."
        )
    packed = {m: r.get("policy_packed_nf4_layers", 0) for m, r in ok.items()}
    if any(packed.values()):
        statements.append(
            "WARNING: bitsandbytes repacked the policy's NF4 layers for its CPU inference kernel in "
            + ", ".join(f"{m} ({n} layers)" for m, n in packed.items() if n)
            + ": that kernel has no backward, so those runs trained with wrong gradients and their step times "
            "are not comparable (run without --allow-cpu-packing)."
        )
    return rows, {"verdict": verdict, "statements": statements}


def table(rows: list[dict]) -> str:
    return C.format_table(rows, COLUMNS)


if __name__ == "__main__":
    if not C.worker_entry(sys.argv[1:], C.dpo_worker):
        sys.exit(main(sys.argv[1:]))
