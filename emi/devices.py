"""Where work runs: the rank and device of this process, for the commands that are not training runs (feature
extraction, evaluation and batch prediction, launched on one process or several: accelerate launch, torchrun,
srun), and batches moved to a device.

Where one rank reads what the others wrote (rank 0 checks every feature shard, writes the manifest or the report),
it first waits for all of them at `wait_for_ranks`, which says on stderr that it is waiting: a rank held back by a
slow disk or a busy machine then shows as a wait, not as a missing file.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from accelerate import PartialState


def process_state() -> PartialState:
    """This process's rank and the world size (one process when nothing launched several); gloo on the CPU."""
    return PartialState(cpu=not torch.cuda.is_available())  # without cpu=True accelerate sees one process on CPU


def wait_for_ranks(state: PartialState, done: str) -> None:
    """Every rank calls this once it has `done` its share; it returns when every rank has."""
    if state.num_processes > 1:
        print(f"rank {state.process_index}: {done}; waiting for the other ranks", file=sys.stderr, flush=True)
    state.wait_for_everyone()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def move_to_device(
    batch: dict[str, Any], device: torch.device, float_dtype: torch.dtype | None = None
) -> dict[str, Any]:
    """Tensors to the device; floating inputs cast when DeepSpeed runs the model in bf16/fp16 (no autocast)."""
    moved = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if float_dtype is not None and value.is_floating_point() and key != "labels":
                value = value.to(float_dtype)
        moved[key] = value
    return moved
