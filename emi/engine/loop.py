"""The one training loop, shared by Stage I and Stage II.

A stage hands `fit` a `Task`: its model, its training data, how to compute the loss on a batch, how to evaluate,
and how to export weights. The loop owns everything else, each part in its own home: the optimizer and the SGDR
schedule (optim.py), one step with gradient accumulation and clipping (step.py), EMA (ema.py), checkpoints and exact
resume (checkpointer.py), evaluation and the best export (evaluator.py), exports and publishing (exporter.py), stop
signals (signals.py), step telemetry (telemetry.py), TensorBoard and the console line (logging.py).

Collectives in here (gradient sync, the stop-flag all-reduce, the scalar reduction, checkpoint barriers, the ZeRO-3
state-dict gather) sit on code paths that every rank walks in the same order: ranks see the same number of
batches per epoch (the data plan guarantees it) and every branch depends only on values that are equal on all
ranks (step counters, agreed flags). Side effects that only rank 0 performs are guarded where they happen.
"""

from __future__ import annotations

import signal
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from emi.config import TrainSection, save_config
from emi.devices import move_to_device
from emi.engine.checkpointer import Checkpointer, remove_stale_temporaries, saved_processes
from emi.engine.distributed import describe, input_dtype
from emi.engine.ema import EMA
from emi.engine.evaluator import EvalFn, Evaluator
from emi.engine.exporter import Exporter, ExportFn
from emi.engine.logging import RunLogger, format_scalars
from emi.engine.optim import build_optimizer, sgdr_lr
from emi.engine.prepare import prepare_model
from emi.engine.resize import current_layout, resize_line, resized
from emi.engine.signals import RequeueError, StopRequest, requeue_slurm_job
from emi.engine.step import LossFn, train_step
from emi.engine.telemetry import ScalarWindow, SourceCounts, StepClock, step_scalars
from emi.errors import UsageError
from emi.formats.checkpoint import Stretch, TrainerState, create_run_id, read_run_id
from emi.formats.samples import BatchRecord, SampleRecorder, drop_records_after


@dataclass
class Task:
    """What a stage hands to the loop."""

    model: torch.nn.Module
    train_data: Any  # emi.data.DataInfo: .dataloader, .num_batches, .set_epoch, .stretch_batches, .skipped
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


@dataclass(frozen=True)
class Schedule:
    """Batches and optimizer steps: per epoch and in the whole run."""

    steps_per_epoch: int
    batches_per_epoch: int  # whole optimizer steps' worth; the leftovers of an epoch are unused
    total_steps: int

    @classmethod
    def of(
        cls, num_batches: int, train: TrainSection, state: TrainerState | None = None, epoch_batches: int | None = None
    ) -> Schedule:
        """The schedule of a run at `state` (None: its start) whose current epoch has `epoch_batches` micro-batches
        per process (None: a whole epoch's); the epochs after it have `num_batches`."""
        steps_per_epoch = num_batches // train.grad_accum
        if steps_per_epoch < 1:
            raise UsageError(
                f"{num_batches} batches per epoch cannot fill one optimizer step with "
                f"grad_accum={train.grad_accum}; lower data.batch_size or train.grad_accum"
            )
        state = state or TrainerState()
        batches_per_epoch = steps_per_epoch * train.grad_accum
        total = state.step
        if state.epoch < train.epochs:  # an earlier layout may have had other epochs: count from where the run is
            left_in_epoch = (batches_per_epoch if epoch_batches is None else epoch_batches) - state.batch_in_epoch
            total += left_in_epoch // train.grad_accum + (train.epochs - state.epoch - 1) * steps_per_epoch
        return cls(steps_per_epoch, batches_per_epoch, min(total, train.max_steps) if train.max_steps else total)


@dataclass
class Run:
    """What the loop works with once a run has started: the prepared model, its parts and where it stands."""

    task: Task
    accelerator: Accelerator
    config: Any  # the stage's config: .run, .data, .optim, .train
    schedule: Schedule
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    ema: EMA | None
    checkpointer: Checkpointer
    exporter: Exporter
    evaluator: Evaluator | None
    logger: RunLogger | None  # rank 0's; None on the other ranks
    state: TrainerState
    recorder: SampleRecorder | None = None  # train.record_samples

    @property
    def train(self) -> TrainSection:
        return self.config.train

    def epoch_batches(self) -> int:
        """Micro-batches each process trains on in the current epoch (its current stretch, after a resume under
        another layout), in whole optimizer steps."""
        if not self.state.stretches:
            return self.schedule.batches_per_epoch
        batches = self.task.train_data.stretch_batches(self.state.stretches)
        return batches // self.train.grad_accum * self.train.grad_accum

    def checkpoint(self) -> None:
        self.checkpointer.save(self.state, self.ema.state_dict() if self.ema else None)


