"""What the benchmark scripts share: the machine and its load, memory probes, the benchmark-only step timer, the one
builder of their Mistral-shaped models, synthetic pairs of an exact length, fresh-process workers, one DPO run, and
the tables and results files.

What the course provides is used, not copied: the profile (``helpers.profiles``), ``helpers.training.prepare_trainer``
(the adapter cast, the CPU 4-bit guard) around a ``DPOTrainer`` built here as notebook 04 builds it, the tokenizer
loader and the 4-bit guard (``helpers.models``), atomic JSON (``helpers.runs``). The published configs of the GPU
profiles' models come from ``standins.hub`` (their one transcription).

torch and the Hugging Face libraries are imported inside the functions that need them: course_time.py sets the
kernels' environment (threads, OpenMP wait policy) before torch's first import, and a worker sets its thread count and
offline switches first (:func:`prepare_worker_process`).
"""

from __future__ import annotations

import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from helpers.profiles import DATA_DIR, REPO_ROOT, Profile, get_profile
from helpers.runs import write_json
from standins.hub import OPENHERMES_2_5_CONFIG

RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
MIB = 2**20
# Offline, no progress bars in the logs the workers send back. (scripts/nbtools.py has the notebooks' version; its
# module needs nbformat, which the GPU acceptance machine does not have.)
WORKER_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
              "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}
LIBRARIES = ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "datasets", "tokenizers",
             "huggingface-hub", "lm_eval")
SEVEN_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages, rounded."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def load_note(load: list[float], cores: int | None = None) -> str:
    """A plain statement of how busy the machine was (timings on a loaded machine are inflated)."""
    cores = cores or os.cpu_count() or 1
    if not load:
        return "load average unknown"
    if load[0] >= cores:
        return f"LOADED: 1-minute load {load[0]:.2f} on {cores} cores - other work competed, timings inflated"
    if load[0] >= 0.5 * cores:
        return f"partly loaded: 1-minute load {load[0]:.2f} on {cores} cores - timings somewhat inflated"
    return f"quiet: 1-minute load {load[0]:.2f} on {cores} cores"


def library_versions() -> dict[str, str | None]:
    """The installed versions of the libraries the recipe runs on (package metadata: nothing is imported)."""
    import importlib.metadata as md

    found: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            found[name] = None
    return found


def machine_info() -> dict[str, Any]:
    """What ran the benchmark: CPU, cores, memory, library versions, the GPU if any, and the load average now."""
    import torch

    info: dict[str, Any] = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                            "python": platform.python_version(), "platform": platform.platform(), "loadavg": loadavg()}
    pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    info["memory_gib"] = round(pages * page_size / 2**30, 1)
    info.update(library_versions())
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    gpu_capability=list(torch.cuda.get_device_capability(0)), cuda=torch.version.cuda)
    return info


def run_header(name: str, argv: list[str], load_start: list[float], started: float) -> dict[str, Any]:
    """The fields every results JSON starts with: which benchmark, the command, the machine, the load, the time."""
    return {"benchmark": name, "command": f"python -m benchmarks.{name}" + (" " + " ".join(argv) if argv else ""),
            "machine": machine_info(), "loadavg_start": load_start, "loadavg_end": loadavg(),
            "load_note": load_note(load_start), "wall_seconds": round(time.perf_counter() - started, 1)}


# --------------------------------------------------------------------------------------------- memory and time


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


def ru_maxrss_mib() -> float:
    """``getrusage(RUSAGE_SELF).ru_maxrss`` (KiB on Linux), MiB: the whole process's peak, never reset."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def major_page_faults() -> int:
    """Major page faults of this process so far: pages read back from disk (a step that needs many runs slowly)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_majflt


def materialize_weights(model) -> int:
    """Copy every CPU parameter and buffer still backed by the memory-mapped safetensors file into anonymous memory;
    returns the bytes copied. transformers 5 maps an fp32 checkpoint loaded in fp32 straight from the file, and this
    VM's DAMON pageout evicts such pages within seconds of disuse: a later step would re-read them from disk."""
    copied = 0
    for module in model.modules():
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if tensor is None or tensor.device.type != "cpu" or type(tensor).__name__ == "Params4bit":
                continue
            tensor.data = tensor.data.clone()
            copied += tensor.numel() * tensor.element_size()
    return copied


