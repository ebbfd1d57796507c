"""The one training loop, shared by Stage I and Stage II.

A stage hands `fit` a `Task`: its model, its training data, how to compute the loss on a batch, how to evaluate,
and how to export weights. The loop owns everything else: optimizer (AdamW), the SGDR schedule, gradient
accumulation and clipping, EMA, checkpoints and exact resume, stop signals, TensorBoard and the console line.

Collectives in here (gradient sync, the stop-flag all-reduce, metric reduction, checkpoint barriers, the ZeRO-3
state-dict gather) sit on code paths that every rank walks in the same order: ranks see the same number of
batches per epoch (the data plan guarantees it) and every branch depends only on values that are equal on all
ranks (step counters, agreed flags). Side effects that only rank 0 performs are guarded where they happen.
"""
from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from emi.config import OptimSection, TrainSection, save_config
from emi.engine.checkpoint import (
    TrainerState, load_checkpoint, remove_stale_temporaries, resolve_resume, save_checkpoint)
from emi.engine.distributed import describe
from emi.engine.logging import RunLogger, format_scalars
from emi.engine.signals import StopRequest, requeue_slurm_job
from emi.errors import UsageError
from emi.io import write_json_atomic

LossFn = Callable[[torch.nn.Module, dict[str, Any]], tuple[torch.Tensor, dict[str, torch.Tensor]]]
EvalFn = Callable[[torch.nn.Module, Accelerator], dict[str, float]]
ExportFn = Callable[[dict[str, torch.Tensor], Path], None]


@dataclass
class Task:
    """What a stage hands to the loop."""

    model: torch.nn.Module
    train_data: Any  # emi.data.DataInfo: .dataloader, .num_batches, .set_epoch(epoch, skip_batches), .skipped()
    compute_loss: LossFn  # (model, batch on device) -> (loss, scalars to log)
    evaluate: EvalFn | None = None  # called on every rank; returns the same metrics on every rank
    export: ExportFn | None = None  # rank 0 only: (full state dict, folder) -> writes safetensors + config
    best_metric: str | None = None  # an `evaluate` metric to maximise; its best weights are exported to <run>/best


@dataclass
class FitResult:
    state: TrainerState
    stopped_by_signal: int | None
    run_dir: Path
    last_metrics: dict[str, float]


def sgdr_lr(step: int, optim: OptimSection, steps_per_epoch: int) -> float:
    """SGDR (Loshchilov & Hutter), as the paper: eta_min + (eta_max - eta_min)(1 + cos(pi T_cur / T_i)) / 2.

    Stepped per iteration; T_i = restart_epochs * steps_per_epoch; at each restart the learning rate jumps back
    to eta_max while the optimizer state (Adam moments) is kept. Optional linear warmup before the first cycle.
    """
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    cycle = max(1, round(optim.restart_epochs * steps_per_epoch))
    t_cur = (step - optim.warmup_steps) % cycle
    return optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1 + math.cos(math.pi * t_cur / cycle))