def fit(task: Task, accelerator: Accelerator, config: Any, run_dir: Path) -> FitResult:
    run = start(task, accelerator, config, run_dir)
    stop, telemetry = StopRequest(), StepTelemetry(run)
    stopped_by, metrics = None, {}
    run.model.train()
    while run.state.step < run.schedule.total_steps and stopped_by is None:
        stopped_by = train_epoch(run, stop, telemetry)
        if stopped_by is None and run.state.batch_in_epoch < run.epoch_batches():
            run.checkpoint()  # train.max_steps ended the run mid-epoch
            break
        if stopped_by is None:
            with telemetry.clock.paused():  # evaluations and checkpoints are not steps
                telemetry.log_sources()
                metrics = end_epoch(run) or metrics
                run.checkpoint()
    return finish(run, stopped_by, metrics)


def start(task: Task, accelerator: Accelerator, config: Any, run_dir: Path) -> Run:
    """The run's folder and records (rank 0), the model and optimizer prepared, the parts, the state resumed."""
    train, logger = config.train, None
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
        remove_stale_temporaries(run_dir)
        create_run_id(run_dir)
        logger = RunLogger(run_dir)
        logger.line(f"run {run_dir}: {describe(accelerator)} strategy={train.strategy}")
    accelerator.wait_for_everyone()
    schedule = Schedule.of(task.train_data.num_batches, train)
    prepared = prepare_model(task.model, train)  # in place: parameter names stay as they are
    if accelerator.is_main_process and prepared:
        logger.line("; ".join(prepared))
    model, optimizer = accelerator.prepare(task.model, optimizer_of(task.model, config))
    ema = ema_of(accelerator, accelerator.unwrap_model(model), train)
    checkpointer = Checkpointer(accelerator, run_dir, train, read_run_id(run_dir))
    exporter = Exporter(accelerator, task.export, run_dir, config.run.publish_to, train.save, logger)
    evaluator = (
        Evaluator(
            task.evaluate,
            task.best_metric,
            accelerator,
            accelerator.unwrap_model(model),
            ema,
            exporter,
            logger,
            train.epochs,
        )
        if task.evaluate is not None
        else None
    )
    run = Run(
        task,
        accelerator,
        config,
        schedule,
        model,
        optimizer,
        ema,
        checkpointer,
        exporter,
        evaluator,
        logger,
        TrainerState(layout=current_layout(config, accelerator.num_processes)),
    )
    resume(run)
    run.schedule = Schedule.of(task.train_data.num_batches, train, run.state, run.epoch_batches())
    if train.record_samples:
        run.recorder = SampleRecorder(run_dir, accelerator.process_index)
    return run


def optimizer_of(model: torch.nn.Module, config: Any) -> torch.optim.Optimizer:
    return build_optimizer(model, config.optim)


def ema_of(accelerator: Accelerator, unwrapped: torch.nn.Module, train: TrainSection) -> EMA | None:
    if train.ema_decay <= 0:
        return None
    if accelerator.distributed_type == DistributedType.DEEPSPEED and train.strategy == "zero3":
        raise UsageError("train.ema_decay needs unpartitioned weights: use strategy ddp or zero2")
    return EMA(unwrapped, train.ema_decay)


def resume(run: Run) -> None:
    """Load the checkpoint `train.resume` names into the run (model, optimizer, RNG, EMA, its state), if any."""
    path, warnings = run.checkpointer.resume()
    is_main = run.accelerator.is_main_process
    for warning in warnings if is_main else ():
        run.logger.line(f"warning: {warning}")
    if path is None:
        if is_main and run.train.resume == "latest":
            run.logger.line("no checkpoint to resume from; starting fresh")
        return
    run.state, ema_state = run.checkpointer.load(path)
    if run.ema is not None and ema_state is not None:
        run.ema.load_state_dict(ema_state)
    if is_main:
        written_by = f"; written by {run.state.layout.describe()}" if run.state.layout else ""
        run.logger.line(
            f"resumed from {path}: epoch {run.state.epoch + 1} step {run.state.step} "
            f"(batch {run.state.batch_in_epoch} of the epoch){written_by}"
        )
        if run.train.record_samples:
            drop_records_after(run.checkpointer.run_dir, run.state.step)
    continue_under_current_layout(run, path)
    run.accelerator.wait_for_everyone()