def speed_probe(reps: int = 12) -> float:
    """Seconds for a fixed piece of work (``reps`` fp32 1024 x 1024 matmuls, ~26 GFLOP, this process's threads),
    recorded before and after each measurement: on a shared machine the same step has taken 1x to 6x its quiet time
    within minutes, and a step time divided by the probe is comparable across moments."""
    import torch

    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    torch.mm(a, b)
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    return time.perf_counter() - t0


def median(values: list[float]) -> float:
    """The median of ``values`` (NaN for an empty list)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def step_timer(sync_cuda: bool = False):
    """A ``TrainerCallback`` recording the wall time, the CPU time of this process and the major page faults of every
    optimizer step (``.seconds``, ``.cpu_seconds``, ``.major_faults``). On a shared machine the wall time grows with
    the competition for the cores, the CPU time much less, so both are kept. ``sync_cuda``: wait for the GPU at both
    ends of a step, so that a step's time is its own."""
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.seconds: list[float] = []
            self.cpu_seconds: list[float] = []
            self.major_faults: list[int] = []
            self._t0 = self._c0 = 0.0
            self._f0 = 0

        def on_step_begin(self, args, state, control, **kwargs):
            if sync_cuda:
                torch.cuda.synchronize()
            self._t0, self._c0, self._f0 = time.perf_counter(), time.process_time(), major_page_faults()

        def on_step_end(self, args, state, control, **kwargs):
            if sync_cuda:
                torch.cuda.synchronize()
            self.seconds.append(time.perf_counter() - self._t0)
            self.cpu_seconds.append(time.process_time() - self._c0)
            self.major_faults.append(major_page_faults() - self._f0)

        def seconds_per_step(self, skip: int = 0) -> float:
            """The median wall time of the steps after the first ``skip`` (warm-up)."""
            return median(self.seconds[skip:] or self.seconds)

    return StepTimer()


# --------------------------------------------------------------------------------------------- models


def mistral_config(**changes: Any):
    """The one builder of the benchmarks' models: OpenHermes-2.5-Mistral-7B's published config (Mistral-7B's shape,
    32,002 tokens; ``standins.hub``) as a ``MistralConfig``, with ``changes`` (a smaller shape, other token ids)."""
    from transformers import MistralConfig

    return MistralConfig(**{**OPENHERMES_2_5_CONFIG, **changes})


def meta_model(config):
    """The causal LM of ``config`` on PyTorch's meta device: every module and shape, no weights, no memory."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@dataclass(frozen=True)
class BenchModel:
    """The shape of the CPU benchmark model: Mistral's structure (GQA, untied head, the same module names) at a width
    a 2-core machine trains in seconds. Only numbers here: :func:`mistral_config` makes the config."""

    hidden_size: int = 512
    intermediate_size: int = 1792  # 3.5 x hidden, Mistral-7B's ratio (14336 / 4096)
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 2  # 4 query heads share each key/value head, as in Mistral-7B (32 / 8)
    vocab_size: int = 32000
    max_position_embeddings: int = 4096
    seed: int = 0


def bench_tokenizer():
    """The shipped tiny model's ChatML tokenizer (data/tiny_model; its ids fit any vocabulary above 1,377)."""
    from helpers.models import load_tokenizer

    return load_tokenizer(str(DATA_DIR / "tiny_model"))


def bench_config(spec: BenchModel, tokenizer):
    """The ``MistralConfig`` of ``spec`` with the tokenizer's special ids (its vocabulary must cover the tokenizer)."""
    if spec.vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size {spec.vocab_size} does not cover the tokenizer's {len(tokenizer)} tokens")
    shape = {k: v for k, v in asdict(spec).items() if k != "seed"}
    return mistral_config(**shape, sliding_window=None, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)


def build_bench_model(folder: Path, spec: BenchModel = BenchModel()) -> dict[str, Any]:
    """Save a random-weight model of ``spec`` (fp32 safetensors) and the tokenizer to ``folder``; returns its facts."""
    import torch
    from transformers import MistralForCausalLM

    tokenizer = bench_tokenizer()
    torch.manual_seed(spec.seed)
    model = MistralForCausalLM(bench_config(spec, tokenizer))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    embed, head = model.get_input_embeddings().weight.numel(), model.get_output_embeddings().weight.numel()
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    params = model.num_parameters()
    return {"spec": asdict(spec), "parameters": params, "decoder_linear_parameters": params - embed - head - norms,
            "embedding_parameters": embed, "lm_head_parameters": head, "tokenizer_tokens": len(tokenizer)}


