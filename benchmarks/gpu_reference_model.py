"""The reference-model comparison of reference_model.py at the recipe's real scale: a Mistral-7B-shaped model
(random weights, nothing downloaded) built directly on the GPU in 4-bit NF4, trained with the `full` profile's
settings (batch 4 x accumulation 4 = 16 pairs per step, bf16, gradient checkpointing, paged AdamW, LoRA r=16
on the seven projections, beta 0.1):

(a) ``separate_ref``: a second NF4 copy of the model as ``ref_model`` (the seed's first version);
(b) ``peft_ref``: ``ref_model=None``, the adapter switched off (helpers.training.make_trainer);
(c) ``peft_precompute``: (b) + ``precompute_ref_log_probs=True``.

Reports seconds per step, pairs per second against the seed's anchor (200 steps x 16 pairs in about one hour
on one A100 = 0.89 pairs/s), model-FLOPs utilisation, and peak GPU memory (torch.cuda.max_memory_allocated),
each configuration in a fresh process. Needs a CUDA GPU: exits with status 2 and a message without one.

    .venv/bin/python benchmarks/gpu_reference_model.py               # 1024-token sequences, ~4 min on an H100
    .venv/bin/python benchmarks/gpu_reference_model.py --quick       # 512 tokens, 2 timed steps
    .venv/bin/python benchmarks/gpu_reference_model.py --cpu-selftest  # code check on CPU with a tiny shape
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import _common as C

NAME = "gpu_reference_model"
ANCHOR_PAIRS_PER_SECOND = 200 * 16 / 3600  # the seed's run: 200 steps x 16 pairs in about an hour on one A100
MEMORY_TARGET, SPEED_TARGET = 0.6, 1.2
PEAK_BF16_TFLOPS = {  # dense bf16 tensor-core peaks, by device-name fragment
    "H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0,
    "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0, "T4": 65.0,
}


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="512-token sequences, 2 timed steps")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 1024; quick 512)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=None, help="timed optimizer steps (default 3; quick 2)")
    parser.add_argument("--modes", default="separate_ref,peft_ref,peft_precompute")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, for MFU")
    parser.add_argument("--cpu-selftest", action="store_true",
                        help="check the code path on CPU with a tiny Mistral shape (not a benchmark)")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------- the model


def build_nf4_mistral(config, *, device, compute_dtype, seed: int = 0, std: float = 0.02):
    """A MistralForCausalLM with random weights made directly on ``device``, decoder linears in NF4.

    Built on the meta device, then each decoder ``nn.Linear`` becomes a bitsandbytes ``Linear4bit`` (NF4, double
    quantisation, as helpers.loading.bnb_config) whose random bf16 weight is created on the device and quantised
    there at once, one layer at a time, so the full-precision model never exists; embeddings, norms and lm_head
    are made in ``compute_dtype``, as ``from_pretrained(..., quantization_config=...)`` leaves them. Flagged
    ``is_loaded_in_4bit`` as transformers does, so PEFT wraps the layers with its 4-bit LoRA and TRL casts the
    adapter to bf16 exactly as with a model loaded by helpers.loading.load_model.
    """
    import bitsandbytes as bnb
    import torch
    from torch import nn
    from transformers import MistralForCausalLM

    torch.manual_seed(seed)
    with torch.device("meta"):
        model = MistralForCausalLM(config)
    head = model.get_output_embeddings()
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, nn.Linear) or child is head:
                continue
            layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False, compute_dtype=compute_dtype,
                                      compress_statistics=True, quant_type="nf4", device="meta")
            weight = torch.empty(child.out_features, child.in_features, device=device, dtype=compute_dtype)
            weight.normal_(0.0, std)
            old = layer.weight
            layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, **old.__dict__).to(device)
            del weight
            setattr(module, child_name, layer)
    for name, module in model.named_modules():
        for pname, param in list(module.named_parameters(recurse=False)):
            if not param.is_meta:
                continue
            value = torch.empty(param.shape, device=device, dtype=compute_dtype)
            if "norm" in name or "norm" in type(module).__name__.lower():
                value.fill_(1.0)
            else:
                value.normal_(0.0, std)
            module._parameters[pname] = nn.Parameter(value, requires_grad=param.requires_grad)
    rotary = model.model.rotary_emb
    with torch.device(device):  # its inv_freq buffers are computed, not loaded: make them again, for real
        model.model.rotary_emb = type(rotary)(config=config)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"tensors left on the meta device: {leftover[:5]}")
    model.is_loaded_in_4bit = True  # what transformers' bitsandbytes quantizer sets on a 4-bit model
    if torch.device(device).type == "cuda":  # as helpers.loading.load_model's device_map={"": current device}
        model.hf_device_map = {"": torch.cuda.current_device()}
    model.eval()
    return model


def mistral_7b_like(tokenizer, quick_shape: bool = False):
    """Mistral-7B's architecture (helpers.memory.MISTRAL_7B_SHAPE, OpenHermes' 32,002 vocabulary), or a tiny one."""
    from transformers import MistralConfig

    from helpers.memory import MISTRAL_7B_SHAPE, OPENHERMES_VOCAB

    shape = dict(MISTRAL_7B_SHAPE)
    if quick_shape:
        shape.update(hidden_size=128, intermediate_size=448, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2)
    return MistralConfig(vocab_size=OPENHERMES_VOCAB, max_position_embeddings=32768, sliding_window=None,
                         tie_word_embeddings=False, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **shape)


def flops_per_token(config, seq_len: int, with_reference_forward: bool) -> dict[str, float]:
    """Model FLOPs per trained token of one DPO step with LoRA on a frozen base (no recomputation counted).

    A forward costs 2N (N = parameters doing matmuls: all but the input embedding) + 4 * layers * L * hidden
    for attention (PaLM's accounting, causal masking not discounted). The backward of a frozen base needs only
    the activation gradients, about one more forward's worth (the LoRA weight gradients are negligible). The
    reference forward adds one forward unless its log-probs were precomputed. Gradient checkpointing's
    recomputed forward is hardware work, not model work, so it lowers MFU, as it should.
    """
    from helpers.memory import meta_model

    model = meta_model(config)
    n = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    forward = 2 * n + 4 * config.num_hidden_layers * seq_len * config.hidden_size
    passes = 3 if with_reference_forward else 2
    return {"matmul_parameters": n, "forward_flops_per_token": forward, "model_flops_per_token": passes * forward}


def peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    for fragment, value in PEAK_BF16_TFLOPS.items():
        if fragment in name:
            return value
    return None


# --------------------------------------------------------------------------------------------- one run


def worker(job: dict) -> dict:
    """One configuration in this fresh process: build the model(s) on the device, train, measure."""
    t_start = time.perf_counter()
    C.prepare_worker_process(threads=job.get("threads"))
    import torch
    from trl import DPOTrainer

    from helpers.hardware import compute_dtype
    from helpers.lora import lora_config
    from helpers.profiles import get_profile
    from helpers.training import dpo_config, make_trainer

    selftest = job.get("cpu_selftest", False)
    device = "cpu" if selftest else "cuda"
    out: dict = {"job": job, "loadavg_start": C.loadavg(), "device": device}
    profile = get_profile("full", check_hardware=not selftest)
    profile = profile.replace("training", max_steps=job["warmup"] + job["steps"], warmup_steps=0, save_steps=10_000,
                              logging_steps=1)
    profile = profile.replace("dpo", max_length=job["seq_len"])
    if selftest:  # CPU: fp32 compute, plain AdamW, tiny batch
        profile = profile.replace("training", per_device_train_batch_size=1, gradient_accumulation_steps=2,
                                  precision="fp32", optim="adamw_torch")
        profile = profile.replace("quantization", compute_dtype="float32")
    dtype = compute_dtype(profile.quantization.compute_dtype)
    tokenizer = C.bench_tokenizer()
    config = mistral_7b_like(tokenizer, quick_shape=selftest)
    t = profile.training
    pairs_per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps
    dataset = C.synthetic_pairs(tokenizer, pairs_per_step * (job["warmup"] + job["steps"]), job["seq_len"])

    if not selftest:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = build_nf4_mistral(config, device=device, compute_dtype=dtype, seed=0)
    ref_model = None
    if job["mode"] == "separate_ref":
        ref_model = build_nf4_mistral(config, device=device, compute_dtype=dtype, seed=0)
    out["build_seconds"] = round(time.perf_counter() - t0, 1)
    if selftest:  # bitsandbytes' CPU inference packing would break the backward pass (see _common)
        for m in (model, ref_model):
            if m is not None:
                C.set_cpu_nf4_packing(m, False)
    out["model_footprint_gib"] = model.get_memory_footprint() / 2**30
    out["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    if not selftest:
        torch.cuda.synchronize()
        out["allocated_after_build_gib"] = torch.cuda.memory_allocated() / 2**30

    overrides = dict(C.BENCH_OVERRIDES)
    if job["mode"] == "peft_precompute":
        overrides["precompute_ref_log_probs"] = True
    output_dir = C.temp_folder("bench-gpu-dpo-")
    t0 = time.perf_counter()
    if job["mode"] == "separate_ref":
        trainer = DPOTrainer(model=model, ref_model=ref_model, args=dpo_config(profile, output_dir, **overrides),
                             train_dataset=dataset, processing_class=tokenizer, peft_config=lora_config(profile))
    else:
        trainer = make_trainer(profile, model, tokenizer, dataset, output_dir, **overrides)
    if not selftest:
        torch.cuda.synchronize()
    out["trainer_setup_seconds"] = round(time.perf_counter() - t0, 1)  # (c): includes the precompute pass
    out["ref_model_is_separate"] = trainer.ref_model is not None
    out["adapter_dtypes"] = sorted({str(p.dtype) for p in trainer.model.parameters() if p.requires_grad})
    out["trainable_parameters"] = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)

    timer = C.step_timer(sync_cuda=not selftest)
    trainer.add_callback(timer)
    if not selftest:
        out["peak_setup_gib"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    C.reset_peak_rss()
    t0 = time.perf_counter()
    trainer.train()
    out["train_seconds"] = round(time.perf_counter() - t0, 1)
    shutil.rmtree(output_dir, ignore_errors=True)
    if not selftest:
        out["peak_train_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    out["peak_rss_train_mib"] = C.peak_rss_mib()
    out["step_seconds_all"] = [round(s, 3) for s in timer.seconds]
    out["seconds_per_step"] = C.median(timer.seconds[job["warmup"]:] or timer.seconds)
    out["pairs_per_step"] = pairs_per_step
    out["pairs_per_second"] = pairs_per_step / out["seconds_per_step"]
    out["tokens_per_step"] = pairs_per_step * 2 * job["seq_len"]
    out["losses"] = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    flops = flops_per_token(config, job["seq_len"], with_reference_forward=job["mode"] != "peft_precompute")
    out.update(flops)
    achieved = flops["model_flops_per_token"] * out["tokens_per_step"] / out["seconds_per_step"]
    out["achieved_tflops"] = achieved / 1e12
    if not selftest:
        out["gpu"] = torch.cuda.get_device_name()
        peak = peak_tflops(out["gpu"], job.get("peak_tflops"))
        out["peak_tflops"] = peak
        out["mfu"] = achieved / (peak * 1e12) if peak else None
    out["loadavg_end"] = C.loadavg()
    out["worker_seconds"] = round(time.perf_counter() - t_start, 1)
    return out


# --------------------------------------------------------------------------------------------- driver


COLUMNS = [
    ("label", "configuration"),
    ("seconds_per_step", "s/step (16 pairs)"),
    ("pairs_per_second", "pairs/s"),
    ("vs_anchor", "vs anchor 0.89 pairs/s"),
    ("speed_vs_a", "speed vs (a)"),
    ("mfu", "MFU"),
    ("peak_train_gib", "peak allocated (GiB)"),
    ("peak_vs_a", "peak vs (a)"),
    ("setup_seconds", "build + set-up (s)"),
]
LABELS = {"separate_ref": "(a) separate ref_model", "peft_ref": "(b) adapter off (ref_model=None)",
          "peft_precompute": "(c) (b) + precompute_ref_log_probs"}


def summarise(results: dict) -> tuple[list[dict], list[str], dict]:
    ok = {k: v for k, v in results.items() if "error" not in v}
    base = ok.get("separate_ref")
    rows = []
    for mode, r in ok.items():
        row = {"mode": mode, "label": LABELS[mode], "seconds_per_step": r["seconds_per_step"],
               "pairs_per_second": r["pairs_per_second"], "vs_anchor": r["pairs_per_second"] / ANCHOR_PAIRS_PER_SECOND,
               "mfu": r.get("mfu"), "peak_train_gib": r.get("peak_train_gib"),
               "setup_seconds": r["build_seconds"] + r["trainer_setup_seconds"]}
        if base:
            row["speed_vs_a"] = base["seconds_per_step"] / r["seconds_per_step"]
            if r.get("peak_train_gib") and base.get("peak_train_gib"):
                row["peak_vs_a"] = r["peak_train_gib"] / base["peak_train_gib"]
        rows.append(row)
    by = {r["mode"]: r for r in rows}
    statements, verdict = [], {}
    if "peft_ref" in by and by["peft_ref"].get("peak_vs_a") is not None:
        ratio = by["peft_ref"]["peak_vs_a"]
        verdict["memory_b_vs_a"] = {"ratio": ratio, "target": f"<= {MEMORY_TARGET}", "met": ratio <= MEMORY_TARGET}
        statements.append(f"memory: (b) peaks at {ratio:.2f} x (a) - target <= {MEMORY_TARGET}: "
                          + ("MET" if ratio <= MEMORY_TARGET else "NOT MET"))
    if "peft_ref" in by and "peft_precompute" in by:
        speed = ok["peft_ref"]["seconds_per_step"] / ok["peft_precompute"]["seconds_per_step"]
        verdict["speed_c_vs_b"] = {"ratio": speed, "target": f">= {SPEED_TARGET}", "met": speed >= SPEED_TARGET}
        statements.append(f"speed: (c) runs {speed:.2f} x the steps per second of (b) - target >= {SPEED_TARGET}: "
                          + ("MET" if speed >= SPEED_TARGET else "NOT MET")
                          + f"; its precompute pass took {ok['peft_precompute']['trainer_setup_seconds']:.0f} s "
                          "before training (one reference forward per pair of the dataset)")
    for mode, row in by.items():
        statements.append(f"{LABELS[mode]}: {row['pairs_per_second']:.2f} pairs/s = {row['vs_anchor']:.1f} x the "
                          "seed's anchor (200 x 16 pairs in ~1 h on one A100, 0.89 pairs/s)")
    return rows, statements, verdict


def main(argv: list[str]) -> int:
    args = parse(argv)
    if not args.cpu_selftest:
        import torch

        if not torch.cuda.is_available():
            print("gpu_reference_model.py needs a CUDA GPU (it builds a Mistral-7B-shaped model in 4-bit on it) and "
                  "this machine has none. Run it on a GPU machine; on CPU use benchmarks/reference_model.py, or "
                  "--cpu-selftest to check this script's code path with a tiny shape.", file=sys.stderr)
            return 2
    seq_len = args.seq_len or (64 if args.cpu_selftest else 512 if args.quick else 1024)
    steps = args.steps or (1 if args.cpu_selftest else 2 if args.quick else 3)
    started, load_start = time.perf_counter(), C.loadavg()
    results = {}
    for mode in args.modes.split(","):
        job = {"mode": mode, "seq_len": seq_len, "warmup": args.warmup, "steps": steps,
               "peak_tflops": args.peak_tflops, "cpu_selftest": args.cpu_selftest,
               "threads": 2 if args.cpu_selftest else None}
        print(f"running {mode}: {C.REFERENCE_MODES[mode]} ...", flush=True)
        r = C.run_worker(Path(__file__), job, timeout=1800,
                         omp_wait_policy=C.DEFAULT_OMP_WAIT_POLICY if args.cpu_selftest else None)
        results[mode] = r
        if "error" in r:
            print(f"  FAILED: {r['error']}\n{r['log_tail']}", flush=True)
        else:
            mem = (f"{r['peak_train_gib']:.1f} GiB" if "peak_train_gib" in r
                   else f"{r['peak_rss_train_mib']:.0f} MiB RSS")
            print(f"  {r['seconds_per_step']:.2f} s/step, {r['pairs_per_second']:.2f} pairs/s, peak {mem}, "
                  f"losses {[round(x, 4) for x in r['losses']]}", flush=True)
    rows, statements, verdict = summarise(results)
    print()
    print(C.format_table(rows, COLUMNS))
    print()
    for line in statements:
        print("- " + line)
    if args.cpu_selftest:
        print("\n(CPU self-test of the code path with a tiny shape: not a benchmark, nothing written)")
        return 0 if all("error" not in r for r in results.values()) else 1
    payload = {
        "benchmark": NAME,
        "command": "python benchmarks/gpu_reference_model.py" + (" " + " ".join(argv) if argv else ""),
        "machine": C.machine_info(),
        "loadavg_start": load_start,
        "loadavg_end": C.loadavg(),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "settings": {"profile": "full", "seq_len": seq_len, "warmup_steps": args.warmup, "timed_steps": steps,
                     "model": "Mistral-7B shape, vocab 32002, random weights, NF4 built on the GPU"},
        "anchor_pairs_per_second": ANCHOR_PAIRS_PER_SECOND,
        "results": results,
        "rows": rows,
        "statements": statements,
        "verdict": verdict,
    }
    path = C.write_result(NAME, payload)
    print(f"wrote {path.relative_to(C.REPO_ROOT)} in {payload['wall_seconds']:.0f} s")
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    if not C.worker_entry(sys.argv[1:], worker):
        sys.exit(main(sys.argv[1:]))
