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

import shutil
import signal
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from emi import storage
from emi.config import TrainSection, save_config
from emi.engine.checkpoint import (
    TrainerState, create_run_id, load_checkpoint, read_run_id, remove_stale_temporaries, resolve_resume,
    save_checkpoint)
from emi.engine.distributed import describe, input_dtype, move_to_device
from emi.engine.ema import EMA
from emi.engine.logging import RunLogger, format_scalars
from emi.engine.optim import build_optimizer, sgdr_lr
from emi.engine.prepare import prepare_model
from emi.engine.signals import RequeueError, StopRequest, requeue_slurm_job
from emi.engine.telemetry import StepClock, step_scalars
from emi.errors import UsageError
from emi.io import replace_folder, write_json_atomic

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
    train_flops_per_sample: float | None = None  # model FLOPs of one training sample (emi.models.flops), for MFU


@dataclass
class FitResult:
    state: TrainerState
    stopped_by_signal: int | None
    run_dir: Path
    last_metrics: dict[str, float]
    requeue_failed: bool = False  # stopped for the time limit, but Slurm did not take the job back


@dataclass
class StepResult:
    loss: torch.Tensor
    scalars: dict[str, torch.Tensor]
    synced: bool  # this micro batch ended an accumulation: the optimizer stepped
    grad_norm: torch.Tensor | None  # before clipping; on synced steps only


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, Any], compute_loss: LossFn,
               accelerator: Accelerator, clip_grad: float) -> StepResult:
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


