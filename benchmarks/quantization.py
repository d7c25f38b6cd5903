"""4-bit NF4 vs bf16 vs fp32 for the same model (the Mistral-shaped benchmark model of reference_model.py):

- memory: ``get_memory_footprint()`` (+ the NF4 quantisation constants it leaves out), resident memory the
  loaded model adds, and peak RSS during LoRA steps - each variant in a fresh process;
- step time: forward + backward + AdamW step of a LoRA-wrapped model (the profile's r=16 adapter on the seven
  projections), causal-LM loss, no gradient checkpointing;
- accuracy: the largest absolute logit difference against fp32 on the same input (and the logits' own scale).

    .venv/bin/python -m benchmarks.quantization            # 2 x 256 tokens per step
    .venv/bin/python -m benchmarks.quantization --quick    # 1 x 128 tokens, 4 layers, one timed step
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

from benchmarks import _common as C
from helpers.runs import display_path

NAME = "quantization"
VARIANTS = {
    "nf4": "4-bit NF4 linear layers, double quantisation, compute fp32 (BitsAndBytesConfig, as notebook 02)",
    "bf16": "bf16 weights (from_pretrained(dtype=\"bfloat16\"))",
    "fp32": "fp32 weights: the reference",
}


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{NAME}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 256; quick 128)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default 2; quick 1)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 2; quick 1)")
    return parser.parse_args(argv)


def worker(job: dict) -> dict:
    """Load one variant, record its memory, its logits on a fixed input, and time LoRA training steps."""
    t_start = time.perf_counter()
    C.prepare_worker_process()
    import torch  # after prepare_worker_process, like the libraries below (see benchmarks/_common.py)
    from peft import LoraConfig, get_peft_model

    out: dict = {"job": job, "loadavg_start": C.loadavg(), "rss_after_imports_mib": C.rss_mib()}
    variant = job["variant"]
    profile = C.bench_profile(seq_len=job["seq_len"], batch=job["batch"], steps=1, checkpointing=False)
    t0 = time.perf_counter()
    model = C.load_bench_model(job["model_dir"], four_bit=variant == "nf4",
                               dtype="bfloat16" if variant == "bf16" else "float32")
    out["load_seconds"] = round(time.perf_counter() - t0, 1)
    out["peak_load_mib"] = C.peak_rss_mib()
    out["rss_after_load_mib"] = C.rss_mib()
    out["footprint_mib"] = model.get_memory_footprint() / C.MIB
    out["quant_state_mib"] = C.quant_state_bytes(model) / C.MIB if variant == "nf4" else 0.0
    out["parameter_dtypes"] = sorted({str(p.dtype) for p in model.parameters()})
    # bitsandbytes would repack NF4 weights for its CPU inference kernel on the eval forward below, and that kernel
    # has no backward: load_bench_model forbade it (helpers.models.keep_nf4_trainable) until the steps are done.
    out["materialized_mib"] = C.materialize_weights(model) / C.MIB  # see _common.materialize_weights

    generator = torch.Generator().manual_seed(1)
    probe = torch.randint(0, job["token_range"], (2, 64), generator=generator)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=probe).logits.float()
    torch.save(logits, job["logits_path"])
    out["rss_after_forward_mib"] = C.rss_mib()  # every weight touched (safetensors pages are mapped lazily)

    model = get_peft_model(model, LoraConfig(**profile.lora))
    trainable = [p for p in model.parameters() if p.requires_grad]
    out["adapter_dtypes"] = sorted({str(p.dtype) for p in trainable})
    out["trainable_parameters"] = sum(p.numel() for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0)
    ids = torch.randint(0, job["token_range"], (job["batch"], job["seq_len"]), generator=generator)
    model.train()
    seconds, cpu_seconds, faults = [], [], []
    out["speed_probe_before"] = C.speed_probe()
    C.reset_peak_rss()
    for _ in range(job["warmup"] + job["steps"]):
        t0, c0, f0 = time.perf_counter(), time.process_time(), C.major_page_faults()
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        seconds.append(time.perf_counter() - t0)
        cpu_seconds.append(time.process_time() - c0)
        faults.append(C.major_page_faults() - f0)
    out["peak_train_mib"] = C.peak_rss_mib()
    out["speed_probe_after"] = C.speed_probe()
    out["ru_maxrss_mib"] = C.ru_maxrss_mib()
    out["loss"] = float(loss)
    if variant == "nf4":  # what inference on this CPU uses (notebook 02): the packed kernel, where bitsandbytes has it
        base = model.get_base_model()
        C.allow_cpu_nf4_packing(base)  # bitsandbytes' own default back, for this inference-only forward
        base.eval()
        with torch.no_grad(), model.disable_adapter():
            t0 = time.perf_counter()
            packed_logits = model(input_ids=probe).logits.float()
            out["packed_forward_seconds"] = time.perf_counter() - t0
        out["packed_layers"] = C.packed_nf4_layers(base)
        if out["packed_layers"]:
            torch.save(packed_logits, job["logits_path"].replace(".pt", "-packed.pt"))
    out["step_seconds_all"] = [round(s, 2) for s in seconds]
    out["cpu_seconds_all"] = [round(s, 2) for s in cpu_seconds]
    out["major_faults_per_step"] = faults
    out["seconds_per_step"] = C.median(seconds[job["warmup"]:] or seconds)
    out["cpu_seconds_per_step"] = C.median(cpu_seconds[job["warmup"]:] or cpu_seconds)
    out["min_seconds_per_step"] = min(seconds[job["warmup"]:] or seconds)
    out["loadavg_end"] = C.loadavg()
    out["worker_seconds"] = round(time.perf_counter() - t_start, 1)
    return out


def main(argv: list[str]) -> int:
    args = parse(argv)
    seq_len = args.seq_len or (128 if args.quick else 256)
    batch = args.batch or (1 if args.quick else 2)
    steps = args.steps or (1 if args.quick else 2)
    spec = C.BenchModel(num_hidden_layers=4) if args.quick else C.BenchModel()
    started, load_start = time.perf_counter(), C.loadavg()
    folder = C.temp_folder("bench-quant-")
    results: dict[str, dict] = {}
    try:
        print(f"building the benchmark model ({spec.hidden_size} hidden, {spec.num_hidden_layers} layers) ...",
              flush=True)
        facts = C.build_bench_model(folder / "model", spec)
        print(f"  {facts['parameters']:,} parameters; load average {C.loadavg()}", flush=True)
        for variant in ("fp32", "bf16", "nf4"):
            job = {"model_dir": str(folder / "model"), "variant": variant, "seq_len": seq_len, "batch": batch,
                   "warmup": args.warmup, "steps": steps, "token_range": facts["tokenizer_tokens"],
                   "logits_path": str(folder / f"logits-{variant}.pt")}
            print(f"running {variant}: {VARIANTS[variant]} ...", flush=True)
            r = C.run_worker(f"benchmarks.{NAME}", job)
            results[variant] = r
            if "error" in r:
                print(f"  FAILED: {r['error']}\n{r['log_tail']}", flush=True)
            else:
                print(f"  footprint {r['footprint_mib']:.0f} MiB, {r['seconds_per_step']:.2f} s/step, peak "
                      f"{r['peak_train_mib']:.0f} MiB (load average {r['loadavg_end']})", flush=True)
        compare_logits(folder, results)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    rows = make_rows(results)
    payload = {
        **C.run_header(NAME, argv, load_start, started),
        "model": facts,
        "settings": {"seq_len": seq_len, "batch_sequences": batch, "warmup_steps": args.warmup,
                     "timed_steps": steps, "lora_r": 16, "gradient_checkpointing": False,
                     "logit_probe": "2 x 64 random token ids, eval mode, base model (no adapter)",
                     "spec": asdict(spec)},
        "variants": VARIANTS,
        "results": results,
        "rows": rows,
        "statements": statements(rows),
    }
    path = C.write_result(NAME, payload)
    print()
    print(C.format_table(rows, COLUMNS))
    print()
    for line in payload["statements"]:
        print("- " + line)
    print(f"\nload average: start {load_start}, end {payload['loadavg_end']} ({payload['load_note']})")
    print(f"wrote {display_path(path)} in {payload['wall_seconds']:.0f} s")
    return 0 if all("error" not in r for r in results.values()) else 1


def compare_logits(folder: Path, results: dict) -> None:
    import torch

    ref_path = folder / "logits-fp32.pt"
    if not ref_path.exists():
        return
    ref = torch.load(ref_path)
    for variant, r in results.items():
        path = folder / f"logits-{variant}.pt"
        if "error" in r or not path.exists():
            continue
        logits = torch.load(path)
        diff = (logits - ref).abs()
        r["max_logit_diff_vs_fp32"] = diff.max().item()
        r["mean_logit_diff_vs_fp32"] = diff.mean().item()
        r["fp32_logit_absmax"] = ref.abs().max().item()
        r["fp32_logit_std"] = ref.std().item()
        r["top1_agreement_vs_fp32"] = (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
        packed = folder / f"logits-{variant}-packed.pt"
        if packed.exists():
            r["packed_kernel_max_logit_diff_vs_fp32"] = (torch.load(packed) - ref).abs().max().item()


COLUMNS = [
    ("variant", "weights"),
    ("footprint_mib", "get_memory_footprint (MiB)"),
    ("with_quant_state_mib", "+ NF4 constants (MiB)"),
    ("resident_mib", "RSS added by load + 1st forward (MiB)"),
    ("peak_train_mib", "peak RSS in LoRA steps (MiB)"),
    ("seconds_per_step", "s/step (wall, median)"),
    ("min_seconds_per_step", "best s/step"),
    ("cpu_seconds_per_step", "CPU s/step"),
    ("speed_probe", "speed probe (s)"),
    ("max_logit_diff_vs_fp32", "max |logit diff| vs fp32"),
    ("relative_diff", "diff / max |logit|"),
    ("top1_agreement_vs_fp32", "top-1 agreement"),
    ("loadavg", "load avg (1 min)"),
]


def make_rows(results: dict) -> list[dict]:
    rows = []
    for variant in ("fp32", "bf16", "nf4"):
        r = results.get(variant)
        if not r or "error" in r:
            continue
        rows.append({
            "variant": variant,
            "footprint_mib": r["footprint_mib"],
            "with_quant_state_mib": r["footprint_mib"] + r["quant_state_mib"],
            "resident_mib": r["rss_after_forward_mib"] - r["rss_after_imports_mib"],
            "peak_train_mib": r["peak_train_mib"],
            "seconds_per_step": r["seconds_per_step"],
            "min_seconds_per_step": r["min_seconds_per_step"],
            "cpu_seconds_per_step": r["cpu_seconds_per_step"],
            "speed_probe": (r["speed_probe_before"] + r["speed_probe_after"]) / 2,
            "max_logit_diff_vs_fp32": r.get("max_logit_diff_vs_fp32"),
            "relative_diff": (r["max_logit_diff_vs_fp32"] / r["fp32_logit_absmax"])
            if r.get("fp32_logit_absmax") else None,
            "top1_agreement_vs_fp32": r.get("top1_agreement_vs_fp32"),
            "fp32_logit_absmax": r.get("fp32_logit_absmax"),
            "adapter_dtypes": r["adapter_dtypes"],
            "packed_kernel_max_logit_diff_vs_fp32": r.get("packed_kernel_max_logit_diff_vs_fp32"),
            "loadavg": r["loadavg_end"][0] if r["loadavg_end"] else None,
        })
    return rows


def mistral_7b_nf4_share() -> tuple[float, float]:
    """(embedding + lm_head share of Mistral-7B's parameters, NF4 bytes / bf16 bytes), counted on a meta model.

    NF4 stores the decoder's linear layers in 4 bits with one absmax per block of 64 values (double quantisation:
    a byte per block, and an fp32 per 256 blocks); embeddings, norms and lm_head stay in bf16.
    """
    import torch

    model = C.meta_model(C.mistral_config())
    head = model.get_output_embeddings()
    total = sum(p.numel() for p in model.parameters())
    ends = model.get_input_embeddings().weight.numel() + head.weight.numel()
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head)
    nf4 = linear * (0.5 + 1 / 64 + 4 / (64 * 256)) + (total - linear) * 2
    return ends / total, nf4 / (total * 2)


def nf4_weight_error(seed: int = 0) -> float:
    """Relative (Frobenius) error of an NF4 round trip of a Gaussian weight like the benchmark model's (std 0.02)."""
    import bitsandbytes.functional as F
    import torch

    w = torch.randn(1792, 512, generator=torch.Generator().manual_seed(seed)) * 0.02
    q, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    return ((F.dequantize_4bit(q, state) - w).norm() / w.norm()).item()


