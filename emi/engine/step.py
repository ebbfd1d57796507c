"""One training step on one micro batch: forward, backward, and at the end of an accumulation clipping and the
optimizer step."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator

LossFn = Callable[[torch.nn.Module, dict[str, Any]], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class StepResult:
    loss: torch.Tensor
    scalars: dict[str, torch.Tensor]  # the loss function's own terms, to log
    synced: bool  # this micro batch ended an accumulation: the optimizer stepped
    grad_norm: torch.Tensor | None  # before clipping; on synced steps only


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, Any],
    compute_loss: LossFn,
    accelerator: Accelerator,
    clip_grad: float,
) -> StepResult:
    """One micro batch: forward and backward; on the last micro batch of an accumulation also gradient clipping
    and the optimizer step (accelerate and DeepSpeed skip them on the others). `batch` is already on the device."""
    with accelerator.accumulate(model):
        loss, scalars = compute_loss(model, batch)
        accelerator.backward(loss)
        grad_norm = None
        if accelerator.sync_gradients:
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return StepResult(loss=loss, scalars=scalars, synced=accelerator.sync_gradients, grad_norm=grad_norm)
