"""Workers the tests run in subprocesses: to kill them mid-way, to run two at once, or to launch them with accelerate.

    python tests/_train_worker.py train RUN_FOLDER --max-steps 12 --save-steps 4 [--resume]
    python tests/_train_worker.py train --run-id ID --max-steps 10
    python tests/_train_worker.py save-slowly TARGET MARKER
    accelerate launch --config_file configs/accelerate/cpu_2proc_test.yaml tests/_train_worker.py \
        dpo TRACE_DIR --profile tiny --max-steps 10 --no-merge

``train``: the tiny profile's DPO (helpers.training.train_dpo) into RUN_FOLDER (or, with ``--run-id``, into
helpers.runs.run_dir("tiny", ID) under $COURSE_OUTPUT_DIR), one logged loss per step, a checkpoint every
``--save-steps``, on one CPU thread.
``save-slowly``: helpers.runs.save_atomically with a save function that writes one file, touches MARKER and then
sleeps, so that a test can kill the process in the middle of a save.
``dpo``: scripts/dpo.py with its arguments, and a trace of what each process trained on (:func:`attach_trace`):
the data-parallel test (tests/test_accelerate.py) reads it. The trace is test tooling and lives here, not in the
script or in helpers/.

The functions below ``main`` start, watch and kill workers; the tests import them (tests/ is on sys.path).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 300  # seconds one worker may take on a busy 2-core machine


def training_profile(max_steps: int, save_steps: int):
    """The profile a ``train`` worker runs: tiny, shortened, one logged loss per step."""
    from helpers.profiles import get_profile

    return get_profile("tiny").with_changes("dpo", max_steps=max_steps, save_steps=save_steps, logging_steps=1)


def _train(args: argparse.Namespace) -> None:
    import torch

    from helpers.data import prepare_data
    from helpers.models import load_tokenizer
    from helpers.runs import run_dir
    from helpers.training import train_dpo

    torch.set_num_threads(1)
    profile = training_profile(args.max_steps, args.save_steps)
    folder = args.run_folder or run_dir(profile.name, args.run_id)
    data = prepare_data(profile, load_tokenizer(profile.model_id))
    run = train_dpo(profile, folder, data, resume=args.resume, progress=False)
    print(f"final loss {run.history[-1]['loss']!r} at step {int(run.history[-1]['step'])}", flush=True)


def _save_slowly(args: argparse.Namespace) -> None:
    from helpers.runs import save_atomically

    def _save(folder: Path) -> None:
        (folder / "model.safetensors").write_bytes(b"half of a new model")
        Path(args.marker).write_text(str(folder))
        time.sleep(120)  # killed here by the test

    save_atomically(_save, args.target)


def trainable_checksum(model) -> str:
    """SHA-256 of the trainable (LoRA) weights, by name: equal checksums mean bit-identical adapters."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def attach_trace(trainer, folder: str | Path) -> None:
    """Make this process record what it trains on: at the end of training it writes ``<folder>/rank<N>.json`` with
    ``batches`` (for each micro-batch, a short SHA-256 of each pair's chosen + rejected token ids), the losses the
    trainer logged, the checksum of its trainable weights and its step count."""
    from transformers import TrainerCallback

    folder = Path(folder)
    batches: list[list[str]] = []
    original_step = trainer.training_step

    def training_step(model, inputs, *args, **kwargs):
        ids, mask = inputs["input_ids"].detach().cpu(), inputs["attention_mask"].detach().cpu().bool()
        half = ids.shape[0] // 2  # TRL stacks the chosen rows, then the rejected rows
        batches.append([hashlib.sha256(ids[i][mask[i]].numpy().tobytes() + b"|"
                                       + ids[half + i][mask[half + i]].numpy().tobytes()).hexdigest()[:16]
                        for i in range(half)])
        return original_step(model, inputs, *args, **kwargs)

    class Trace(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            folder.mkdir(parents=True, exist_ok=True)
            record = {"rank": args.process_index, "world_size": args.world_size, "batches": batches,
                      "losses": [[e["step"], e["loss"]] for e in state.log_history if "loss" in e and "step" in e],
                      "lora_sha256": trainable_checksum(model), "global_step": state.global_step}
            (folder / f"rank{args.process_index}.json").write_text(json.dumps(record))

    trainer.training_step = training_step
    trainer.add_callback(Trace())


def _dpo(args: argparse.Namespace) -> None:
    from scripts import dpo  # the script switches the stand-ins on (COURSE_STANDINS) before its library imports

    prepare = dpo.prepare_trainer

    def traced(trainer, **kwargs):
        attach_trace(trainer, args.trace_dir)
        return prepare(trainer, **kwargs)

    dpo.prepare_trainer = traced
    sys.exit(dpo.main(dpo.make_parser().parse_args(args.script_args)))


def main() -> None:
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[var] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.path.insert(0, str(REPO_ROOT))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train")
    train.add_argument("run_folder", type=Path, nargs="?")
    train.add_argument("--run-id", default="main")
    train.add_argument("--max-steps", type=int, default=12)
    train.add_argument("--save-steps", type=int, default=4)
    train.add_argument("--resume", action="store_true")
    train.set_defaults(handler=_train)
    save = commands.add_parser("save-slowly")
    save.add_argument("target", type=Path)
    save.add_argument("marker", type=Path)
    save.set_defaults(handler=_save_slowly)
    dpo = commands.add_parser("dpo")
    dpo.add_argument("trace_dir", type=Path)
    dpo.add_argument("script_args", nargs=argparse.REMAINDER, help="scripts/dpo.py's own arguments")
    dpo.set_defaults(handler=_dpo)
    args = parser.parse_args()
    args.handler(args)


# --- launching workers (used by the tests) -------------------------------------------------------


def worker_env(output_dir: Path) -> dict[str, str]:
    """The environment of a worker: offline, one CPU thread, outputs under ``output_dir``."""
    env = dict(os.environ)
    env.update(
        COURSE_OUTPUT_DIR=str(output_dir),
        PYTHONPATH=str(REPO_ROOT),
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    return env


def start_worker(*args: str | Path, output_dir: Path, log: Path) -> subprocess.Popen:
    """Start this script with ``args``; its stdout and stderr go to ``log``."""
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), *map(str, args)],
            cwd=REPO_ROOT,
            env=worker_env(output_dir),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def finish(process: subprocess.Popen, log: Path) -> None:
    """Wait for a worker; fail with the end of its log when it did not exit cleanly."""
    try:
        code = process.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise AssertionError(f"worker timed out:\n{log.read_text()[-4000:]}") from None
    assert code == 0, f"worker exited with {code}:\n{log.read_text()[-4000:]}"


def complete_json(path: Path) -> bool:
    """True once ``path`` holds a whole JSON document (not one still being written)."""
    try:
        json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return True


def wait_for(
    path: Path, process: subprocess.Popen, log: Path, ready: Callable[[Path], bool] = Path.exists
) -> None:
    """Poll until ``ready(path)``; fail if the worker ends first or time runs out."""
    deadline = time.monotonic() + TIMEOUT
    while not ready(path):
        if process.poll() is not None:
            tail = log.read_text()[-4000:]
            raise AssertionError(f"worker ended ({process.returncode}) before {path} was ready:\n{tail}")
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise AssertionError(f"{path} was not ready within {TIMEOUT} s")
        time.sleep(0.02)


def kill(process: subprocess.Popen) -> None:
    """SIGKILL, as an out-of-memory killer or a closed Colab session ends a run: no handler, no cleanup."""
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL


if __name__ == "__main__":
    main()