def fit(task: Task, accelerator: Accelerator, config: Any, run_dir: Path) -> FitResult:
    train: TrainSection = config.train
    is_main = accelerator.is_main_process
    logger = None
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
        remove_stale_temporaries(run_dir)
        create_run_id(run_dir)
        logger = RunLogger(run_dir)
        logger.line(f"run {run_dir}: {describe(accelerator)} strategy={train.strategy}")
    accelerator.wait_for_everyone()
    run_id = read_run_id(run_dir)

    steps_per_epoch = task.train_data.num_batches // train.grad_accum
    if steps_per_epoch < 1:
        raise UsageError(f"{task.train_data.num_batches} batches per epoch cannot fill one optimizer step with "
                         f"grad_accum={train.grad_accum}; lower data.batch_size or train.grad_accum")
    total_steps = train.epochs * steps_per_epoch
    if train.max_steps:
        total_steps = min(total_steps, train.max_steps)

    prepared = prepare_model(task.model, train)  # in place: parameter names stay as they are
    if is_main and prepared:
        logger.line("; ".join(prepared))
    optimizer = build_optimizer(task.model, config.optim)
    model, optimizer = accelerator.prepare(task.model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    ema = None
    if train.ema_decay > 0:
        if accelerator.distributed_type == DistributedType.DEEPSPEED and train.strategy == "zero3":
            raise UsageError("train.ema_decay needs unpartitioned weights: use strategy ddp or zero2")
        ema = EMA(unwrapped, train.ema_decay)

    state = TrainerState()
    resume_from, warnings = resolve_resume(accelerator, run_dir, train.resume, run_id, train.trust_checkpoint)
    if is_main:
        for warning in warnings:
            logger.line(f"warning: {warning}")
    if resume_from is not None:
        state, ema_state = load_checkpoint(accelerator, resume_from)
        if ema is not None and ema_state is not None:
            ema.load_state_dict(ema_state)
        if is_main:
            logger.line(f"resumed from {resume_from}: epoch {state.epoch + 1} step {state.step} "
                        f"(batch {state.batch_in_epoch} of the epoch)")
    elif is_main and train.resume == "latest":
        logger.line("no checkpoint to resume from; starting fresh")

    float_dtype = input_dtype(accelerator)

    stop = StopRequest()
    stopped_by: int | None = None
    last_metrics: dict[str, float] = {}
    window: list[torch.Tensor] = []
    scalar_names: list[str] = []
    clock = StepClock(accelerator.device)
    batch_size = config.data.batch_size

    def checkpoint() -> None:
        if train.save:
            with clock.paused():
                save_checkpoint(accelerator, run_dir, state, train.keep_last, run_id,
                                ema.state_dict() if ema else None)

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
            logger.line(f"epoch {state.epoch}/{train.epochs} val: {format_scalars(metrics)}"
                        + (" (best)" if improved else ""))

    def export(folder: Path, extra: dict[str, Any]) -> None:
        if task.export is None or not train.save:
            return
        full_state = accelerator.get_state_dict(model)  # every rank: ZeRO-3 gathers the partitions here
        if is_main:  # written aside and swapped in whole: a crash never leaves a half-written export
            tmp = folder.with_name(f".tmp-{folder.name}")
            shutil.rmtree(tmp, ignore_errors=True)
            task.export(full_state, tmp)
            write_json_atomic(tmp / "trainer.json", extra)
            replace_folder(tmp, folder)
            if config.run.publish_to:  # checkpoints stay local; the exports may go to object storage too
                target = storage.join(config.run.publish_to, folder.name)
                try:
                    storage.upload_folder(folder, target, last="trainer.json")
                except (OSError, UsageError) as err:  # the local export stands; the next export publishes again
                    logger.line(f"error: could not publish {folder} to {storage.shown(target)}: {err}")
        accelerator.wait_for_everyone()

    batches_per_epoch = steps_per_epoch * train.grad_accum  # leftovers beyond whole optimizer steps are unused
    model.train()
    while state.step < total_steps and stopped_by is None:
        task.train_data.set_epoch(state.epoch, skip_batches=state.batch_in_epoch)
        # A checkpoint taken on an epoch's last step resumes straight into the epoch's end.
        batches = task.train_data.dataloader if state.batch_in_epoch < batches_per_epoch else ()
        for batch in clock.batches(batches):
            for group in optimizer.param_groups:
                group["lr"] = sgdr_lr(state.step, config.optim, steps_per_epoch)
            batch = move_to_device(batch, accelerator.device, float_dtype)
            result = train_step(model, optimizer, batch, task.compute_loss, accelerator, train.clip_grad)
            state.batch_in_epoch += 1
            scalar_names = ["loss", *result.scalars]
            window.append(torch.stack([result.loss.detach().float(),
                                       *(v.detach().float() for v in result.scalars.values())]))
            if not result.synced:
                continue
            state.step += 1
            if ema is not None:
                ema.update(unwrapped)

            # the first step and the last are always logged: a run shorter than log_every still has a curve
            if state.step % train.log_every == 0 or state.step in (1, total_steps):
                elapsed, data_wait = clock.close_window()
                # one all-reduce (sum) for the loss means, the times (averaged over ranks below) and the skips
                local = torch.cat([torch.stack(window).mean(0).to(accelerator.device),
                                   torch.tensor([elapsed, data_wait, task.train_data.skipped()],
                                                device=accelerator.device)])
                totals = accelerator.reduce(local, reduction="sum").tolist()
                if is_main:
                    world = accelerator.num_processes
                    values = {name: total / world for name, total in zip(scalar_names, totals)}
                    values["lr"] = optimizer.param_groups[0]["lr"]
                    if result.grad_norm is not None:
                        values["grad_norm"] = float(result.grad_norm)
                    values.update(step_scalars(
                        totals[-3] / world, totals[-2] / world, steps=len(window) // train.grad_accum,
                        samples=len(window) * batch_size * world, train_flops_per_sample=task.train_flops_per_sample,
                        device=accelerator.device, precision=accelerator.mixed_precision, world_size=world))
                    values["skipped_samples"] = totals[-1]  # this epoch so far, all ranks
                    logger.scalars(values, state.step, prefix="train/")
                    logger.line(f"epoch {state.epoch + 1}/{train.epochs} step {state.step}/{total_steps} "
                                f"{format_scalars(values)}")
                window = []

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
            raise RuntimeError(f"the training data yielded {state.batch_in_epoch} batches in epoch {state.epoch + 1}, "
                               f"expected {batches_per_epoch}")
        skipped = int(accelerator.reduce(torch.tensor(task.train_data.skipped(), device=accelerator.device),
                                         reduction="sum"))
        if is_main and skipped:
            logger.scalars({"skipped_samples": skipped}, state.step, prefix="train/")
            logger.line(f"epoch {state.epoch + 1}/{train.epochs}: skipped {skipped} corrupt or unreadable samples "
                        "(see the warnings)")
        state.epoch += 1
        state.batch_in_epoch = 0
        if task.evaluate is not None and (state.epoch % train.eval_every == 0 or state.step >= total_steps):
            with clock.paused():
                evaluate_and_export_best()
        checkpoint()

    requeue_failed = False
    if stopped_by is not None:
        if is_main:
            logger.line(f"stopped by signal {stopped_by} at step {state.step}; checkpoint saved, "
                        "continue with --resume latest")
            if stopped_by == signal.SIGUSR1:  # the time limit is near
                try:
                    if job := requeue_slurm_job():
                        logger.line(f"requeued Slurm job {job}")
                except RequeueError as err:
                    requeue_failed = True
                    logger.line(f"error: {err}; the job will not restart by itself: submit it again (it resumes "
                                "from the checkpoint)")
    else:
        with ema.applied(unwrapped) if ema else nullcontext():
            export(run_dir / "export", extra={"step": state.step, "epoch": state.epoch})
        if is_main:
            saved = f"exported to {run_dir / 'export'}" if train.save else "nothing saved (train.save=false)"
            logger.line(f"done: {state.step} steps; {saved}")
    if is_main:
        logger.close()
    accelerator.wait_for_everyone()
    return FitResult(state=state, stopped_by_signal=stopped_by, run_dir=run_dir, last_metrics=last_metrics,
                     requeue_failed=requeue_failed)

