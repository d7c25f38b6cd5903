"""Wall time and peak memory of every notebook in notebooks/ (all 11 of them, or whatever the folder holds), tiny
profile, offline, one at a time; and, with ``--jobs 2``, the course command's own run (two at a time).

Each notebook is executed top to bottom with nbclient, in the real notebooks/ folder as its working directory, and
is never written back: the executed copy lives only in memory. The run folders go to a temporary $COURSE_OUTPUT_DIR,
removed at the end (outputs/ is not touched); a notebook that reads another's run folder (scripts/nbtools.py NEEDS:
05 and 10 read 04's, 06 and 09 read 05's) runs after it, so ``--only 06`` runs 04, 05 and 06 and reports all three.

Per notebook: kernel start, "imports/start" (every cell up to and including the ``notebook.start(...)`` cell), the
work (all later cells), the slowest cells, the peak memory (the resident memory of the kernel's process tree,
sampled every 0.1 s, and the kernel's own VmHWM), and its budget: the cpu_seconds of docs/costs.csv, which every
notebook's Cost line states. Target: the whole course, two at a time on 2 cores, within 240 s.

    .venv/bin/python -m benchmarks.course_time                  # every notebook, in name order, one at a time
    .venv/bin/python -m benchmarks.course_time --only 08,11     # those (and what they read), one at a time
    .venv/bin/python -m benchmarks.course_time --jobs 2         # the course command: two at a time, total wall
    .venv/bin/python -m benchmarks.course_time --max-load 2.5   # refuse to start on a busy machine

torch is imported only after this process has set the kernels' environment (threads, OpenMP wait policy), so the
speed probe it runs before and after measures under the same settings as the notebooks.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import threading
import time
from pathlib import Path

from benchmarks import _common as C
from helpers.profiles import REPO_ROOT
from helpers.runs import display_path
from scripts.nbtools import NEEDS, NOTEBOOK_ENV, read_costs, run_course

NAME = "course_time"
TARGET_SECONDS = 240
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
QUICK = ("01_", "02_", "03_")


def with_needs(notebooks: list[Path], wanted: list[Path]) -> list[Path]:
    """``wanted`` and, before them, the notebooks whose run folders they read (NEEDS), in name order."""
    by_stem = {p.stem: p for p in notebooks}
    chosen: set[str] = set()

    def add(stem: str) -> None:
        if stem in by_stem and stem not in chosen:
            chosen.add(stem)
            for need in NEEDS.get(stem, ()):
                add(need)

    for path in wanted:
        add(path.stem)
    return [p for p in notebooks if p.stem in chosen]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{NAME}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="notebooks 01-03 only (they train nothing)")
    parser.add_argument("--only", default=None, help="comma-separated name prefixes, e.g. 06,11 (with what they read)")
    parser.add_argument("--jobs", type=int, default=1, help="notebooks at a time (2: the course command's run)")
    parser.add_argument("--max-load", type=float, default=None, help="refuse to start above this 1-minute load")
    parser.add_argument("--timeout", type=int, default=1200, help="per-cell timeout, seconds")
    parser.add_argument("--omp-wait-policy", choices=["ACTIVE", "PASSIVE"], default=None,
                        help="OMP_WAIT_POLICY for the kernels (default: unset, as the course runs)")
    return parser.parse_args(argv)


class TreeSampler:
    """Samples the summed RSS of a process and all its descendants in a background thread."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.pid: int | None = None
        self.peak_bytes = 0
        self.peak_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> TreeSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            if self.pid is not None:
                try:
                    root = psutil.Process(self.pid)
                    procs = [root, *root.children(recursive=True)]
                    total = 0
                    for proc in procs:
                        try:
                            total += proc.memory_info().rss
                        except psutil.Error:
                            pass
                    if total > self.peak_bytes:
                        self.peak_bytes, self.peak_processes = total, len(procs)
                except psutil.Error:
                    pass
            self._stop.wait(self.interval)


