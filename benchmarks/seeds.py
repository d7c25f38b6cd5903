"""Run a notebook's comparison over several seeds and commit the spread, so its text claims only what holds for all.

A notebook that ranks runs (06: plain DPO vs sigmoid + SFT; 08: the losses and the beta sweep; 10: off-policy vs
on-policy rounds; 11: filtered vs all pairs) takes a ``SEED`` parameter and writes its rows to
``<run folder>/<NN>_results.json`` as ``{"rows": {run: {metric: value}}}``. This script executes the notebook itself
(and the notebooks whose run folders it reads, with the same seed) once per seed, on the tiny profile, offline, in a
scratch output folder, two seeds at a time (one core each), and writes

    benchmarks/results/seeds_<NN>.json   {"rows": {run: {metric: [one value per seed]}}, "seeds": [...], ...}

which the notebook shows beside its own single run (helpers.plots.plot_with_spread).

    python -m benchmarks.seeds 08                 # seeds 1 2 3 4 5
    python -m benchmarks.seeds 06 --seeds 1 2 3 --jobs 1
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

from helpers.profiles import REPO_ROOT
from scripts.nbtools import NEEDS, NOTEBOOK_ENV, execute_copy

RESULTS = REPO_ROOT / "benchmarks" / "results"
SEEDS = (1, 2, 3, 4, 5)


def notebook_path(number: str) -> Path:
    """``notebooks/<number>_*.ipynb`` for a two-digit number."""
    found = sorted((REPO_ROOT / "notebooks").glob(f"{number}_*.ipynb"))
    if len(found) != 1:
        raise SystemExit(f"no single notebook numbered {number!r} in notebooks/")
    return found[0]


def chain(path: Path) -> list[Path]:
    """The notebook and, before it, the ones whose run folders it reads (scripts/nbtools.py NEEDS), in order."""
    before = [p for name in NEEDS.get(path.stem, ()) for p in chain(REPO_ROOT / "notebooks" / f"{name}.ipynb")]
    return list(dict.fromkeys([*before, path]))


def run_seed(path: Path, seed: int, scratch: Path) -> dict:
    """Execute the chain for one seed in ``scratch`` and return the notebook's rows."""
    outputs = scratch / f"seed{seed}"
    env = {**NOTEBOOK_ENV, "COURSE_OUTPUT_DIR": str(outputs), "MPLBACKEND": "Agg", "TQDM_DISABLE": "1"}
    parameters = {"SEED": seed, "RUN_ID": f"seed{seed}"}
    for step in chain(path):
        started = time.perf_counter()
        execute_copy(step, outputs / "executed" / step.name, parameters=parameters, env=env)
        print(f"seed {seed}: {step.stem} in {time.perf_counter() - started:.0f} s", flush=True)
    found = sorted(outputs.glob(f"runs/tiny-seed{seed}*/{path.stem[:2]}_results.json"))
    if not found:
        raise RuntimeError(f"{path.name} wrote no {path.stem[:2]}_results.json under {outputs}/runs")
    return json.loads(found[0].read_text())["rows"]


def collect(rows_per_seed: list[dict]) -> dict[str, dict[str, list[float]]]:
    """``{run: {metric: [value per seed]}}`` from each seed's ``{run: {metric: value}}`` (numbers only)."""
    merged: dict[str, dict[str, list[float]]] = {}
    for rows in rows_per_seed:
        for run, metrics in rows.items():
            for key, value in metrics.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    merged.setdefault(run, {}).setdefault(key, []).append(float(value))
    return merged


def main(argv: list[str] | None = None) -> int:
    """Command line: the notebook's number, the seeds, how many at a time."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebook", help="two-digit number, e.g. 08")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--jobs", type=int, default=2, help="seeds at a time (one CPU core each)")
    args = parser.parse_args(argv)
    path = notebook_path(args.notebook)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="course-seeds-") as scratch, ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda s: run_seed(path, s, Path(scratch)), args.seeds))
    result = {
        "notebook": path.stem, "profile": "tiny", "seeds": args.seeds, "rows": collect(rows),
        "command": f"python -m benchmarks.seeds {args.notebook} --seeds {' '.join(map(str, args.seeds))}",
        "date": datetime.now(UTC).strftime("%Y-%m-%d"), "seconds": round(time.perf_counter() - started),
        "host": {"machine": platform.machine(), "python": platform.python_version(),
                 **{name: version(name) for name in ("torch", "transformers", "trl", "peft")}},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"seeds_{args.notebook}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out.relative_to(REPO_ROOT)} ({len(args.seeds)} seeds, {result['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