def continue_under_current_layout(run: Run, path: Path) -> None:
    """A checkpoint written under another layout (processes, workers, batch size, accumulation): the part of the
    epoch trained under it becomes one of the epoch's stretches, and the rest of the epoch is dealt out anew."""
    state, now = run.state, current_layout(run.config, run.accelerator.num_processes)
    saved = state.layout
    if saved is None:  # written by an emi that did not record its layout
        if saved_processes(path) != now.world_size:
            raise UsageError(
                f"{path} records no layout (an older emi wrote it): resume it on the {saved_processes(path)} "
                "processes that wrote it"
            )
    elif saved != now:
        if resized(saved, now.world_size, run.train.resize) != (now.batch_size, now.grad_accum):
            raise UsageError(
                f"{path} was written by {saved.describe()}, not the layout this run was set up for from the "
                "newest checkpoint: a newer checkpoint was damaged; run again with --resume latest"
            )
        if state.batch_in_epoch or state.stretches:
            state.stretches.append(Stretch(saved, state.batch_in_epoch))
            state.batch_in_epoch = 0
        # accelerate finds the accumulation boundary from its count of micro-batches, which the checkpoint restored
        # in units of the old accumulation; a checkpoint is always taken at a boundary, so the count starts again.
        run.accelerator.step = 0
        if run.accelerator.is_main_process:
            run.logger.line(resize_line(saved, now, run.train.resize))
    state.layout = now


def train_epoch(run: Run, stop: StopRequest, telemetry: StepTelemetry) -> int | None:
    """The rest of the current epoch, step by step, until it ends, the run's last step, or a stop signal (returned,
    after its checkpoint)."""
    state, schedule, train, accelerator = run.state, run.schedule, run.train, run.accelerator
    epoch_batches = run.epoch_batches()
    run.task.train_data.set_epoch(state.epoch, skip_batches=state.batch_in_epoch, stretches=state.stretches)
    # A checkpoint taken on an epoch's last step resumes straight into the epoch's end.
    batches = run.task.train_data.dataloader if state.batch_in_epoch < epoch_batches else ()
    float_dtype = input_dtype(accelerator)
    for batch in telemetry.clock.batches(batches):
        for group in run.optimizer.param_groups:
            group["lr"] = sgdr_lr(state.step, run.config.optim, schedule.steps_per_epoch)
        result = train_step(
            run.model,
            run.optimizer,
            move_to_device(batch, accelerator.device, float_dtype),
            run.task.compute_loss,
            accelerator,
            train.clip_grad,
        )
        state.batch_in_epoch += 1
        telemetry.sources.add(batch)
        if run.recorder is not None:
            run.recorder.add(BatchRecord(state.epoch, state.step + 1, accelerator.num_processes, list(batch["key"])))
        telemetry.window.add(result.loss, result.scalars)
        if not result.synced:
            continue
        state.step += 1
        if run.ema is not None:
            run.ema.update(accelerator.unwrap_model(run.model))
        if state.step % train.log_every == 0 or state.step in (1, schedule.total_steps):
            telemetry.log(result.grad_norm)  # the first and last steps too: a short run still has a curve
        stopped_by = stop.agreed(accelerator)
        epoch_done = state.batch_in_epoch >= epoch_batches  # its checkpoint comes at the epoch's end
        if stopped_by is not None or (state.step % train.checkpoint_every == 0 and not epoch_done):
            with telemetry.clock.paused():
                run.checkpoint()
        if stopped_by is not None or state.step >= schedule.total_steps or epoch_done:
            return stopped_by
    if state.batch_in_epoch < epoch_batches and state.step < schedule.total_steps:
        raise RuntimeError(
            f"the training data yielded {state.batch_in_epoch} batches in epoch {state.epoch + 1}, "
            f"expected {epoch_batches}"
        )
    return None


def end_epoch(run: Run) -> dict[str, float] | None:
    """The epoch's skipped samples said, the next epoch begun, and the evaluation when one is due (its metrics)."""
    state, accelerator = run.state, run.accelerator
    skipped = int(
        accelerator.reduce(torch.tensor(run.task.train_data.skipped(), device=accelerator.device), reduction="sum")
    )
    if accelerator.is_main_process and skipped:
        run.logger.scalars({"skipped_samples": skipped}, state.step, prefix="train/")
        run.logger.line(
            f"epoch {state.epoch + 1}/{run.train.epochs}: skipped {skipped} corrupt or unreadable "
            "samples (see the warnings)"
        )
    state.epoch += 1
    state.batch_in_epoch = 0
    state.stretches = []
    due = state.epoch % run.train.eval_every == 0 or state.step >= run.schedule.total_steps
    return run.evaluator.evaluate(run.model, state) if run.evaluator is not None and due else None