def vm_hwm_mib(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def kernel_pid(client) -> int | None:
    km = getattr(client, "km", None)
    provisioner = getattr(km, "provisioner", None)
    for holder in (provisioner, getattr(provisioner, "process", None)):
        pid = getattr(holder, "pid", None)
        if isinstance(pid, int):
            return pid
    return None


def run_notebook(path: Path, timeout: int) -> dict:
    """Execute one notebook in memory (never saved) and time it cell by cell."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(path, as_version=4)
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    start_index = next((i for i, c in enumerate(code_cells) if "notebook.start(" in c.source), None)
    cell_seconds: dict[int, float] = {}
    marks: dict[str, float] = {}
    sampler = TreeSampler().start()
    hwm = {"kernel": None}

    def on_cell_execute(cell, cell_index, **kwargs):
        marks.setdefault("first_cell", time.perf_counter())
        marks[f"start{cell_index}"] = time.perf_counter()
        if sampler.pid is None:
            sampler.pid = kernel_pid(client)

    def on_cell_executed(cell, cell_index, **kwargs):
        cell_seconds[cell_index] = time.perf_counter() - marks.pop(f"start{cell_index}", time.perf_counter())
        hwm["kernel"] = vm_hwm_mib(sampler.pid) or hwm["kernel"]

    client = NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS_DIR)}},
        on_cell_execute=on_cell_execute, on_cell_executed=on_cell_executed,
    )
    t0 = time.perf_counter()
    error = None
    try:
        client.execute()
    except CellExecutionError as exc:
        error = str(exc).splitlines()[-1] if str(exc) else repr(exc)
    except Exception as exc:  # a dead kernel, a timeout: report it, keep the other notebooks going
        error = f"{type(exc).__name__}: {exc}"
    total = time.perf_counter() - t0
    sampler.stop()

    index_of = {id(c): i for i, c in enumerate(nb.cells)}
    code_index = [index_of[id(c)] for c in code_cells]
    start_cells = code_index[: start_index + 1] if start_index is not None else []
    imports = sum(cell_seconds.get(i, 0.0) for i in start_cells)
    work = sum(s for i, s in cell_seconds.items() if i not in start_cells)
    kernel_start = marks.get("first_cell", t0) - t0
    slowest = sorted(((s, i) for i, s in cell_seconds.items()), reverse=True)[:3]
    return {
        "notebook": path.name,
        "seconds": total,
        "kernel_start_seconds": kernel_start,
        "imports_start_seconds": imports,
        "work_seconds": work,
        "other_seconds": total - kernel_start - imports - work,  # shutdown, message round trips
        "start_cell_found": start_index is not None,
        "code_cells": len(code_cells),
        "executed_cells": len(cell_seconds),
        "slowest_cells": [{"cell": i, "seconds": round(s, 1), "first_line": nb.cells[i].source.splitlines()[0][:80]
                           if nb.cells[i].source else ""} for s, i in slowest],
        "peak_tree_rss_mib": sampler.peak_bytes / C.MIB if sampler.peak_bytes else None,
        "peak_tree_processes": sampler.peak_processes,
        "kernel_vmhwm_mib": hwm["kernel"],
        "error": error,
        "loadavg_end": C.loadavg(),
    }


def main(argv: list[str]) -> int:
    args = parse(argv)
    load_start = C.loadavg()
    if args.max_load is not None and load_start and load_start[0] > args.max_load:
        print(f"load average {load_start} is above --max-load {args.max_load}: not starting (timings would be "
              "inflated by the other work on this machine)")
        return 3
    everything = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
    prefixes = tuple(args.only.split(",")) if args.only else (QUICK if args.quick else None)
    notebooks = with_needs(everything, [p for p in everything if p.name.startswith(prefixes)]) if prefixes \
        else everything
    if not notebooks:
        print("no notebooks to run")
        return 2
    costs = read_costs()

    out_dir = C.temp_folder("bench-course-outputs-")
    env = {
        **NOTEBOOK_ENV,
        "COURSE_OUTPUT_DIR": str(out_dir),
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),  # notebook.start uses one torch thread
        "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
        "JUPYTER_PATH": str(REPO_ROOT / ".venv" / "share" / "jupyter"),
    }
    if args.omp_wait_policy:
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    os.environ.update(env)
    os.environ.pop("TQDM_DISABLE", None)  # keep the notebooks' own behaviour
    import torch  # only now: after the environment above (see the module docstring)

    torch.set_num_threads(2)
    probe_before = C.speed_probe()
    started = time.perf_counter()
    print(f"{len(notebooks)} notebooks, {args.jobs} at a time; outputs in {out_dir}; load average {C.loadavg()}",
          flush=True)
    rows = []
    try:
        if args.jobs > 1:  # the course command itself: whole notebooks, two kernels at a time
            seconds = run_course(notebooks, out_dir, jobs=args.jobs, timeout=args.timeout)
            rows = [{"notebook": f"{name}.ipynb", "seconds": s, "error": None} for name, s in sorted(seconds.items())]
        for path in notebooks if args.jobs == 1 else ():
            print(f"running {path.name} ...", flush=True)
            row = run_notebook(path, args.timeout)
            rows.append(row)
            status = "ok" if not row["error"] else f"FAILED: {row['error']}"
            print(f"  {row['seconds']:.1f} s (kernel {row['kernel_start_seconds']:.1f}, imports/start "
                  f"{row['imports_start_seconds']:.1f}, work {row['work_seconds']:.1f}), peak tree RSS "
                  f"{row['peak_tree_rss_mib'] or 0:.0f} MiB, load {row['loadavg_end']} - {status}", flush=True)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    wall = time.perf_counter() - started
    for row in rows:  # the time each notebook's Cost line states (docs/costs.csv), where it has one
        stated = costs.get(row["notebook"].removesuffix(".ipynb"), {}).get("cpu_seconds")
        row["stated_seconds"] = float(stated) if stated else None
        row["over_stated"] = bool(stated) and row["seconds"] > 1.2 * float(stated)

    total = sum(r["seconds"] for r in rows)
    totals = {"notebook": "TOTAL" if args.jobs == 1 else f"WALL ({args.jobs} at a time)",
              "seconds": total if args.jobs == 1 else wall,
              "stated_seconds": sum(r["stated_seconds"] or 0 for r in rows)}
    for key in ("kernel_start_seconds", "imports_start_seconds", "work_seconds"):
        if args.jobs == 1:
            totals[key] = sum(r[key] for r in rows)
    for key in ("peak_tree_rss_mib", "kernel_vmhwm_mib"):
        if args.jobs == 1:
            totals[key] = max((r[key] or 0) for r in rows)
    complete = not prefixes
    course_seconds = totals["seconds"]
    verdict = {"target_seconds": TARGET_SECONDS, "jobs": args.jobs, "course_seconds": course_seconds,
               "all_notebooks": complete, "notebooks": len(rows),
               "met": complete and args.jobs == 2 and course_seconds <= TARGET_SECONDS
               and not any(r["error"] for r in rows)}
    probe_after = C.speed_probe()
    payload = {
        **C.run_header(NAME, argv, load_start, started),
        "speed_probe_before": probe_before,
        "speed_probe_after": probe_after,
        "environment": {k: v for k, v in env.items() if k not in {"PATH", "PYTHONPATH", "JUPYTER_PATH"}},
        "rows": rows,
        "totals": totals,
        "verdict": verdict,
    }
    name = NAME + (f"_jobs{args.jobs}" if args.jobs > 1 else "") + ("_partial" if prefixes else "") + \
        (f"_omp_{args.omp_wait_policy.lower()}" if args.omp_wait_policy else "")  # never overwrite a full run
    path = C.write_result(name, payload)
    print()
    print(C.format_table([*rows, totals], COLUMNS))
    over = [r["notebook"] for r in rows if r["over_stated"]]
    print(f"\n{len(rows)} notebooks: {course_seconds:.0f} s ({args.jobs} at a time); target <= {TARGET_SECONDS} s for "
          "the course two at a time: " + ("MET" if verdict["met"] else "NOT MET" if complete and args.jobs == 2
                                          else "(not judged: run --jobs 2 on every notebook)")
          + (f"; more than 20% over their Cost line: {', '.join(over)}" if over else ""))
    print(f"load average: start {load_start}, end {payload['loadavg_end']} ({payload['load_note']}); speed probe "
          f"{probe_before:.2f} s before, {probe_after:.2f} s after (0.24 s when the machine was calm)")
    print(f"wrote {display_path(path)}")
    return 0 if not any(r["error"] for r in rows) else 1


COLUMNS = [
    ("notebook", "notebook"),
    ("seconds", "total (s)"),
    ("stated_seconds", "Cost line (s)"),
    ("kernel_start_seconds", "kernel start (s)"),
    ("imports_start_seconds", "imports/start (s)"),
    ("work_seconds", "work (s)"),
    ("peak_tree_rss_mib", "peak RSS, kernel tree (MiB)"),
    ("kernel_vmhwm_mib", "kernel VmHWM (MiB)"),
    ("error", "error"),
]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
