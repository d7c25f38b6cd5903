"""Scaling out with accelerate: two data-parallel processes on the CPU really share the work.

``accelerate launch --config_file configs/accelerate/cpu_2proc_test.yaml -m helpers run --profile tiny`` starts
two gloo processes (10 DPO steps, no merge, no evaluation). The debug hook of helpers.training
(``$COURSE_TRACE_DIR``) makes each process write what it trained on and a checksum of its LoRA weights, and the
test reads them: the processes saw different pairs, the loss fell, both replicas ended bit-identical, and only
one adapter was written - the one both replicas hold. Also checks that the three launch configs parse.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.paths import REPO_ROOT

CONFIGS = REPO_ROOT / "configs" / "accelerate"
STEPS = 10
T4_STEPS = 2
TIMEOUT_S = 840  # under pytest-timeout's 900


def _accelerate_cli() -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch"]


def _launch(root: Path, profile: str, steps: int, **extra_env: str) -> dict:
    """``accelerate launch`` two CPU processes training ``profile`` for ``steps`` steps; their traces and output."""
    env = {k: v for k, v in os.environ.items() if k not in {"COURSE_PROFILE", "COURSE_OUTPUT_DIR", "COURSE_STANDINS"}}
    env.update(
        COURSE_TRACE_DIR=str(root / "trace"),
        OMP_NUM_THREADS="1",  # one thread per process: two processes on two cores
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=str(REPO_ROOT),
        CUDA_VISIBLE_DEVICES="",  # the CPU path even where a GPU exists
        **extra_env,
    )
    cmd = [
        *_accelerate_cli(),
        "--config_file", str(CONFIGS / "cpu_2proc_test.yaml"),
        "-m", "helpers", "run", "--profile", profile, "--max-steps", str(steps),
        "--output-dir", str(root / "out"), "--no-eval", "--no-merge",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    traces = sorted((root / "trace").glob("rank*.json"))
    return {
        "root": root,
        "out": root / "out",
        "traces": [json.loads(p.read_text()) for p in traces],
        "stdout": proc.stdout,
    }


@pytest.fixture(scope="module")
def two_process_run(tiny_model_path, tmp_path_factory) -> dict:
    return _launch(tmp_path_factory.mktemp("ddp"), "tiny", STEPS)


@pytest.fixture(scope="module")
def two_process_t4_run(tmp_path_factory) -> dict:
    """The same on the t4 profile's offline stand-ins: a Qwen2 in 4-bit NF4 with gradient checkpointing."""
    return _launch(tmp_path_factory.mktemp("ddp-t4"), "t4", T4_STEPS, COURSE_STANDINS="1")


def test_two_processes_trained_together(two_process_run):
    traces = two_process_run["traces"]
    assert [t["rank"] for t in traces] == [0, 1], "expected one trace per process (ranks 0 and 1)"
    assert all(t["world_size"] == 2 and t["global_step"] == STEPS for t in traces)


def test_the_processes_trained_on_different_pairs(two_process_run):
    rank0, rank1 = (t["batches"] for t in two_process_run["traces"])
    assert len(rank0) == len(rank1) > 0, "both processes take the same number of micro-batches"
    assert all(a != b for a, b in zip(rank0, rank1)), "some micro-batch was the same on both processes"
    seen0, seen1 = ({pair for batch in batches for pair in batch} for batches in (rank0, rank1))
    # 10 steps x 16 pairs per process = 320 of the 800 pairs: inside one epoch the shards are disjoint
    assert not seen0 & seen1, f"{len(seen0 & seen1)} pairs were trained on by both processes"
    assert len(seen0) == len(seen1) == STEPS * 16


def test_the_loss_fell(two_process_run):
    losses = [loss for _, loss in two_process_run["traces"][0]["losses"]]
    assert len(losses) >= 2, losses
    assert losses[-1] < losses[0], f"loss did not fall: {losses}"
    assert two_process_run["traces"][1]["losses"] == two_process_run["traces"][0]["losses"]  # one averaged log


