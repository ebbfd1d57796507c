"""The one evaluation pass, shared by Stage I retrieval, Stage II Pearson, `emi evaluate` and feature extraction.

Evaluation loaders give every rank the same number of full batches, so their last batches wrap around to the
start of the data: some samples come twice. `evaluation_batches` marks each row the pass has not yielded before
(on this process); `collect` runs a forward function over the whole set and gathers its outputs from every rank,
each sample exactly once, in the same order on every rank.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import gather, gather_object

from emi.devices import move_to_device

Forward = Callable[[dict[str, Any]], dict[str, torch.Tensor]]  # batch on device -> {name: [B, ...] tensor}


def evaluation_batches(
    data: Any, device: torch.device | str, float_dtype: torch.dtype | None = None
) -> Iterator[tuple[dict[str, Any], list[bool]]]:
    """(batch with its tensors on `device`, fresh) for one pass over `data` (an emi.data.DataInfo, epoch 0),
    without gradients; fresh[i] is False where row i's sample came earlier in the pass."""
    data.set_epoch(0)
    seen: set[str] = set()
    with torch.no_grad():
        for batch in data.dataloader:
            fresh = []
            for key in batch["key"]:  # a small data set can repeat within one batch too
                fresh.append(key not in seen)
                seen.add(key)
            yield move_to_device(batch, torch.device(device), float_dtype), fresh


def collect(
    data: Any,
    forward: Forward,
    accelerator: Accelerator | PartialState | None = None,
    device: torch.device | str = "cpu",
    float_dtype: torch.dtype | None = None,
) -> tuple[list[str], dict[str, torch.Tensor]]:
    """(keys, {name: [N, ...] on the CPU}) of `forward` over every sample of `data`, each sample once.

    With an accelerator (or the process state of a command on several ranks) every rank must call this (it
    gathers), on its own share of the data, and gets the same result; without one (a single process) `device` says
    where the batches go."""
    if accelerator is not None:
        device = accelerator.device
    keys: list[str] = []
    parts: dict[str, list[torch.Tensor]] = {}
    for batch, _ in evaluation_batches(data, device, float_dtype):
        for name, tensor in forward(batch).items():
            parts.setdefault(name, []).append(tensor)
        keys.extend(batch["key"])
    outputs = {name: torch.cat(tensors) for name, tensors in parts.items()}
    return gather_unique(accelerator, keys, outputs)


def gather_unique(
    accelerator: Accelerator | PartialState | None, keys: list[str], tensors: dict[str, torch.Tensor]
) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Every rank's rows of `tensors` (first dim matching `keys`) on the CPU, each key once (its first occurrence
    in rank order); without an accelerator, this process's rows. Every rank calls this and gets the same result."""
    if accelerator is not None and accelerator.num_processes > 1:
        keys = gather_object(keys)  # in rank order, like gather
        tensors = {name: gather(tensor.contiguous()) for name, tensor in tensors.items()}
    first = sorted({key: i for i, key in reversed(list(enumerate(keys)))}.values())
    return [keys[i] for i in first], {name: tensor.cpu()[first] for name, tensor in tensors.items()}
