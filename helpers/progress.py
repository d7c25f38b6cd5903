"""Progress and timing of training runs: one compact progress bar, and one step timer.

The Trainer's own display prints every logged dict (hundreds of lines in a notebook); :func:`compact_progress`
replaces it with one bar named after what trains. :class:`StepTimer` records how long each optimizer step took; the
course's comparisons, the benchmarks and the GPU measurement all read their seconds per step from it.
"""

from __future__ import annotations

import contextlib
import os
import resource
import time
from collections.abc import Iterator

import torch
from tqdm.auto import tqdm
from transformers import PrinterCallback, ProgressCallback, TrainerCallback
from transformers.utils.notebook import NotebookProgressCallback


class CompactProgress(TrainerCallback):
    """One tqdm bar over the optimizer steps, showing the latest loss (and reward accuracy where logged)."""

    def __init__(self, desc: str, every_seconds: float = 5.0) -> None:
        self.desc, self.every_seconds = desc, every_seconds
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, desc=self.desc, mininterval=self.every_seconds, dynamic_ncols=True)
            self.bar.update(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs and "loss" in logs:
            acc = logs.get("rewards/accuracies")
            self.bar.set_postfix(loss=f"{logs['loss']:.3f}", **({"acc": f"{acc:.2f}"} if acc is not None else {}))

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def compact_progress(trainer, desc: str = "training steps", every_seconds: float = 5.0):
    """Swap the trainer's log-printing progress display for one :class:`CompactProgress` bar called ``desc``.

    ``desc`` names what trains ("DPO steps", "ORPO steps", "reward model steps"); the bar refreshes at most
    every ``every_seconds``. Returns the trainer.
    """
    for callback in (PrinterCallback, ProgressCallback, NotebookProgressCallback):
        trainer.remove_callback(callback)
    trainer.add_callback(CompactProgress(desc, every_seconds))
    return trainer


def silence_trainer(trainer):
    """No progress bar and no per-step log lines at all (for logs and for runs nobody watches); returns it."""
    for callback in (PrinterCallback, ProgressCallback, NotebookProgressCallback):
        trainer.remove_callback(callback)
    return trainer


@contextlib.contextmanager
def no_bars() -> Iterator[None]:
    """No tqdm bar from anything inside the block: TRL's "Computing reference log probs" bar, shown while a trainer
    is built with ``precompute_ref_log_probs``, listens only to ``$TQDM_DISABLE``."""
    before = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = before


def major_page_faults() -> int:
    """Major page faults of this process so far: pages read back from disk (a step that needs many runs slowly)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_majflt


class StepTimer(TrainerCallback):
    """Wall time (``seconds``), CPU time of this process (``cpu_seconds``) and major page faults of every step.

    On a machine shared with other work the wall time grows with the competition for the cores, the CPU time much
    less, so both are kept. ``sync_cuda``: wait for the GPU at both ends of a step, so that a step's time is its own.
    """

    def __init__(self, sync_cuda: bool = False) -> None:
        self.sync_cuda = sync_cuda
        self.seconds: list[float] = []
        self.cpu_seconds: list[float] = []
        self.major_faults: list[int] = []
        self._t0 = self._c0 = 0.0
        self._f0 = 0

    def on_step_begin(self, args, state, control, **kwargs):
        if self.sync_cuda:
            torch.cuda.synchronize()
        self._t0, self._c0, self._f0 = time.perf_counter(), time.process_time(), major_page_faults()

    def on_step_end(self, args, state, control, **kwargs):
        if self.sync_cuda:
            torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - self._t0)
        self.cpu_seconds.append(time.process_time() - self._c0)
        self.major_faults.append(major_page_faults() - self._f0)

    def seconds_per_step(self, skip: int = 0) -> float:
        """The median wall time of the steps after the first ``skip`` (warm-up); NaN before any step."""
        return median(self.seconds[skip:] or self.seconds)


def median(values: list[float]) -> float:
    """The median of ``values`` (NaN for an empty list)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
