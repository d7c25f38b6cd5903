"""How a DPO step scales: seconds per step and peak memory as the sequence length doubles (256 -> 2048) and as
the LoRA rank changes (8, 16, 64), on the benchmark model of reference_model.py (Mistral-shaped, 4-bit NF4,
the course's configuration: ref_model=None with the adapter switched off, gradient checkpointing on).

Every point runs in a fresh process (so its peak RSS is its own). One pair (= a chosen and a rejected
sequence of exactly that many tokens) per step. Writes results/scaling.json and results/scaling.png.

    .venv/bin/python -m benchmarks.scaling            # 256, 512, 1024, 2048 tokens; ranks 8, 16, 64
    .venv/bin/python -m benchmarks.scaling --quick    # lengths capped at 1024 (2048 is minutes per step here)
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

from benchmarks import _common as C
from helpers.runs import display_path

NAME = "scaling"
BASE_RANK = 16  # the recipe's r
BASE_LENGTH = 256


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{NAME}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="cap the sequence length at 1024")
    parser.add_argument("--lengths", default=None, help="comma-separated lengths (default 256,512,1024,2048)")
    parser.add_argument("--ranks", default="8,16,64", help="comma-separated LoRA ranks, run at 256 tokens")
    parser.add_argument("--batch", type=int, default=1, help="pairs per step")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=1, help="timed steps per point")
    return parser.parse_args(argv)


def growth(points: list[dict], x_key: str, y_key: str) -> list[float]:
    """Log2 slope between successive points: 1.0 = linear in x, 2.0 = quadratic, 0.0 = flat."""
    slopes = []
    for p, q in zip(points, points[1:]):
        if p.get(y_key) and q.get(y_key) and p[y_key] > 0 and q[y_key] > 0:
            slopes.append(math.log(q[y_key] / p[y_key]) / math.log(q[x_key] / p[x_key]))
    return slopes


def main(argv: list[str]) -> int:
    args = parse(argv)
    lengths = [int(x) for x in (args.lengths or ("256,512,1024" if args.quick else "256,512,1024,2048")).split(",")]
    ranks = [int(x) for x in args.ranks.split(",")]
    started, load_start = time.perf_counter(), C.loadavg()
    spec = C.BenchModel()
    folder = C.temp_folder("bench-scaling-")
    jobs = [("length", n, BASE_RANK) for n in lengths] + [("rank", BASE_LENGTH, r) for r in ranks if r != BASE_RANK]
    results: dict[str, dict] = {}
    try:
        print(f"building the benchmark model ({spec.hidden_size} hidden, {spec.num_hidden_layers} layers) ...",
              flush=True)
        facts = C.build_bench_model(folder, spec)
        print(f"  {facts['parameters']:,} parameters; load average {C.loadavg()}", flush=True)
        for _sweep, seq_len, rank in jobs:
            key = f"L{seq_len}_r{rank}"
            if key in results:
                continue
            job = {"model_dir": str(folder), "mode": "peft_ref", "seq_len": seq_len, "batch": args.batch,
                   "warmup": args.warmup, "steps": args.steps, "four_bit": True, "lora_r": rank}
            print(f"running {seq_len} tokens, r={rank} ...", flush=True)
            r = C.run_worker(f"benchmarks.{NAME}", job, timeout=3600)
            results[key] = r
            if "error" in r:
                print(f"  FAILED: {r['error']}\n{r['log_tail']}", flush=True)
            else:
                print(f"  {r['seconds_per_step']:.1f} s/step ({r['cpu_seconds_per_step']:.1f} CPU s), peak "
                      f"{r['peak_train_mib']:.0f} MiB (load average {r['loadavg_end']})", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    def row(key: str) -> dict | None:
        r = results.get(key)
        if not r or "error" in r:
            return None
        return {
            "seq_len": r["job"]["seq_len"], "lora_r": r["job"]["lora_r"],
            "tokens_per_step": r["tokens_per_step"],
            "seconds_per_step": r["seconds_per_step"], "cpu_seconds_per_step": r["cpu_seconds_per_step"],
            "peak_train_mib": r["peak_train_mib"],
            "above_imports_mib": r["peak_train_mib"] - r["rss_after_imports_mib"],
            "step_peak_above_setup_mib": r["peak_train_mib"] - r["rss_after_setup_mib"],
            "trainable_parameters": r["trainable_parameters"],
            "speed_probe": (r["speed_probe_before"] + r["speed_probe_after"]) / 2,
            "loadavg": r["loadavg_end"][0] if r["loadavg_end"] else None,
        }

    length_rows = [x for x in (row(f"L{n}_r{BASE_RANK}") for n in lengths) if x]
    rank_rows = [x for x in (row(f"L{BASE_LENGTH}_r{r}") for r in ranks) if x]
    statements = describe(length_rows, rank_rows, spec)
    png = plot(length_rows, rank_rows)
    payload = {
        **C.run_header(NAME, argv, load_start, started),
        "model": facts,
        "settings": {"batch_pairs": args.batch, "warmup_steps": args.warmup, "timed_steps": args.steps,
                     "base_weights": "4-bit NF4 (compute fp32)", "reference": "adapter off (ref_model=None)",
                     "gradient_checkpointing": True, "lengths": lengths, "ranks": ranks,
                     "capped_at_1024": args.quick and not args.lengths, "spec": asdict(spec)},
        "results": results,
        "length_rows": length_rows,
        "rank_rows": rank_rows,
        "growth": {
            "time_vs_length": growth(length_rows, "seq_len", "seconds_per_step"),
            "cpu_time_vs_length": growth(length_rows, "seq_len", "cpu_seconds_per_step"),
            "step_memory_vs_length": growth(length_rows, "seq_len", "step_peak_above_setup_mib"),
        },
        "statements": statements,
        "plot": display_path(png) if png else None,
    }
    path = C.write_result(NAME, payload)
    print()
    print(tables(length_rows, rank_rows))
    print()
    for line in statements:
        print("- " + line)
    print(f"\nload average: start {load_start}, end {payload['loadavg_end']} ({payload['load_note']})")
    print(f"wrote {display_path(path)}" + (f" and {payload['plot']}" if png else "")
          + f" in {payload['wall_seconds']:.0f} s")
    return 0 if all("error" not in r for r in results.values()) else 1


COLUMNS = [
    ("seq_len", "tokens/sequence"),
    ("lora_r", "LoRA r"),
    ("tokens_per_step", "tokens/step"),
    ("seconds_per_step", "s/step (wall)"),
    ("cpu_seconds_per_step", "CPU s/step"),
    ("peak_train_mib", "peak RSS (MiB)"),
    ("step_peak_above_setup_mib", "step peak above set-up (MiB)"),
    ("trainable_parameters", "trainable params"),
    ("speed_probe", "speed probe (s)"),
    ("loadavg", "load avg (1 min)"),
]


def tables(length_rows: list[dict], rank_rows: list[dict]) -> str:
    return (
        "sequence length (r=16):\n" + C.format_table(length_rows, COLUMNS)
        + f"\n\nLoRA rank ({BASE_LENGTH} tokens):\n" + C.format_table(rank_rows, COLUMNS)
    )


def attention_share(spec: C.BenchModel, seq_len: int) -> float:
    """The share of a forward pass's matmul FLOPs spent on attention scores and their weighted sum.

    Per layer: QK^T and AV are 2 * 2 * L^2 * hidden FLOPs (halved by causal masking when the kernel skips the
    masked half); projections and MLP are 2 * L * (2 h^2 + 2 h * kv + 3 h * ffn); the lm_head adds
    2 * L * h * vocab once. Linear terms grow with L, the attention term with L^2.
    """
    h, ffn, layers = spec.hidden_size, spec.intermediate_size, spec.num_hidden_layers
    kv = h * spec.num_key_value_heads // spec.num_attention_heads
    linear = layers * 2 * seq_len * (2 * h * h + 2 * h * kv + 3 * h * ffn) + 2 * seq_len * h * spec.vocab_size
    attention = layers * 4 * seq_len * seq_len * h / 2  # causal: half the score matrix is needed
    return attention / (attention + linear)


def _kind(slope: float) -> str:
    if slope < 0.5:
        return "roughly flat"
    if slope < 1.1:
        return "about linear"
    if slope < 1.35:
        return "slightly faster than linear"
    if slope < 1.75:
        return "between linear and quadratic"
    return "about quadratic"


def describe(length_rows: list[dict], rank_rows: list[dict], spec: C.BenchModel) -> list[str]:
    """Plain statements of what grows how, from the measured slopes (log-log, per doubling)."""
    out = []
    if len(length_rows) >= 2:
        t = growth(length_rows, "seq_len", "seconds_per_step")
        ct = growth(length_rows, "seq_len", "cpu_seconds_per_step")
        m = growth(length_rows, "seq_len", "step_peak_above_setup_mib")
        first, last = length_rows[0], length_rows[-1]
        factor = last["seq_len"] / first["seq_len"]
        shares = ", ".join(f"{r['seq_len']}: {attention_share(spec, r['seq_len']):.0%}" for r in length_rows)
        mean_ct = sum(ct) / len(ct)
        predicted = [
            math.log2((q["seq_len"] / (1 - attention_share(spec, q["seq_len"])))
                      / (p["seq_len"] / (1 - attention_share(spec, p["seq_len"]))))
            for p, q in zip(length_rows, length_rows[1:])
        ]
        out.append(
            f"time: {first['seq_len']} -> {last['seq_len']} tokens ({factor:.0f} x) multiplies the step time by "
            f"{last['seconds_per_step'] / first['seconds_per_step']:.1f} x (CPU time "
            f"{last['cpu_seconds_per_step'] / first['cpu_seconds_per_step']:.1f} x); log-log slopes per doubling "
            f"{', '.join(f'{s:.2f}' for s in t)} (wall), {', '.join(f'{s:.2f}' for s in ct)} (CPU) - "
            f"{_kind(mean_ct)} on average (1 = linear, 2 = quadratic). Attention's share of the matmul FLOPs "
            f"(estimated from the shape, causal) is {shares}, which alone would give slopes "
            f"{', '.join(f'{s:.2f}' for s in predicted)}: the projections, MLP and the 32,000-wide lm_head are "
            "linear in the length and dominate; whatever the measured slopes exceed that by is per-step cost that "
            "grows with the size of the activations (memory traffic, larger temporaries), not broken down here."
        )
        mean_m = sum(m) / len(m) if m else float("nan")
        out.append(
            f"memory: the step's own peak (above what the loaded model and trainer already hold) goes "
            f"{first['step_peak_above_setup_mib']:.0f} -> {last['step_peak_above_setup_mib']:.0f} MiB; slopes "
            f"{', '.join(f'{s:.2f}' for s in m)} - {_kind(mean_m)}. The math of attention is quadratic, but SDPA "
            "(PyTorch's fused CPU kernel; these sequences have no padding, so no mask tensor) never keeps the "
            "L x L score matrix, and gradient checkpointing keeps one layer's activations at a time; what grows is "
            "per-token: the lm_head's log-probs over the 32,000-token vocabulary (tokens x 32,000 x 4 bytes per "
            "temporary) and the checkpointed layer inputs. Whole-process peak RSS grows less than proportionally "
            f"({first['peak_train_mib']:.0f} -> {last['peak_train_mib']:.0f} MiB) because the libraries and the "
            "model are a fixed part."
        )
    if len(rank_rows) >= 2:
        lo, hi = rank_rows[0], rank_rows[-1]
        out.append(
            f"LoRA rank {lo['lora_r']} -> {hi['lora_r']}: trainable parameters {lo['trainable_parameters']:,} -> "
            f"{hi['trainable_parameters']:,} ({hi['trainable_parameters'] / lo['trainable_parameters']:.0f} x, "
            f"linear in r); step time {lo['seconds_per_step']:.1f} -> {hi['seconds_per_step']:.1f} s (CPU "
            f"{lo['cpu_seconds_per_step']:.1f} -> {hi['cpu_seconds_per_step']:.1f} s); peak RSS "
            f"{lo['peak_train_mib']:.0f} -> {hi['peak_train_mib']:.0f} MiB. The adapter, its gradients and AdamW's "
            f"two moments take {hi['trainable_parameters'] * 16 / C.MIB:.0f} MiB at r={hi['lora_r']} (16 bytes "
            "per parameter at most) and its matmuls are thin (r << hidden), so the rank should move time and "
            "memory little next to the frozen model and the activations; differences within the noise of a "
            "loaded machine mean exactly that."
        )
    return out


def plot(length_rows: list[dict], rank_rows: list[dict]) -> Path | None:
    """Three panels: step time vs length (log-log, with linear and quadratic guides), the step's own peak memory
    vs length (log-log, linear guide), and step time and peak RSS vs LoRA rank."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    if length_rows:
        x = [r["seq_len"] for r in length_rows]
        ax = axes[0]
        for key, style, label in (("seconds_per_step", "o-", "s/step (wall)"), ("cpu_seconds_per_step", "s--",
                                                                               "CPU s/step")):
            ax.loglog(x, [r[key] for r in length_rows], style, base=2, label=label)
        t0 = length_rows[0]["cpu_seconds_per_step"]
        ax.loglog(x, [t0 * v / x[0] for v in x], ":", color="grey", base=2, label="linear (from first CPU point)")
        ax.loglog(x, [t0 * (v / x[0]) ** 2 for v in x], ":", color="black", base=2, label="quadratic")
        ax.set_xlabel("tokens per sequence")
        ax.set_ylabel("seconds per step")
        ax.set_title("step time vs length (r=16, 1 pair/step)")
        ax.legend(fontsize=7)
        ax = axes[1]
        m = [r["step_peak_above_setup_mib"] for r in length_rows]
        ax.loglog(x, m, "^-", color="tab:red", base=2, label="step peak above set-up")
        ax.loglog(x, [r["peak_train_mib"] for r in length_rows], "v-", color="tab:purple", base=2,
                  label="whole-process peak RSS")
        ax.loglog(x, [m[0] * v / x[0] for v in x], ":", color="grey", base=2, label="linear (from first point)")
        ax.loglog(x, [m[0] * (v / x[0]) ** 2 for v in x], ":", color="black", base=2, label="quadratic")
        ax.set_xlabel("tokens per sequence")
        ax.set_ylabel("MiB")
        ax.set_title("peak memory vs length")
        ax.legend(fontsize=7)
    ax = axes[2]
    if rank_rows:
        x = [r["lora_r"] for r in rank_rows]
        ax.plot(x, [r["seconds_per_step"] for r in rank_rows], "o-", label="s/step (wall)")
        ax.plot(x, [r["cpu_seconds_per_step"] for r in rank_rows], "s--", label="CPU s/step")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("LoRA rank r")
        ax.set_ylabel("seconds per step")
        ax.set_ylim(bottom=0)
        twin = ax.twinx()
        twin.plot(x, [r["peak_train_mib"] for r in rank_rows], "^-", color="tab:red", label="peak RSS (MiB)")
        twin.set_ylabel("peak RSS MiB", color="tab:red")
        twin.set_ylim(bottom=0)
        lines, lines2 = ax.get_legend_handles_labels(), twin.get_legend_handles_labels()
        ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=7, loc="lower right")
        ax.set_title(f"LoRA rank ({BASE_LENGTH} tokens)")
    probes = [r.get("speed_probe") for r in length_rows + rank_rows if r.get("speed_probe")]
    fig.suptitle(f"DPO step scaling on {C.cpu_model()} (2 threads); speed probe {min(probes):.2f}-{max(probes):.2f} s "
                 "(the machine's speed varied between points: compare CPU s)" if probes else "DPO step scaling",
                 fontsize=9)
    fig.tight_layout()
    C.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = C.RESULTS_DIR / f"{NAME}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    if not C.worker_entry(sys.argv[1:], C.dpo_worker):
        sys.exit(main(sys.argv[1:]))