def statements(rows: list[dict]) -> list[str]:
    by = {r["variant"]: r for r in rows}
    out = []
    share, ratio = mistral_7b_nf4_share()
    weight_error = nf4_weight_error()
    if "fp32" in by and "nf4" in by and "bf16" in by:
        f, b, n = by["fp32"], by["bf16"], by["nf4"]
        packed = n.get("packed_kernel_max_logit_diff_vs_fp32")
        out.append(
            f"memory: the weights take {f['footprint_mib']:.0f} MiB in fp32, {b['footprint_mib']:.0f} in bf16 "
            f"({b['footprint_mib'] / f['footprint_mib']:.2f} x) and {n['with_quant_state_mib']:.0f} in NF4 with "
            f"its constants ({n['with_quant_state_mib'] / f['footprint_mib']:.2f} x). NF4 stores only the decoder's "
            "linear layers in 4 bits; the embeddings and lm_head stay in the compute dtype (fp32 on CPU), and with "
            "a 32,000-token vocabulary on a small model they are most of what remains - on Mistral-7B they are "
            f"{share:.1%} of the parameters, so there NF4 weights are {ratio:.2f} x bf16. "
            f"Peak RSS during the LoRA steps: fp32 {f['peak_train_mib']:.0f}, bf16 {b['peak_train_mib']:.0f}, NF4 "
            f"{n['peak_train_mib']:.0f} MiB - "
            + ("NF4's peak is the highest although its stored weights are smaller: the step's transient memory on "
               "bitsandbytes' CPU path (dequantised weights, dtype copies of activations around every 4-bit matmul, "
               "allocator slack) outweighs the ~90 MiB the storage saves; the split was not isolated further here."
               if n["peak_train_mib"] > f["peak_train_mib"] else
               "NF4's stored weights are the smallest and so is its peak.")
        )
        out.append(
            f"time: a LoRA step (forward + backward + AdamW) takes {f['seconds_per_step']:.2f} s in fp32, "
            f"{b['seconds_per_step']:.2f} s in bf16 ({f['seconds_per_step'] / b['seconds_per_step']:.1f} x faster: "
            f"this CPU has AVX512-BF16) and {n['seconds_per_step']:.2f} s in NF4 "
            f"({n['seconds_per_step'] / f['seconds_per_step']:.2f} x fp32). On CPU, bitsandbytes dequantises each "
            "NF4 weight to the compute dtype (fp32 here) and then runs an ordinary matmul, forward and backward, so "
            "NF4 saves memory, never time; on a GPU the dequantisation is a cheap kernel next to the memory traffic "
            f"it saves. (Speed probe {f['speed_probe']:.2f} / {b['speed_probe']:.2f} / {n['speed_probe']:.2f} s: "
            "the machine was equally fast for the three.)"
        )
        out.append(
            f"accuracy: the largest logit difference against fp32 is {b['max_logit_diff_vs_fp32']:.2e} for bf16 and "
            f"{n['max_logit_diff_vs_fp32']:.2e} for NF4, on logits whose largest magnitude is "
            f"{n['fp32_logit_absmax']:.2e} "
            f"(relative {b['relative_diff']:.1%} and {n['relative_diff']:.1%}). Random weights give small, "
            f"nearly uniform logits: the relative numbers are the meaningful ones, and a trained model's would differ. "
            f"NF4 itself moves each weight matrix by {weight_error:.1%} (relative Frobenius error of a Gaussian "
            "matrix's round trip), and eight random layers compound it."
            + (f" With bitsandbytes' packed CPU inference kernel (what an eval-mode forward uses on this CPU, as in "
               f"notebook 02) NF4's largest difference is {packed:.2e}." if packed is not None else "")
        )
    return out


if __name__ == "__main__":
    if not C.worker_entry(sys.argv[1:], worker):
        sys.exit(main(sys.argv[1:]))
