"""Resuming on another number of processes: the layout the run continues with, decided before anything is built.

A checkpoint records the layout that wrote it (emi.formats.checkpoint.Layout: processes, workers, batch size,
gradient accumulation). When a run resumes with another number of processes, `train.resize` says what keeps the
global batch (processes x batch_size x grad_accum):

- `accum` (default): grad_accum changes, the per-process batch (and memory) stays. The losses of both stages are
  taken over the batch gathered from all processes in one micro-step, so that batch changes with the processes.
- `batch`: data.batch_size changes, so each micro-step gathers the same samples as before and training continues as
  it would have on the old number of processes (within float rounding); the memory per process changes with it.
- `rank`: nothing changes; the global batch follows the number of processes (the learning rate is not scaled).

A resumed run always continues with the checkpoint's batch size and accumulation, adapted this way (not with
different ones in the config); the number of dataloader workers may change freely. Where the chosen way does not
divide evenly the run stops with a UsageError that says which ways would. The
decision needs the saved layout before the accelerator is built (DeepSpeed fixes batch and accumulation when it
starts), so `resized_config` reads the trainer state of the checkpoint `train.resume` points at; the loop checks
after loading that the checkpoint it verified and loaded has that same layout.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from emi.engine.checkpointer import checkpoints
from emi.errors import UsageError
from emi.formats.checkpoint import STATE_FILE, Layout, read_trainer_state


def current_layout(config: Any, world_size: int) -> Layout:
    return Layout(world_size, config.data.num_workers, config.data.batch_size, config.train.grad_accum)


def launched_world_size() -> int:
    """The number of processes the launcher started (every launcher emi supports sets WORLD_SIZE; plain python: 1)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def resume_layout(run_dir: Path, resume: str) -> Layout | None:
    """The layout of the checkpoint `train.resume` points at (latest: the newest with a trainer state), None when
    there is none or it did not record one."""
    if resume == "none":
        return None
    if resume == "latest":
        found = [path for path in checkpoints(run_dir) if (path / STATE_FILE).is_file()]
        if not found:
            return None
        path = found[-1]
    else:
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            return None  # the checkpointer says why, once the processes are up
    return read_trainer_state(path).layout


def resized(saved: Layout, world_size: int, mode: str) -> tuple[int, int]:
    """(batch_size, grad_accum) on `world_size` processes for a run that `saved` wrote, as `mode` says."""
    if world_size == saved.world_size or mode == "rank":
        return saved.batch_size, saved.grad_accum
    kept = _keeping_global_batch(saved, world_size, mode)
    if kept is not None:
        return kept
    ways = [f"train.resize={other}" for other in ("accum", "batch") if _keeping_global_batch(saved, world_size, other)]
    raise UsageError(
        f"train.resize={mode}: the global batch {saved.global_batch} ({saved.describe()}) cannot be kept on "
        f"{world_size} processes by changing {'grad_accum' if mode == 'accum' else 'data.batch_size'}; "
        f"use {' or '.join([*ways, 'train.resize=rank'])} (the global batch then follows the processes)"
    )


def _keeping_global_batch(saved: Layout, world_size: int, mode: str) -> tuple[int, int] | None:
    """(batch_size, grad_accum) that keep the global batch by changing what `mode` names; None where it does not
    divide."""
    if mode == "accum" and saved.global_batch % (world_size * saved.batch_size) == 0:
        return saved.batch_size, saved.global_batch // (world_size * saved.batch_size)
    if mode == "batch" and saved.global_batch % (world_size * saved.grad_accum) == 0:
        return saved.global_batch // (world_size * saved.grad_accum), saved.grad_accum
    return None


def resized_config(config: Any, run_dir: Path, world_size: int) -> Any:
    """`config` with the batch size and accumulation a resume on `world_size` processes continues with: those of the
    checkpoint, adapted to the number of processes (a resumed run keeps its global batch; the workers may change)."""
    saved = resume_layout(run_dir, config.train.resume)
    if saved is None:
        return config
    batch_size, grad_accum = resized(saved, world_size, config.train.resize)
    return dataclasses.replace(
        config,
        data=dataclasses.replace(config.data, batch_size=batch_size),
        train=dataclasses.replace(config.train, grad_accum=grad_accum),
    )


def resize_line(saved: Layout, now: Layout, mode: str) -> str:
    """The log line of a resume under another layout."""
    if saved.world_size == now.world_size:
        return f"resumed under another layout: {saved.describe()} before, {now.describe()} now"
    if saved.global_batch == now.global_batch:
        kept = f"global batch {now.global_batch} kept (train.resize={mode})"
    else:
        kept = f"global batch {saved.global_batch} -> {now.global_batch} (train.resize={mode}; the lr is not scaled)"
    return (
        f"resumed from {saved.world_size} to {now.world_size} processes: {kept}; batch {saved.batch_size} -> "
        f"{now.batch_size}, grad_accum {saved.grad_accum} -> {now.grad_accum}"
    )
