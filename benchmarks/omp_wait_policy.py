"""How much OpenMP's wait policy matters for a DPO step on a busy 2-core machine.

The course runs torch with 2 threads on 2 cores (helpers.notebook.start, scripts/run_course.sh). libgomp's default
makes a thread that waits for the other one spin (ACTIVE); when another process holds the other core, every
parallel region can cost a scheduler time slice. PASSIVE lets waiting threads sleep. This runs configuration (b)
of reference_model.py (the course's: 4-bit NF4, ref_model=None) alternately with ACTIVE and PASSIVE, each in a
fresh process, and reports the step times and the speed probe of each run.

    .venv/bin/python -m benchmarks.omp_wait_policy            # ACTIVE, PASSIVE, PASSIVE, ACTIVE
    .venv/bin/python -m benchmarks.omp_wait_policy --quick    # ACTIVE, PASSIVE
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time

from benchmarks import _common as C

NAME = "omp_wait_policy"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{NAME}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    order = ["ACTIVE", "PASSIVE"] if args.quick else ["ACTIVE", "PASSIVE", "PASSIVE", "ACTIVE"]
    started, load_start = time.perf_counter(), C.loadavg()
    spec = C.BenchModel()
    folder = C.temp_folder("bench-omp-")
    runs = []
    try:
        facts = C.build_bench_model(folder, spec)
        for policy in order:
            job = {"model_dir": str(folder), "mode": "peft_ref", "seq_len": 128, "batch": 2, "warmup": 1,
                   "steps": 3, "four_bit": True, "lora_r": 16}
            print(f"running (b) with OMP_WAIT_POLICY={policy} ...", flush=True)
            r = C.run_worker(f"benchmarks.{NAME}", job, omp_wait_policy=policy)
            r["policy"] = policy
            runs.append(r)
            if "error" in r:
                print(f"  FAILED: {r['error']}\n{r['log_tail']}", flush=True)
            else:
                print(f"  steps {r['step_seconds_all']} s, CPU {r['cpu_seconds_all']} s, speed probe "
                      f"{r['speed_probe_before']:.2f}/{r['speed_probe_after']:.2f} s, load {r['loadavg_end']}",
                      flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    rows = [{"policy": r["policy"], "seconds_per_step": r["seconds_per_step"],
             "min_seconds_per_step": r["min_seconds_per_step"], "cpu_seconds_per_step": r["cpu_seconds_per_step"],
             "speed_probe": (r["speed_probe_before"] + r["speed_probe_after"]) / 2,
             "loadavg": r["loadavg_end"][0] if r["loadavg_end"] else None}
            for r in runs if "error" not in r]
    summary = {}
    for policy in ("ACTIVE", "PASSIVE"):
        mine = [row["seconds_per_step"] for row in rows if row["policy"] == policy]
        if mine:
            summary[policy] = C.median(mine)
    payload = {**C.run_header(NAME, argv, load_start, started),
               "model": facts, "runs": runs, "rows": rows, "median_seconds_per_step": summary}
    C.write_result(NAME, payload)
    print()
    print(C.format_table(rows, [("policy", "OMP_WAIT_POLICY"), ("seconds_per_step", "s/step (median)"),
                                ("min_seconds_per_step", "best s/step"), ("cpu_seconds_per_step", "CPU s/step"),
                                ("speed_probe", "speed probe (s)"), ("loadavg", "load avg (1 min)")]))
    if len(summary) == 2:
        print(f"\nACTIVE / PASSIVE step time: {summary['ACTIVE'] / summary['PASSIVE']:.2f} x "
              f"(load average {load_start} -> {payload['loadavg_end']})")
    return 0


if __name__ == "__main__":
    if not C.worker_entry(sys.argv[1:], C.dpo_worker):
        sys.exit(main(sys.argv[1:]))
