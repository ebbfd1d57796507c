"""Exponential moving average of the weights (the paper: decay 0.999), used for evaluation and export."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from emi.errors import UsageError


class EMA:
    """Full fp32 copies of the trainable weights on every rank (needs unpartitioned parameters: DDP or ZeRO-2).

    The decay warms up as min(decay, (1 + n) / (10 + n)) over n updates, so short runs are not dominated by the
    random initial weights.
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}

    def current_decay(self) -> float:
        """The decay the next update uses."""
        return min(self.decay, (1 + self.updates + 1) / (10 + self.updates + 1))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        decay = self.current_decay()
        self.updates += 1
        for name, param in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(param.detach().float(), 1.0 - decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**self.shadow, "__updates__": torch.tensor(self.updates)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        updates = int(state.pop("__updates__"))
        mismatched = set(self.shadow) ^ set(state)
        if mismatched:
            raise UsageError(f"EMA state does not match the model: {sorted(mismatched)[:5]}")
        self.updates = updates
        self.shadow = {n: t.float() for n, t in state.items()}

    @contextmanager
    def applied(self, model: torch.nn.Module) -> Iterator[None]:
        """Temporarily load the EMA weights into `model` (for evaluation and export)."""
        backup = {}
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in self.shadow:
                    backup[name] = param.detach().clone()
                    param.copy_(self.shadow[name].to(param.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if name in backup:
                        param.copy_(backup[name])