def load_bench_model(folder: str | Path, *, four_bit: bool, dtype: str = "float32"):
    """``from_pretrained`` as notebook 02 writes it: the linear layers in 4-bit NF4 (double quantisation, computing in
    ``dtype``) when ``four_bit``, else every weight in ``dtype``; the CPU 4-bit guard of helpers.models applied."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from helpers.models import keep_nf4_trainable

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=dtype) if four_bit else None
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb, dtype=dtype)
    keep_nf4_trainable(model)
    return model


def packed_nf4_layers(model) -> int:
    """How many 4-bit layers of ``model`` bitsandbytes has repacked for its CPU inference kernel (should be 0)."""
    import bitsandbytes as bnb

    return sum(bool(getattr(getattr(m.weight, "quant_state", None), "packing_format_for_cpu", False))
               for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))


def allow_cpu_nf4_packing(model) -> int:
    """Let bitsandbytes repack ``model``'s 4-bit weights for its CPU inference kernel again; returns how many layers.

    Only for the benchmarks that show what that packing does (cpu_nf4_packing_check, quantization's packed forward,
    reference_model --allow-cpu-packing): the course forbids it (helpers.models.keep_nf4_trainable) because the
    packed kernel has no backward. This puts back bitsandbytes' own default for its own switch: on exactly when the
    CPU has AVX512-BF16, as ``Linear4bit.__init__`` sets it.
    """
    import bitsandbytes as bnb
    from bitsandbytes.functional import has_avx512bf16

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for module in layers:
        module.support_avx512bf16_for_cpu = bool(has_avx512bf16())
    return len(layers)


def quant_state_bytes(model) -> int:
    """Bytes of the NF4 quantisation constants of a 4-bit model: they live in each weight's ``quant_state``, outside
    parameters and buffers, so ``get_memory_footprint()`` leaves them out."""

    def size(state) -> int:
        found = sum(t.numel() * t.element_size() for t in (state.absmax, state.code, state.offset) if t is not None)
        return found + (size(state.state2) if getattr(state, "state2", None) is not None else 0)

    return sum(size(p.quant_state) for p in model.parameters() if getattr(p, "quant_state", None) is not None)


# --------------------------------------------------------------------------------------------- training


def bench_profile(*, seq_len: int, batch: int, steps: int, lora_r: int = 16, checkpointing: bool = True) -> Profile:
    """The profile the CPU benchmarks train with: tiny's CPU settings with the recipe's sigmoid DPO loss, LoRA rank
    ``lora_r`` on the seven projections, ``max_length=seq_len``, ``batch`` pairs per step with no accumulation (one
    micro-batch is one timed step), gradient checkpointing (the recipe's) and nothing saved."""
    profile = get_profile("tiny").with_changes("lora", r=lora_r, lora_alpha=lora_r)
    return profile.with_changes(
        "dpo", per_device_train_batch_size=batch, gradient_accumulation_steps=1, gradient_checkpointing=checkpointing,
        max_steps=steps, warmup_steps=0, learning_rate=5e-5, logging_steps=1, save_strategy="no", max_length=seq_len,
        loss_type=["sigmoid"], loss_weights=None, precompute_ref_log_probs=False, disable_tqdm=True)


def dpo_trainer(profile: Profile, model, tokenizer, dataset, output_dir: Path, *, ref_model=None):
    """The ``DPOTrainer`` of notebook 04's cell (``ref_model=None``: the adapter switched off is the reference; or a
    second loaded model, for the comparison), prepared with helpers.training.prepare_trainer, without a bar."""
    from peft import LoraConfig
    from transformers import set_seed
    from trl import DPOConfig, DPOTrainer

    from helpers.training import prepare_trainer

    set_seed(profile.dpo["seed"])
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=DPOConfig(output_dir=str(output_dir), **profile.dpo),
                         train_dataset=dataset, processing_class=tokenizer, peft_config=LoraConfig(**profile.lora))
    return prepare_trainer(trainer, progress=False)


