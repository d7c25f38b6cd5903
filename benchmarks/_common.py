"""Shared pieces of the benchmark scripts: machine description, load average, the Mistral-shaped benchmark model,
synthetic preference pairs of a controlled length, peak-memory probes, fresh-subprocess workers and the JSON/table
output. What the course itself provides is taken from helpers/, not redone here: model configs
(helpers.architectures), the trainer (helpers.training.build_trainer), the step timer (helpers.progress), the 4-bit
packing guard (helpers.loading), the repository root and the offline environment (helpers.paths), atomic JSON
writes (helpers.saving).

Nothing here is timed by the test-suite: these are measurement tools, run by hand (see benchmarks/README.md).

torch, transformers and the helpers that import them are imported inside the functions that need them, so that
importing this module stays cheap and imports no torch: course_time.py sets its own process's environment (threads,
OpenMP wait policy) before torch's first import, and a worker sets its thread count and offline switches first
(:func:`prepare_worker_process`).
"""

from __future__ import annotations

import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from helpers.paths import OFFLINE_ENV, REPO_ROOT
from helpers.saving import write_json_atomically

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
MIB = 2**20
# The workers' environment: the course's offline environment, and no progress bars in the logs they send back.
WORKER_ENV = {**OFFLINE_ENV, "TQDM_DISABLE": "1"}


# --------------------------------------------------------------------------------------------- the machine


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_header(name: str, argv: list[str], load_start: list[float], started: float, *,
               module: str | None = None) -> dict[str, Any]:
    """The fields every results JSON starts with: which benchmark, the command, the machine, the load, the time.

    ``module``: the script's module when it is not ``benchmarks.NAME`` (one script writing several results).
    """
    command = f"python -m {module or 'benchmarks.' + name}" + (" " + " ".join(argv) if argv else "")
    return {
        "benchmark": name,
        "command": command,
        "machine": machine_info(),
        "loadavg_start": load_start,
        "loadavg_end": loadavg(),
        "load_note": load_note(load_start),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages, rounded."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


LIBRARIES = ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "datasets")


def library_versions() -> dict[str, str | None]:
    """The installed versions of the libraries the recipe runs on (package metadata: nothing is imported)."""
    import importlib.metadata as md

    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    return versions


def machine_info() -> dict[str, Any]:
    """What ran the benchmark: CPU, cores, memory, library versions, GPU if any, and the load average now."""
    import torch  # see the module docstring

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg": loadavg(),
    }
    try:
        import psutil

        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    info.update(library_versions())
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["gpu_capability"] = list(torch.cuda.get_device_capability(0))
    return info


def load_note(load: list[float], cores: int | None = None) -> str:
    """A plain statement of how busy the machine was (timings on a loaded machine are inflated)."""
    cores = cores or os.cpu_count() or 1
    if not load:
        return "load average unknown"
    one = load[0]
    if one >= cores:
        return f"LOADED: 1-minute load {one:.2f} on {cores} cores - other work competed for the CPUs, timings inflated"
    if one >= 0.5 * cores:
        return f"partly loaded: 1-minute load {one:.2f} on {cores} cores - timings somewhat inflated"
    return f"quiet: 1-minute load {one:.2f} on {cores} cores"