def finish(run: Run, stopped_by: int | None, metrics: dict[str, float]) -> FitResult:
    """A stopped run says so (and asks Slurm to requeue it at its time limit); a finished one exports."""
    requeue_failed = False
    if stopped_by is not None:
        requeue_failed = stopped(run, stopped_by)
    else:
        with run.ema.applied(run.accelerator.unwrap_model(run.model)) if run.ema else nullcontext():
            run.exporter.export(run.model, "export", {"step": run.state.step, "epoch": run.state.epoch})
        if run.accelerator.is_main_process:
            saved = (
                f"exported to {run.checkpointer.run_dir / 'export'}"
                if run.train.save
                else "nothing saved (train.save=false)"
            )
            run.logger.line(f"done: {run.state.step} steps; {saved}")
    if run.accelerator.is_main_process:
        run.logger.close()
    if run.recorder is not None:
        run.recorder.close()
    run.accelerator.wait_for_everyone()
    return FitResult(
        state=run.state,
        stopped_by_signal=stopped_by,
        run_dir=run.checkpointer.run_dir,
        last_metrics=metrics,
        requeue_failed=requeue_failed,
    )


def stopped(run: Run, stopped_by: int) -> bool:
    """Rank 0 says where the run stopped, and at the time limit (SIGUSR1) requeues the Slurm job; returns whether
    that requeue failed."""
    if not run.accelerator.is_main_process:
        return False
    run.logger.line(
        f"stopped by signal {stopped_by} at step {run.state.step}; checkpoint saved, continue with --resume latest"
    )
    if stopped_by != signal.SIGUSR1:
        return False
    try:
        if job := requeue_slurm_job():
            run.logger.line(f"requeued Slurm job {job}")
    except RequeueError as err:
        run.logger.line(
            f"error: {err}; the job will not restart by itself: submit it again (it resumes from the checkpoint)"
        )
        return True
    return False


class StepTelemetry:
    """The step lines and TensorBoard scalars: the loss terms over the window since the last line, by name, and
    where the time went."""

    def __init__(self, run: Run) -> None:
        self.run, self.window, self.clock = run, ScalarWindow(), StepClock(run.accelerator.device)
        self.sources = SourceCounts()

    def log_sources(self) -> None:
        """At an epoch's end, the samples each source gave it (a data mix's batches name them; every rank calls
        this); after a resume mid-epoch, those since the resume."""
        counts, run = self.sources.gather(), self.run
        if counts and run.accelerator.is_main_process:
            run.logger.scalars(counts, run.state.step, prefix="train/samples/")
            listed = ", ".join(f"{name} {count}" for name, count in sorted(counts.items()))
            run.logger.line(f"epoch {run.state.epoch + 1}/{run.train.epochs}: samples per source: {listed}")

    def log(self, grad_norm: torch.Tensor | None) -> None:
        """Every rank calls this at the same step (one all-reduce); rank 0 writes."""
        run, accelerator = self.run, self.run.accelerator
        micro_batches = self.window.micro_batches
        elapsed, data_wait = self.clock.close_window()
        means, totals = self.window.reduce(
            accelerator, {"elapsed_s": elapsed, "data_wait_s": data_wait, "skipped": run.task.train_data.skipped()}
        )
        if not accelerator.is_main_process:
            return
        world = accelerator.num_processes
        values = {**means, "lr": run.optimizer.param_groups[0]["lr"]}
        if grad_norm is not None:
            values["grad_norm"] = float(grad_norm)
        values.update(
            step_scalars(
                totals["elapsed_s"] / world,
                totals["data_wait_s"] / world,
                steps=micro_batches // run.train.grad_accum,
                samples=micro_batches * run.config.data.batch_size * world,
                train_flops_per_sample=run.task.train_flops_per_sample,
                device=accelerator.device,
                precision=accelerator.mixed_precision,
                world_size=world,
            )
        )
        values["skipped_samples"] = totals["skipped"]  # this epoch so far, all ranks
        state = run.state
        run.logger.scalars(values, state.step, prefix="train/")
        run.logger.line(
            f"epoch {state.epoch + 1}/{run.train.epochs} step {state.step}/{run.schedule.total_steps} "
            f"{format_scalars(values)}"
        )
