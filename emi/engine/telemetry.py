"""Step telemetry: where a training step's time goes (waiting for data or computing), how much of the device's
peak it reaches (MFU), and the device memory it needs.

The loop reads batches through `StepClock.batches`, which adds up the time spent blocked on the loader; the rest
of a logging window is compute (forward, backward, optimizer, everything else the loop does per step). Checkpoints
and evaluations run with the clock paused: they are not steps. On a GPU the window is closed after a device
synchronisation, so queued kernels are counted in the window that launched them.

MFU = achieved model FLOP/s / peak FLOP/s of the device, with the model FLOPs of emi.models.flops (3 x forward per
sample; recomputation under activation checkpointing is not counted) and the peak below: dense (no sparsity)
tensor-core FLOP/s in the training precision. Devices not listed, and the CPU, get no MFU (None), only FLOP/s.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from accelerate.utils import gather_object

# Dense bf16/fp16 tensor-core peak FLOP/s by device name (NVIDIA data sheets; SXM unless named). First match wins.
PEAK_FLOPS_16BIT = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops(device_name: str, precision: str) -> float | None:
    """The device's dense peak FLOP/s in `precision` (bf16 or fp16), or None when unknown."""
    if precision not in ("bf16", "fp16"):
        return None
    return next((peak for name, peak in PEAK_FLOPS_16BIT.items() if name in device_name), None)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


class StepClock:
    """Seconds blocked on the loader and seconds in total since the window began."""

    def __init__(self, device: torch.device, now: Callable[[], float] = time.perf_counter) -> None:
        self.device = device
        self.now = now
        self.data_wait = 0.0
        self.start = now()

    def batches(self, loader: Iterable[Any]) -> Iterator[Any]:
        """The loader's batches, timing each wait for the next one."""
        iterator = iter(loader)
        while True:
            begin = self.now()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            finally:
                self.data_wait += self.now() - begin
            yield batch

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Leave the time inside out of the window."""
        begin = self.now()
        try:
            yield
        finally:
            self.start += self.now() - begin

    def close_window(self) -> tuple[float, float]:
        """(seconds since the window began, of them blocked on the loader); starts the next window."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = self.now()
        window = now - self.start, self.data_wait
        self.start, self.data_wait = now, 0.0
        return window


def step_scalars(
    elapsed: float,
    data_wait: float,
    steps: int,
    samples: int,
    train_flops_per_sample: float | None,
    device: torch.device,
    precision: str,
    world_size: int,
) -> dict[str, float]:
    """The telemetry of a window of `steps` optimizer steps over `samples` samples on all ranks, `elapsed` and
    `data_wait` seconds averaged over ranks."""
    per_device = samples / world_size / elapsed
    values = {
        "samples_per_s": samples / elapsed,
        "step_s": elapsed / steps,
        "data_wait_s": data_wait / steps,
        "compute_s": (elapsed - data_wait) / steps,
        "data_wait_share": data_wait / elapsed,
    }
    if train_flops_per_sample is not None:
        achieved = train_flops_per_sample * per_device
        values["tflops_per_device"] = achieved / 1e12
        peak = peak_flops(device_name(device), precision)
        if peak is not None:
            values["mfu"] = achieved / peak
    if device.type == "cuda":
        values["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return values


class ScalarWindow:
    """The loss and the loss function's terms of every micro batch since the last log line, by name."""

    def __init__(self) -> None:
        self.values: dict[str, list[torch.Tensor]] = {}
        self.micro_batches = 0

    def add(self, loss: torch.Tensor, scalars: dict[str, torch.Tensor]) -> None:
        for name, value in {"loss": loss, **scalars}.items():
            self.values.setdefault(name, []).append(value.detach().float().reshape(()))
        self.micro_batches += 1

    def reduce(self, accelerator: Any, per_rank: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
        """(each scalar's mean over the window, averaged over the ranks; each of `per_rank`'s numbers summed over
        the ranks), in one all-reduce that every rank makes; the window starts again empty."""
        names = list(self.values)
        local = torch.stack(
            [torch.stack(self.values[name]).mean().to(accelerator.device) for name in names]
            + [torch.tensor(float(value), device=accelerator.device) for value in per_rank.values()]
        )
        totals = dict(zip(names + list(per_rank), accelerator.reduce(local, reduction="sum").tolist()))
        self.values, self.micro_batches = {}, 0
        world = accelerator.num_processes
        return {name: totals[name] / world for name in names}, {name: totals[name] for name in per_rank}


class SourceCounts:
    """Samples per source in the current epoch, from each batch's "source" list (the batches of a data mix name each
    sample's source; others carry none)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def add(self, batch: Any) -> None:
        if isinstance(batch, dict) and "source" in batch:
            self.counts.update(batch["source"])

    def gather(self) -> dict[str, int]:
        """Every rank's counts summed (one collective that every rank makes); the count starts again."""
        total: Counter[str] = Counter()
        for counts in gather_object([dict(self.counts)]):
            total.update(counts)
        self.counts = Counter()
        return dict(total)