def test_the_replicas_end_identical(two_process_run):
    sums = {t["lora_sha256"] for t in two_process_run["traces"]}
    assert len(sums) == 1, "the two processes ended with different LoRA weights"


def _saved_adapter_checksum(adapter: Path) -> str:
    """helpers.training.trainable_checksum, recomputed from the saved file (PEFT drops the adapter name)."""
    from safetensors.torch import load_file

    tensors = load_file(adapter / "adapter_model.safetensors")
    named = {}
    for key, value in tensors.items():
        for part in ("lora_A", "lora_B"):
            key = key.replace(f".{part}.weight", f".{part}.default.weight")
        named[key] = value
    digest = hashlib.sha256()
    for name in sorted(named):
        digest.update(name.encode())
        digest.update(named[name].float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def test_exactly_one_adapter_was_saved_and_it_is_the_replicas(two_process_run):
    out = two_process_run["out"]
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == ["tiny-main"], runs
    adapters = sorted(p.relative_to(out).as_posix() for p in out.rglob("*adapter*") if p.is_dir())
    assert adapters == ["runs/tiny-main/adapter"], f"adapter folders written: {adapters}"
    leftovers = [p.name for p in (out / "runs" / "tiny-main").iterdir() if p.name.startswith(".")]
    assert not leftovers, f"half-written folders left behind: {leftovers}"
    adapter = out / "runs" / "tiny-main" / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "course_profile.json").is_file()
    assert _saved_adapter_checksum(adapter) == two_process_run["traces"][0]["lora_sha256"]
    assert not (out / "runs" / "tiny-main" / "merged").exists() and not (out / "eval_results.json").exists()
    history = json.loads((out / "runs" / "tiny-main" / "history.json").read_text())
    assert history[-1]["step"] == STEPS and history[-1]["epoch"] == pytest.approx(STEPS * 16 * 2 / 800)


@pytest.mark.parametrize(
    ("name", "kind"),
    [("cpu_2proc_test.yaml", "MULTI_GPU"), ("multi_gpu_ddp.yaml", "MULTI_GPU"), ("fsdp_qlora.yaml", "FSDP")],
)
def test_launch_configs_parse(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CONFIGS / name))
    assert config.distributed_type.value == kind and config.num_processes == 2 and config.num_machines == 1
    if kind == "FSDP":
        fsdp = config.fsdp_config
        assert fsdp["fsdp_cpu_ram_efficient_loading"] is True and fsdp["fsdp_use_orig_params"] is False
        assert fsdp["fsdp_sync_module_states"] is True


def test_fsdp_stores_4bit_weights_in_the_compute_dtype(monkeypatch):
    import torch

    from helpers.loading import bnb_config, fsdp_enabled
    from helpers.profiles import get_profile

    full = get_profile("full", check_hardware=False)
    assert bnb_config(full).bnb_4bit_quant_storage == torch.uint8  # bitsandbytes' default, single GPU
    config = bnb_config(full, quant_storage=torch.bfloat16)
    assert config.bnb_4bit_quant_storage == torch.bfloat16
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert fsdp_enabled()
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    assert not fsdp_enabled()


def test_on_the_t4_standin_the_processes_split_the_pairs_and_end_identical(two_process_t4_run):
    traces = two_process_t4_run["traces"]
    assert [t["rank"] for t in traces] == [0, 1] and all(t["global_step"] == T4_STEPS for t in traces)
    seen0, seen1 = ({pair for batch in t["batches"] for pair in batch} for t in traces)
    assert seen0 and not seen0 & seen1, "the two processes trained on some of the same pairs"
    assert len({t["lora_sha256"] for t in traces}) == 1, "the two replicas ended with different LoRA weights"
    adapter = two_process_t4_run["out"] / "runs" / "t4-main" / "adapter"
    assert _saved_adapter_checksum(adapter) == traces[0]["lora_sha256"]
    assert two_process_t4_run["stdout"].startswith("OFFLINE STAND-INS")