# --------------------------------------------------------------------------------------------- memory


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_mib() -> float | None:
    """Resident memory of this process now, MiB."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib / 1024


def peak_rss_mib() -> float | None:
    """Peak resident memory (VmHWM) of this process since start or the last :func:`reset_peak_rss`, MiB."""
    kib = _status_kib("VmHWM")
    return None if kib is None else kib / 1024


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS mark (Linux: ``echo 5 > /proc/self/clear_refs``); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def materialize_weights(model) -> int:
    """Copy every parameter and buffer still backed by the memory-mapped safetensors file into anonymous memory.

    transformers 5 maps an fp32 checkpoint loaded in fp32 straight from the file; those pages are file-backed,
    so the kernel may evict them (this VM's DAMON pageout does, within seconds of disuse) and a later step
    re-reads them from disk. A copy makes the weights ordinary resident memory, as they are on a GPU or after
    any dtype conversion, so that steps measure compute. Returns the bytes copied (4-bit weights are skipped:
    quantising already made them anonymous).
    """
    copied = 0
    for module in model.modules():
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if tensor is None or tensor.device.type != "cpu" or type(tensor).__name__ == "Params4bit":
                continue
            tensor.data = tensor.data.clone()
            copied += tensor.numel() * tensor.element_size()
    return copied


def speed_probe(reps: int = 12) -> float:
    """Seconds for a fixed piece of work (``reps`` fp32 1024 x 1024 matmuls, ~26 GFLOP, this process's threads).

    Recorded before and after each measurement: the load average inside this VM does not show all the
    competition (the host's), and the same step has been seen to take from 1x to 6x its quiet time within
    minutes. A step time divided by the probe time is comparable across runs made at different moments.
    """
    import torch  # see the module docstring

    a = torch.randn(1024, 1024)
    b = torch.randn(1024, 1024)
    torch.mm(a, b)
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    return time.perf_counter() - t0


def ru_maxrss_mib() -> float:
    """``getrusage(RUSAGE_SELF).ru_maxrss`` (KiB on Linux), MiB: the whole process's peak, never reset."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class BenchModel:
    """The shape of the CPU benchmark model: Mistral-shaped (GQA, untied head, Mistral-7B's module names).

    Only the numbers live here (they go into every results JSON); the config itself comes from the course's one
    builder of Mistral configs, :func:`helpers.architectures.mistral_config` (see :func:`bench_config`).
    """

    hidden_size: int = 512
    intermediate_size: int = 1792  # 3.5 x hidden, Mistral-7B's ratio (14336 / 4096)
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 2  # 4 query heads share each key/value head, as in Mistral-7B (32 / 8)
    vocab_size: int = 32000
    max_position_embeddings: int = 4096
    seed: int = 0


def bench_config(spec: BenchModel, tokenizer):
    """The ``MistralConfig`` of ``spec`` with the tokenizer's special ids (its vocabulary must cover the tokenizer)."""
    from helpers.architectures import SHAPE_KEYS, mistral_config  # imports transformers (module docstring)

    if spec.vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size {spec.vocab_size} does not cover the tokenizer's {len(tokenizer)} tokens")
    return mistral_config(
        {key: getattr(spec, key) for key in SHAPE_KEYS},
        max_position_embeddings=spec.max_position_embeddings,
        sliding_window=None,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def bench_tokenizer():
    """The tiny model's ChatML tokenizer (built from the project's text by helpers.tiny_model; no download)."""
    from helpers.tiny_model import build_tokenizer

    return build_tokenizer()


def build_bench_model(folder: Path, spec: BenchModel = BenchModel()) -> dict[str, Any]:
    """Save a random-weight model of ``spec`` (fp32 safetensors) and the tokenizer to ``folder``; returns its facts."""
    import torch
    from transformers import MistralForCausalLM

    tokenizer = bench_tokenizer()
    config = bench_config(spec, tokenizer)
    torch.manual_seed(spec.seed)
    model = MistralForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    embed = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight.numel()
    params = model.num_parameters()
    return {
        "spec": asdict(spec),
        "parameters": params,
        "decoder_linear_parameters": params - embed - head - sum(
            p.numel() for n, p in model.named_parameters() if "norm" in n
        ),
        "embedding_parameters": embed,
        "lm_head_parameters": head,
        "tokenizer_tokens": len(tokenizer),
    }


def bench_profile(*, seq_len: int, batch: int, steps: int, four_bit: bool, lora_r: int = 16,
                  checkpointing: bool = True, compute_dtype: str = "float32"):
    """The profile the CPU benchmarks train with: tiny's CPU settings, the recipe's DPO loss, LoRA and checkpointing.

    Differences from ``tiny``: plain sigmoid DPO (the recipe's loss, not tiny's sigmoid+SFT), max_length =
    ``seq_len``, ``batch`` pairs per step, no accumulation (one micro-batch is one timed step), gradient
    checkpointing on (the recipe's setting), the base model in 4-bit NF4 when ``four_bit``.
    """
    from helpers.profiles import get_profile

    profile = get_profile("tiny", check_hardware=False)
    profile = profile.replace("quantization", load_in_4bit=four_bit, compute_dtype=compute_dtype)
    profile = profile.replace("lora", r=lora_r, alpha=lora_r)
    profile = profile.replace(
        "training",
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        gradient_checkpointing=checkpointing,
        max_steps=steps,
        warmup_steps=0,
        learning_rate=5e-5,
        logging_steps=1,
        save_steps=10_000,
    )
    return profile.replace("dpo", max_length=seq_len, loss_type=("sigmoid",), loss_weights=None)


BENCH_OVERRIDES = {"save_strategy": "no"}  # nothing is saved: a checkpoint's write time is not a step's


def allow_cpu_nf4_packing(model) -> int:
    """Let bitsandbytes repack ``model``'s 4-bit weights for its CPU inference kernel again; returns how many layers.

    Only for the benchmarks that show what that packing does (``cpu_nf4_packing_check``, ``quantization``'s packed
    forward, ``reference_model --allow-cpu-packing``). The course forbids it (helpers.loading.forbid_cpu_nf4_packing,
    applied by load_model and build_trainer on CPU) because the packed kernel has no backward. This puts back
    bitsandbytes' own default for its own switch, ``Linear4bit.support_avx512bf16_for_cpu``: on exactly when the
    CPU has AVX512-BF16 (``bitsandbytes.functional.has_avx512bf16()``), as ``Linear4bit.__init__`` sets it.
    """
    import bitsandbytes as bnb
    from bitsandbytes.functional import has_avx512bf16

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for module in layers:
        module.support_avx512bf16_for_cpu = bool(has_avx512bf16())
    return len(layers)


# --------------------------------------------------------------------------------------------- data


def _corpus_words() -> list[str]:
    from helpers.paths import DATA_DIR

    words: list[str] = []
    for line in (DATA_DIR / "train.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        for key in ("question", "chosen", "rejected"):
            words += row[key].split()
    return words or ["lorem", "ipsum"]


def _text_of_tokens(tokenizer, words: list[str], rng: random.Random, n_tokens: int) -> str:
    """Words drawn from the project's text until the tokenizer counts at least ``n_tokens`` tokens."""
    picked: list[str] = []
    while True:
        picked += rng.choices(words, k=max(8, n_tokens // 2))
        text = " ".join(picked)
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) >= n_tokens:
            return text


def synthetic_pairs(tokenizer, n_pairs: int, seq_len: int, seed: int = 0):
    """``n_pairs`` ChatML preference pairs whose prompt + answer fill ``seq_len`` tokens (TRL truncates the rest).

    The prompt takes about a quarter of ``seq_len``, each answer is longer than the remainder, so with
    ``max_length=seq_len`` every chosen and rejected sequence is exactly ``seq_len`` tokens: the step cost
    is that of the length asked for, with no padding.
    """
    from datasets import Dataset

    rng = random.Random(seed)
    words = _corpus_words()
    rows: dict[str, list[str]] = {"prompt": [], "chosen": [], "rejected": []}
    for _ in range(n_pairs):
        question = _text_of_tokens(tokenizer, words, rng, max(8, seq_len // 4 - 12))
        prompt = tokenizer.apply_chat_template(
            [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": question}],
            add_generation_prompt=True,
            tokenize=False,
        )
        rows["prompt"].append(prompt)
        rows["chosen"].append(_text_of_tokens(tokenizer, words, rng, seq_len))
        rows["rejected"].append(_text_of_tokens(tokenizer, words, rng, seq_len))
    return Dataset.from_dict(rows)


# --------------------------------------------------------------------------------------------- workers


def prepare_worker_process(threads: int | None = None) -> None:
    """Offline environment and a fixed thread count (the notebooks use min(2, cores) on CPU)."""
    os.environ.update(WORKER_ENV)
    import torch  # after the environment (see the module docstring)

    torch.set_num_threads(threads or max(1, min(2, os.cpu_count() or 1)))
    from helpers.notebook import quiet_libraries

    quiet_libraries()


# OpenMP threads that wait for each other by spinning (libgomp's default, ACTIVE) lose a whole scheduler time slice
# at every parallel region when another process holds the other core: on this shared 2-core VM a 0.3 ms matmul was
# measured at 16 ms. PASSIVE makes waiting threads sleep: slightly slower on an idle machine, far steadier on a busy
# one. The workers use it unless told otherwise (see benchmarks/omp_wait_policy.py for the effect on a DPO step).
DEFAULT_OMP_WAIT_POLICY = "PASSIVE"


def run_worker(module: str, job: dict[str, Any], timeout: float = 900,
               omp_wait_policy: str | None = DEFAULT_OMP_WAIT_POLICY) -> dict[str, Any]:
    """Run ``python -m MODULE --worker JSON`` in a fresh process from the repository root; returns the JSON dict it
    prints on its last line, or ``{"error": ..., "log_tail": ...}`` when it fails or runs past ``timeout`` seconds.

    ``module``: e.g. ``"benchmarks.reference_model"``. ``omp_wait_policy``: OMP_WAIT_POLICY for the worker (None:
    inherit this process's environment).
    """
    env = {**os.environ, **WORKER_ENV}
    if omp_wait_policy:
        env["OMP_WAIT_POLICY"] = omp_wait_policy
    started = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", module, "--worker", json.dumps(job)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            cwd=str(REPO_ROOT),
        )
    except subprocess.TimeoutExpired as exc:
        tail = "\n".join((_text(exc.stdout) + _text(exc.stderr)).splitlines()[-30:])
        return {"error": f"worker ran past its {timeout:.0f} s limit and was stopped", "log_tail": tail,
                "process_seconds": round(time.perf_counter() - started, 1)}
    wall = time.perf_counter() - started
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        return {"error": f"worker exited {proc.returncode}", "log_tail": tail, "process_seconds": round(wall, 1)}
    result = json.loads(lines[-1])
    result["process_seconds"] = round(wall, 1)
    return result


def _text(output: str | bytes | None) -> str:
    """A subprocess's captured output as text (TimeoutExpired may hold bytes even in text mode)."""
    if isinstance(output, bytes):
        return output.decode(errors="replace")
    return output or ""


def worker_entry(argv: list[str], work) -> bool:
    """If ``argv`` is ``--worker JSON``: run ``work(job)`` and print its result as one JSON line; True when it did."""
    if len(argv) >= 2 and argv[0] == "--worker":
        result = work(json.loads(argv[1]))
        result["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY", "default (ACTIVE)")
        print(json.dumps(result, default=str), flush=True)
        return True
    return False


def temp_folder(prefix: str) -> Path:
    """A new empty folder in the system's temporary directory (the caller removes it)."""
    return Path(tempfile.mkdtemp(prefix=prefix))


# --------------------------------------------------------------------------------------------- output


def format_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """A markdown table of ``rows`` with (key, header) ``columns``; floats rounded sensibly."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            if value != value:  # NaN
                return "-"
            return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    header = "| " + " | ".join(h for _, h in columns) + " |"
    rule = "| " + " | ".join("---" for _ in columns) + " |"
    body = ["| " + " | ".join(cell(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join([header, rule, *body])


def write_result(name: str, payload: dict[str, Any]) -> Path:
    """Write ``benchmarks/results/NAME.json`` atomically (a run killed while writing leaves the old file whole)."""
    return write_json_atomically(RESULTS_DIR / f"{name}.json", payload)


# --------------------------------------------------------------------------------------------- one DPO run

REFERENCE_MODES = {
    "separate_ref": "(a) a second, separately loaded model as ref_model (the seed's first version)",
    "peft_ref": "(b) ref_model=None: the policy with its LoRA adapter switched off (helpers.training.build_trainer)",
    "peft_precompute": "(c) (b) + precompute_ref_log_probs=True: reference log-probs computed once, before training",
}


def dpo_worker(job: dict[str, Any]) -> dict[str, Any]:
    """One DPO training run on the benchmark model, in this (fresh) process; returns timings and memory.

    ``job``: model_dir, mode (a key of REFERENCE_MODES), seq_len, batch, warmup, steps, four_bit, lora_r,
    checkpointing, cpu_packing. The trainer is the course's (helpers.training.build_trainer); (a) passes it a
    second loaded copy as ``ref_model``. Memory: ``VmHWM`` (peak RSS) read at each phase; the mark is reset just
    before training, so ``peak_train_mib`` is the peak while the models, adapter, optimizer and activations are
    all alive.
    """
    t_start = time.perf_counter()
    prepare_worker_process(job.get("threads"))
    import torch  # after prepare_worker_process, like the helpers below (see the module docstring)

    from helpers.loading import load_model, load_tokenizer, packed_nf4_layers
    from helpers.progress import StepTimer, median
    from helpers.training import build_trainer

    out: dict[str, Any] = {"job": job, "loadavg_start": loadavg()}
    out["import_seconds"] = round(time.perf_counter() - t_start, 1)
    out["rss_after_imports_mib"] = rss_mib()
    mode, warmup, steps = job["mode"], job["warmup"], job["steps"]
    if mode not in REFERENCE_MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(REFERENCE_MODES)}")
    profile = bench_profile(
        seq_len=job["seq_len"], batch=job["batch"], steps=warmup + steps, four_bit=job["four_bit"],
        lora_r=job.get("lora_r", 16), checkpointing=job.get("checkpointing", True),
    )
    source = job["model_dir"]
    tokenizer = load_tokenizer(profile, source)
    dataset = synthetic_pairs(tokenizer, job["batch"] * (warmup + steps), job["seq_len"])

    t0 = time.perf_counter()
    model = load_model(profile, source=source)  # on CPU, load_model forbids bitsandbytes' NF4 packing itself
    ref_model = load_model(profile, source=source) if mode == "separate_ref" else None
    out["load_seconds"] = round(time.perf_counter() - t0, 1)
    out["rss_after_load_mib"] = rss_mib()
    out["model_footprint_mib"] = model.get_memory_footprint() / MIB
    on_cpu = not torch.cuda.is_available()
    allow_packing = bool(job.get("cpu_packing", False)) and on_cpu
    out["cpu_nf4_packing_allowed"] = allow_packing
    out["materialized_mib"] = 0.0
    for m in (model, ref_model):
        if m is not None and on_cpu:
            if allow_packing:
                allow_cpu_nf4_packing(m)
            out["materialized_mib"] += materialize_weights(m) / MIB
    out["rss_after_materialize_mib"] = rss_mib()

    overrides = dict(BENCH_OVERRIDES)
    if mode == "peft_precompute":
        overrides["precompute_ref_log_probs"] = True
    output_dir = temp_folder("bench-dpo-")
    t0 = time.perf_counter()
    trainer = build_trainer(profile, model, tokenizer, dataset, output_dir, progress=False, ref_model=ref_model,
                            **overrides)
    if allow_packing:  # build_trainer forbade it again on the policy (after (c)'s precompute pass had run)
        allow_cpu_nf4_packing(trainer.model)
    out["trainer_setup_seconds"] = round(time.perf_counter() - t0, 1)  # includes the precompute pass in (c)
    out["rss_after_setup_mib"] = rss_mib()
    out["peak_setup_mib"] = peak_rss_mib()  # loading + trainer set-up (+ precompute)
    out["ref_model_is_separate"] = trainer.ref_model is not None
    out["adapter_dtypes"] = sorted({str(p.dtype) for p in trainer.model.parameters() if p.requires_grad})
    out["trainable_parameters"] = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)

    timer = StepTimer()
    trainer.add_callback(timer)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    out["speed_probe_before"] = speed_probe()
    out["peak_reset"] = reset_peak_rss()
    t0 = time.perf_counter()
    trainer.train()
    out["train_seconds"] = round(time.perf_counter() - t0, 1)
    out["speed_probe_after"] = speed_probe()
    shutil.rmtree(output_dir, ignore_errors=True)  # the trainer's output folder (nothing is saved in it)
    out["peak_train_mib"] = peak_rss_mib()
    out["ru_maxrss_mib"] = ru_maxrss_mib()  # whole process, never reset
    if torch.cuda.is_available():
        out["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / MIB
    out["policy_packed_nf4_layers"] = packed_nf4_layers(trainer.model)  # > 0: the backward pass was wrong
    timed = timer.seconds[warmup:] or timer.seconds
    timed_cpu = timer.cpu_seconds[warmup:] or timer.cpu_seconds
    out["step_seconds_all"] = [round(s, 2) for s in timer.seconds]
    out["cpu_seconds_all"] = [round(s, 2) for s in timer.cpu_seconds]
    out["major_faults_per_step"] = timer.major_faults
    out["seconds_per_step"] = timer.seconds_per_step(warmup)
    out["cpu_seconds_per_step"] = median(timed_cpu)
    out["min_seconds_per_step"] = min(timed)  # least disturbed by other work
    out["min_cpu_seconds_per_step"] = min(timed_cpu)
    out["tokens_per_step"] = 2 * job["batch"] * job["seq_len"]
    out["loadavg_end"] = loadavg()
    out["worker_seconds"] = round(time.perf_counter() - t_start, 1)
    return out
