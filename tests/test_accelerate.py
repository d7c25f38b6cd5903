"""Scaling out with accelerate: two data-parallel processes on the CPU really share the work (docs/scale_out.md).

``accelerate launch --config_file configs/accelerate/cpu_2proc_test.yaml scripts/dpo.py --profile tiny`` starts two
gloo processes. They run through tests/_train_worker.py, which runs the script unchanged and makes each process
record what it trained on (``rank<N>.json``: a hash of every pair of every micro-batch, the logged losses and a
checksum of its LoRA weights). From those records: the processes saw disjoint pairs, the loss fell, both replicas
ended bit-identical, and the one adapter written is that replica. The same on the t4 profile's offline stand-in (a
Qwen2 in 4-bit NF4 with gradient checkpointing). Also: the three launch configs parse as what they claim to be.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from safetensors.torch import load_file

from helpers.profiles import REPO_ROOT, get_profile

CONFIGS = REPO_ROOT / "configs" / "accelerate"
WORKER = REPO_ROOT / "tests" / "_train_worker.py"
STEPS, T4_STEPS = 10, 2
TIMEOUT_S = 840  # under pytest-timeout's 900


def _launch(root: Path, profile: str, steps: int, **extra_env: str) -> dict:
    """Two CPU processes training ``profile`` for ``steps`` steps (no merge); their traces, output folder and log."""
    env = {k: v for k, v in os.environ.items() if k not in {"COURSE_PROFILE", "COURSE_OUTPUT_DIR", "COURSE_STANDINS"}}
    env.update(OMP_NUM_THREADS="1",  # one thread per process: two processes on two cores
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(REPO_ROOT), CUDA_VISIBLE_DEVICES="", **extra_env)  # the CPU path even beside a GPU
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "cpu_2proc_test.yaml"),
           str(WORKER), "dpo", str(root / "trace"),
           "--profile", profile, "--max-steps", str(steps), "--output-dir", str(root / "out"), "--no-merge"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    traces = [json.loads(p.read_text()) for p in sorted((root / "trace").glob("rank*.json"))]
    return {"out": root / "out", "traces": traces, "stdout": proc.stdout}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> dict:
    return _launch(tmp_path_factory.mktemp("ddp"), "tiny", STEPS)


@pytest.fixture(scope="module")
def t4_run(tmp_path_factory) -> dict:
    return _launch(tmp_path_factory.mktemp("ddp-t4"), "t4", T4_STEPS, COURSE_STANDINS="1")


def _pairs(trace: dict) -> set[str]:
    return {pair for batch in trace["batches"] for pair in batch}


def _saved_adapter_checksum(adapter: Path) -> str:
    """The worker's trainable_checksum, recomputed from the saved file (PEFT drops the adapter's name on saving)."""
    named = {}
    for key, value in load_file(adapter / "adapter_model.safetensors").items():
        for part in ("lora_A", "lora_B"):
            key = key.replace(f".{part}.weight", f".{part}.default.weight")
        named[key] = value
    digest = hashlib.sha256()
    for name in sorted(named):
        digest.update(name.encode())
        digest.update(named[name].float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def test_the_two_processes_split_every_batch_into_disjoint_halves(tiny_run):
    traces = tiny_run["traces"]
    assert [t["rank"] for t in traces] == [0, 1] and all(t["world_size"] == 2 for t in traces)
    assert all(t["global_step"] == STEPS for t in traces)
    dpo = get_profile("tiny").dpo
    per_process = STEPS * dpo["per_device_train_batch_size"] * dpo["gradient_accumulation_steps"]
    # 10 steps x 16 pairs per process = 320 of the 800 pairs: within one epoch the two shards cannot overlap
    assert len(_pairs(traces[0])) == len(_pairs(traces[1])) == per_process
    assert not _pairs(traces[0]) & _pairs(traces[1]), "some pairs were trained on by both processes"


def test_the_loss_fell_and_both_processes_logged_the_same_average(tiny_run):
    losses = [loss for _, loss in tiny_run["traces"][0]["losses"]]
    assert len(losses) >= 2 and losses[-1] < losses[0], f"the loss did not fall: {losses}"
    assert tiny_run["traces"][1]["losses"] == tiny_run["traces"][0]["losses"]  # one log, averaged over processes


def test_one_adapter_was_written_and_it_is_what_both_replicas_hold(tiny_run):
    assert len({t["lora_sha256"] for t in tiny_run["traces"]}) == 1, "the replicas ended with different weights"
    out = tiny_run["out"]
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["tiny-main"]
    run = out / "runs" / "tiny-main"
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")], "half-written folders left behind"
    assert _saved_adapter_checksum(run / "adapter") == tiny_run["traces"][0]["lora_sha256"]
    assert not (run / "merged").exists()  # --no-merge
    history = json.loads((run / "history.json").read_text())
    # the logged epoch counts the pairs of both processes: 10 steps x 32 pairs of the 800
    assert history[-1]["step"] == STEPS and history[-1]["epoch"] == pytest.approx(STEPS * 32 / 800)


def test_on_the_t4_standin_the_processes_split_the_pairs_and_end_identical(t4_run):
    traces = t4_run["traces"]
    assert [t["rank"] for t in traces] == [0, 1] and all(t["global_step"] == T4_STEPS for t in traces)
    assert _pairs(traces[0]) and not _pairs(traces[0]) & _pairs(traces[1])
    assert len({t["lora_sha256"] for t in traces}) == 1, "the two replicas ended with different LoRA weights"
    assert _saved_adapter_checksum(t4_run["out"] / "runs" / "t4-main" / "adapter") == traces[0]["lora_sha256"]
    assert t4_run["stdout"].startswith("OFFLINE STAND-INS")


@pytest.mark.parametrize(("name", "kind"), [("cpu_2proc_test.yaml", "MULTI_GPU"), ("multi_gpu_ddp.yaml", "MULTI_GPU"),
                                            ("fsdp_qlora.yaml", "FSDP")])
def test_the_launch_configs_parse_as_what_they_claim(name, kind):
    config = load_config_from_file(str(CONFIGS / name))
    assert config.distributed_type.value == kind and config.num_processes == 2 and config.num_machines == 1
    assert config.mixed_precision == "no"  # the training config chooses the precision, as in one process
    if kind == "FSDP":  # PEFT's FSDP-QLoRA recipe
        fsdp = config.fsdp_config
        assert fsdp["fsdp_cpu_ram_efficient_loading"] is True and fsdp["fsdp_sync_module_states"] is True
        assert fsdp["fsdp_use_orig_params"] is False