def _corpus_words() -> list[str]:
    words: list[str] = []
    for line in (DATA_DIR / "train.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        words += [w for key in ("question", "chosen", "rejected") for w in row[key].split()]
    return words


def _text_of_tokens(tokenizer, words: list[str], rng: random.Random, n_tokens: int) -> str:
    """Words drawn from the course's text until the tokenizer counts at least ``n_tokens`` tokens."""
    picked: list[str] = []
    while True:
        picked += rng.choices(words, k=max(8, n_tokens // 2))
        text = " ".join(picked)
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) >= n_tokens:
            return text


def synthetic_pairs(tokenizer, n_pairs: int, seq_len: int, seed: int = 0):
    """``n_pairs`` ChatML preference pairs whose prompt + answer fill ``seq_len`` tokens: the prompt takes about a
    quarter, each answer is longer than the rest, so with ``max_length=seq_len`` every chosen and rejected sequence
    is exactly ``seq_len`` tokens (the step costs what that length costs, with no padding)."""
    from datasets import Dataset

    rng, words = random.Random(seed), _corpus_words()
    rows: dict[str, list[str]] = {"prompt": [], "chosen": [], "rejected": []}
    for _ in range(n_pairs):
        question = _text_of_tokens(tokenizer, words, rng, max(8, seq_len // 4 - 12))
        rows["prompt"].append(tokenizer.apply_chat_template(
            [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": question}],
            add_generation_prompt=True, tokenize=False))
        rows["chosen"].append(_text_of_tokens(tokenizer, words, rng, seq_len))
        rows["rejected"].append(_text_of_tokens(tokenizer, words, rng, seq_len))
    return Dataset.from_dict(rows)


REFERENCE_MODES = {
    "separate_ref": "(a) a second, separately loaded model as ref_model (the seed's first version)",
    "peft_ref": "(b) ref_model=None: the policy with its LoRA adapter switched off (what the course does)",
    "peft_precompute": "(c) (b) + precompute_ref_log_probs=True: reference log-probs computed once, before training",
}


def dpo_worker(job: dict[str, Any]) -> dict[str, Any]:
    """One DPO training run on the benchmark model, in this (fresh) process; returns timings and memory.

    ``job``: model_dir, mode (a key of :data:`REFERENCE_MODES`), seq_len, batch, warmup, steps, four_bit, lora_r,
    cpu_packing. Memory: ``VmHWM`` (peak RSS) at each phase, its mark reset just before training, so that
    ``peak_train_mib`` is the peak while the models, adapter, optimizer and activations are all alive.
    """
    t_start = time.perf_counter()
    prepare_worker_process(job.get("threads"))
    out: dict[str, Any] = {"job": job, "loadavg_start": loadavg(), "rss_after_imports_mib": rss_mib()}
    mode, warmup, steps = job["mode"], job["warmup"], job["steps"]
    if mode not in REFERENCE_MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(REFERENCE_MODES)}")
    profile = bench_profile(seq_len=job["seq_len"], batch=job["batch"], steps=warmup + steps,
                            lora_r=job.get("lora_r", 16), checkpointing=job.get("checkpointing", True))
    if mode == "peft_precompute":
        profile = profile.with_changes("dpo", precompute_ref_log_probs=True)
    tokenizer = bench_tokenizer()
    dataset = synthetic_pairs(tokenizer, job["batch"] * (warmup + steps), job["seq_len"])
    t0 = time.perf_counter()
    model = load_bench_model(job["model_dir"], four_bit=job["four_bit"])
    ref_model = load_bench_model(job["model_dir"], four_bit=job["four_bit"]) if mode == "separate_ref" else None
    out["load_seconds"] = round(time.perf_counter() - t0, 1)
    out["rss_after_load_mib"] = rss_mib()
    out["model_footprint_mib"] = model.get_memory_footprint() / MIB
    out["cpu_nf4_packing_allowed"] = bool(job.get("cpu_packing"))
    out["materialized_mib"] = 0.0
    for m in (model, ref_model):
        if m is not None:
            if job.get("cpu_packing"):
                allow_cpu_nf4_packing(m)
            out["materialized_mib"] += materialize_weights(m) / MIB
    output_dir = Path(tempfile.mkdtemp(prefix="bench-dpo-"))
    t0 = time.perf_counter()
    trainer = dpo_trainer(profile, model, tokenizer, dataset, output_dir, ref_model=ref_model)
    if job.get("cpu_packing"):  # prepare_trainer forbade it again on the policy (after (c)'s precompute pass)
        allow_cpu_nf4_packing(trainer.model)
    out["trainer_setup_seconds"] = round(time.perf_counter() - t0, 1)  # includes the precompute pass in (c)
    out["rss_after_setup_mib"] = rss_mib()
    out["ref_model_is_separate"] = trainer.ref_model is not None
    out["adapter_dtypes"] = sorted({str(p.dtype) for p in trainer.model.parameters() if p.requires_grad})
    out["trainable_parameters"] = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    timer = step_timer()
    trainer.add_callback(timer)
    out["speed_probe_before"] = speed_probe()
    out["peak_reset"] = reset_peak_rss()
    t0 = time.perf_counter()
    trainer.train()
    out["train_seconds"] = round(time.perf_counter() - t0, 1)
    out["speed_probe_after"] = speed_probe()
    out["peak_train_mib"] = peak_rss_mib()
    out["ru_maxrss_mib"] = ru_maxrss_mib()
    out["policy_packed_nf4_layers"] = packed_nf4_layers(trainer.model)  # > 0: the backward pass was wrong
    timed, timed_cpu = timer.seconds[warmup:] or timer.seconds, timer.cpu_seconds[warmup:] or timer.cpu_seconds
    out.update(step_seconds_all=[round(s, 2) for s in timer.seconds],
               cpu_seconds_all=[round(s, 2) for s in timer.cpu_seconds], major_faults_per_step=timer.major_faults,
               seconds_per_step=median(timed), cpu_seconds_per_step=median(timed_cpu), min_seconds_per_step=min(timed),
               min_cpu_seconds_per_step=min(timed_cpu), tokens_per_step=2 * job["batch"] * job["seq_len"],
               loadavg_end=loadavg(), worker_seconds=round(time.perf_counter() - t_start, 1))
    return out


# --------------------------------------------------------------------------------------------- workers


def prepare_worker_process(threads: int | None = None) -> None:
    """Offline, quiet, and a fixed number of torch threads (2 on the course's 2-core machine)."""
    os.environ.update(WORKER_ENV)
    import torch  # after the environment (see the module docstring)

    from helpers.notebook import quiet_libraries

    torch.set_num_threads(threads or max(1, min(2, os.cpu_count() or 1)))
    quiet_libraries()


# OpenMP threads that wait for each other by spinning (libgomp's default, ACTIVE) lose a whole scheduler time slice
# at every parallel region when another process holds the other core: on the shared 2-core VM a 0.3 ms matmul was
# measured at 16 ms. PASSIVE makes waiting threads sleep (benchmarks/omp_wait_policy.py measures the effect).
DEFAULT_OMP_WAIT_POLICY = "PASSIVE"


def run_worker(module: str, job: dict[str, Any], timeout: float = 900,
               omp_wait_policy: str | None = DEFAULT_OMP_WAIT_POLICY) -> dict[str, Any]:
    """Run ``python -m MODULE --worker JSON`` in a fresh process from the repository root; returns the JSON dict it
    prints on its last line, or ``{"error": ..., "log_tail": ...}`` when it fails or runs past ``timeout`` seconds.
    ``omp_wait_policy``: OMP_WAIT_POLICY for the worker (None: this process's environment)."""
    env = {**os.environ, **WORKER_ENV}
    if omp_wait_policy:
        env["OMP_WAIT_POLICY"] = omp_wait_policy
    started = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", module, "--worker", json.dumps(job)], capture_output=True,
                              text=True, timeout=timeout, env=env, cwd=str(REPO_ROOT))
    except subprocess.TimeoutExpired as exc:
        tail = "\n".join((_text(exc.stdout) + _text(exc.stderr)).splitlines()[-30:])
        return {"error": f"worker ran past its {timeout:.0f} s limit and was stopped", "log_tail": tail,
                "process_seconds": round(time.perf_counter() - started, 1)}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        return {"error": f"worker exited {proc.returncode}", "log_tail": tail,
                "process_seconds": round(time.perf_counter() - started, 1)}
    return {**json.loads(lines[-1]), "process_seconds": round(time.perf_counter() - started, 1)}


def _text(output: str | bytes | None) -> str:
    """A subprocess's captured output as text (TimeoutExpired may hold bytes even in text mode)."""
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


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
        if value is None or (isinstance(value, float) and value != value):
            return "-"
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(h for _, h in columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    return "\n".join([*lines, *("| " + " | ".join(cell(r.get(k)) for k, _ in columns) + " |" for r in rows)])


def write_result(name: str, payload: dict[str, Any]) -> Path:
    """Write ``benchmarks/results/NAME.json`` atomically (a run killed while writing leaves the old file whole)."""
    return write_json(RESULTS_DIR / f"{name}.json", payload)
