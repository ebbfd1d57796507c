"""Evaluation in the loop: the stage's evaluate function on the EMA weights (when there are), the best value of the
stage's metric tracked in the trainer state, and the best weights exported to `<run>/best` when it improves."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
from accelerate import Accelerator

from emi.engine.ema import EMA
from emi.engine.exporter import Exporter
from emi.engine.logging import RunLogger, format_scalars
from emi.formats.checkpoint import TrainerState

EvalFn = Callable[[torch.nn.Module, Accelerator], dict[str, float]]


class Evaluator:
    """`evaluate(model, state)`: every rank calls it (the stage's evaluate gathers); returns the metrics."""

    def __init__(
        self,
        evaluate_fn: EvalFn,
        best_metric: str | None,
        accelerator: Accelerator,
        unwrapped: torch.nn.Module,
        ema: EMA | None,
        exporter: Exporter,
        logger: RunLogger | None,
        epochs: int,
    ) -> None:
        self.evaluate_fn, self.best_metric, self.accelerator = evaluate_fn, best_metric, accelerator
        self.unwrapped, self.ema, self.exporter, self.logger, self.epochs = unwrapped, ema, exporter, logger, epochs

    def evaluate(self, model: torch.nn.Module, state: TrainerState) -> dict[str, float]:
        with self.ema.applied(self.unwrapped) if self.ema else nullcontext():
            model.eval()
            metrics = self.evaluate_fn(model, self.accelerator)
            model.train()
            improved = self.improves(metrics, state)
            if improved:  # the same on every rank: the metrics are
                state.best_metric, state.best_step = metrics[self.best_metric], state.step
                self.exporter.export(model, "best", {"step": state.step, "epoch": state.epoch, **metrics})
        if self.accelerator.is_main_process:
            self.logger.scalars(metrics, state.step, prefix="val/")
            self.logger.line(
                f"epoch {state.epoch}/{self.epochs} val: {format_scalars(metrics)}" + (" (best)" if improved else "")
            )
        return metrics

    def improves(self, metrics: dict[str, float], state: TrainerState) -> bool:
        return bool(self.best_metric) and (state.best_metric is None or metrics[self.best_metric] > state.best_metric)