def build_optimizer(model: torch.nn.Module, optim: OptimSection) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms, embeddings of scale (1-D tensors) and logit scales (OpenCLIP)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "logit_scale" in name else decay).append(param)
    if not decay and not no_decay:
        raise UsageError("the model has no trainable parameters")
    groups = [{"params": _aligned_order(decay), "weight_decay": optim.weight_decay},
              {"params": _aligned_order(no_decay), "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=optim.lr, betas=tuple(optim.betas),
                             eps=optim.eps)


def _aligned_order(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """The group's tensors with those whose size is not a multiple of 8 elements (16 bytes in bf16) last.

    DeepSpeed ZeRO-1/2 flattens each group into one buffer and views the parameters into it, so a scalar such as a
    logit scale early in a group misaligns every tensor after it; cuBLAS then falls back to slow unaligned kernels
    for the biased matmuls (ViT-L/14 + BERT-base on an H200: 2x the step time, benchmarks/RESULTS.md).
    """
    return sorted(params, key=lambda param: param.numel() % 8 != 0)  # stable: keeps model order otherwise


class EMA:
    """Exponential moving average of the trainable weights (the paper: decay 0.999, used for eval and export).

    The decay warms up as min(decay, (1 + n) / (10 + n)) over n updates, so short runs are not dominated by the
    random initial weights. Kept as full fp32 copies on every rank (needs unpartitioned parameters: DDP or ZeRO-2).
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, param in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(param.detach().float(), 1.0 - decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**self.shadow, "__updates__": torch.tensor(self.updates)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.updates = int(state.pop("__updates__"))
        missing = set(self.shadow) ^ set(state)
        if missing:
            raise UsageError(f"EMA state does not match the model: {sorted(missing)[:5]}")
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


def move_to_device(batch: dict[str, Any], device: torch.device, float_dtype: torch.dtype | None) -> dict[str, Any]:
    """Tensors to the device; floating inputs cast when DeepSpeed runs the model in bf16/fp16 (no autocast)."""
    moved = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if float_dtype is not None and value.is_floating_point() and key != "labels":
                value = value.to(float_dtype)
        moved[key] = value
    return moved


def input_dtype(accelerator: Accelerator) -> torch.dtype | None:
    """DeepSpeed runs the model itself in bf16/fp16 (no autocast), so floating inputs must match it."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)


def fit(task: Task, accelerator: Accelerator, config: Any, run_dir: Path) -> FitResult:
    train: TrainSection = config.train
    is_main = accelerator.is_main_process
    logger = None
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
        remove_stale_temporaries(run_dir)
        logger = RunLogger(run_dir)
        logger.line(f"run {run_dir}: {describe(accelerator)} strategy={train.strategy}")
    accelerator.wait_for_everyone()

    steps_per_epoch = task.train_data.num_batches // train.grad_accum
    if steps_per_epoch < 1:
        raise UsageError(f"{task.train_data.num_batches} batches per epoch cannot fill one optimizer step with "
                         f"grad_accum={train.grad_accum}; lower data.batch_size or train.grad_accum")
    total_steps = train.epochs * steps_per_epoch
    if train.max_steps:
        total_steps = min(total_steps, train.max_steps)

    optimizer = build_optimizer(task.model, config.optim)
    model, optimizer = accelerator.prepare(task.model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    ema = None
    if train.ema_decay > 0:
        if accelerator.distributed_type == DistributedType.DEEPSPEED and train.strategy == "zero3":
            raise UsageError("train.ema_decay needs unpartitioned weights: use strategy ddp or zero2")
        ema = EMA(unwrapped, train.ema_decay)

    state = TrainerState()
    resume_from = resolve_resume(run_dir, train.resume)
    if resume_from is not None:
        state, ema_state = load_checkpoint(accelerator, resume_from)
        if ema is not None and ema_state is not None:
            ema.load_state_dict(ema_state)
        if is_main:
            logger.line(f"resumed from {resume_from}: epoch {state.epoch} step {state.step} "
                        f"(batch {state.batch_in_epoch} of the epoch)")
    elif is_main and train.resume == "latest":
        logger.line("no checkpoint to resume from; starting fresh")

    float_dtype = input_dtype(accelerator)

    stop = StopRequest()
    stopped_by: int | None = None
    last_metrics: dict[str, float] = {}
    window: list[torch.Tensor] = []
    scalar_names: list[str] = []
    window_start = time.perf_counter()
    batch_size = config.data.batch_size

    def checkpoint() -> None:
        save_checkpoint(accelerator, run_dir, state, train.keep_last, ema.state_dict() if ema else None)

    def evaluate_and_export_best() -> None:
        nonlocal last_metrics
        with ema.applied(unwrapped) if ema else nullcontext():
            model.eval()
            metrics = task.evaluate(model, accelerator)
            model.train()
            improved = bool(task.best_metric) and (
                state.best_metric is None or metrics[task.best_metric] > state.best_metric)
            if improved:
                state.best_metric, state.best_step = metrics[task.best_metric], state.step
                export(run_dir / "best", extra={"step": state.step, "epoch": state.epoch, **metrics})
        last_metrics = metrics
        if is_main:
            logger.scalars(metrics, state.step, prefix="val/")
            logger.line(f"epoch {state.epoch} val: {format_scalars(metrics)}" + (" (best)" if improved else ""))

    def export(folder: Path, extra: dict[str, Any]) -> None:
        if task.export is None:
            return
        full_state = accelerator.get_state_dict(model)  # every rank: ZeRO-3 gathers the partitions here
        if is_main:
            task.export(full_state, folder)
            write_json_atomic(folder / "trainer.json", extra)
        accelerator.wait_for_everyone()

    batches_per_epoch = steps_per_epoch * train.grad_accum  # leftovers beyond whole optimizer steps are unused
    model.train()
    while state.step < total_steps and stopped_by is None:
        task.train_data.set_epoch(state.epoch, skip_batches=state.batch_in_epoch)
        # A checkpoint taken on an epoch's last step resumes straight into the epoch's end.
        batches = task.train_data.dataloader if state.batch_in_epoch < batches_per_epoch else ()
        for batch in batches:
            for group in optimizer.param_groups:
                group["lr"] = sgdr_lr(state.step, config.optim, steps_per_epoch)
            batch = move_to_device(batch, accelerator.device, float_dtype)
            with accelerator.accumulate(model):
                loss, scalars = task.compute_loss(model, batch)
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), train.clip_grad)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            state.batch_in_epoch += 1
            scalar_names = ["loss", *scalars]
            window.append(torch.stack([loss.detach().float(), *(v.detach().float() for v in scalars.values())]))
            if not accelerator.sync_gradients:
                continue
            state.step += 1
            if ema is not None:
                ema.update(unwrapped)

            if state.step % train.log_every == 0:
                means = accelerator.reduce(torch.stack(window).mean(0), reduction="mean").tolist()
                elapsed = time.perf_counter() - window_start
                if is_main:
                    values = dict(zip(scalar_names, means))
                    values["lr"] = optimizer.param_groups[0]["lr"]
                    if grad_norm is not None:
                        values["grad_norm"] = float(grad_norm)
                    values["samples_per_s"] = len(window) * batch_size * accelerator.num_processes / elapsed
                    logger.scalars(values, state.step, prefix="train/")
                    logger.line(f"epoch {state.epoch} step {state.step}/{total_steps} {format_scalars(values)}")
                window, window_start = [], time.perf_counter()

            stopped_by = stop.agreed(accelerator)
            epoch_done = state.batch_in_epoch >= batches_per_epoch  # the epoch end checkpoints below
            if stopped_by is not None or (state.step % train.checkpoint_every == 0 and not epoch_done):
                checkpoint()
            if stopped_by is not None or state.step >= total_steps or epoch_done:
                break

        if stopped_by is not None:
            break
        if state.batch_in_epoch < batches_per_epoch:
            if state.step >= total_steps:  # train.max_steps ends the run mid-epoch
                checkpoint()
                break
            raise RuntimeError(f"the training data yielded {state.batch_in_epoch} batches in epoch {state.epoch}, "
                               f"expected {batches_per_epoch}")
        skipped = int(accelerator.reduce(torch.tensor(task.train_data.skipped(), device=accelerator.device),
                                         reduction="sum"))
        if is_main and skipped:
            logger.scalars({"skipped_samples": skipped}, state.step, prefix="train/")
            logger.line(f"epoch {state.epoch}: skipped {skipped} corrupt or unreadable samples (see the warnings)")
        state.epoch += 1
        state.batch_in_epoch = 0
        if task.evaluate is not None and (state.epoch % train.eval_every == 0 or state.step >= total_steps):
            evaluate_and_export_best()
        checkpoint()

    if stopped_by is not None:
        if is_main:
            logger.line(f"stopped by signal {stopped_by} at step {state.step}; checkpoint saved, "
                        "continue with --resume latest")
            if stopped_by == signal.SIGUSR1 and (job := requeue_slurm_job()):  # SIGUSR1: the time limit is near
                logger.line(f"requeued Slurm job {job}")
    else:
        with ema.applied(unwrapped) if ema else nullcontext():
            export(run_dir / "export", extra={"step": state.step, "epoch": state.epoch})
        if is_main:
            logger.line(f"done: {state.step} steps; exported to {run_dir / 'export'}")
    if is_main:
        logger.close()
    accelerator.wait_for_everyone()
    return FitResult(state=state, stopped_by_signal=stopped_by, run_dir=run_dir, last_metrics=last_metrics)

