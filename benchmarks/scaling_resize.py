"""What resuming Stage I on another number of processes costs at 8, 64 and 512 ranks. Writes section 5 of
benchmarks/SCALING.md.

Two costs, measured where they can be and modelled where they cannot:
- Re-planning the epoch (emi.data.plan): every process computes `stretch_steps` once per resumed epoch, and each
  dataloader worker picks its tickets and splits them into passes over the old layout's slices (the loader's
  `_slice_passes`); the slices it opens bound its read-ahead memory (one shuffle buffer each). Plain CPU work,
  measured directly at 8, 64 and 512 ranks.
- Converting the checkpoint (emi.engine.reshard): a resume on the same number of processes loads each rank's own
  ZeRO partition; on another number, rank 0 runs DeepSpeed's ds_to_universal over every partition, then every rank
  loads from the universal form. Measured on 2 and 3 CPU processes (gloo) with an MLP of tens of millions of
  parameters, then modelled for configs/stage1/vitl.yaml's model on a shared file system.

    python -m benchmarks.scaling_resize [--quick] [--out benchmarks/SCALING.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.harness import cpu_model, load_average, table  # noqa: E402
from benchmarks.results import write_section  # noqa: E402
from benchmarks.scaling import GPUS_PER_NODE, SCALING, SIZES  # noqa: E402

HEADING = "5. Resuming on another number of processes"
VITL = REPO / "configs" / "stage1" / "vitl.yaml"
# The epochs re-planned: Hume-Vidmimic2's clips and Aff-Wild2's frames.
DATA_SETS = {"15,000 clips (Hume-Vidmimic2)": 15_000, "1,000,000 frames (Aff-Wild2)": 1_000_000}
WORKERS, BATCH = 8, 32  # per rank; Stage I drops the last partial batch in training (emi.stages.stage1)
CONSUMED = 0.5  # the fraction of the first layout's batches consumed before the resize
REPEATS = 5
# The checkpoint measured: an MLP of LAYERS square layers of HIDDEN features, saved by SAVED_PROCESSES processes
# after one step, resumed by as many and by RESUMED_PROCESSES.
HIDDEN, LAYERS = 2048, 6
SAVED_PROCESSES, RESUMED_PROCESSES = 2, 3
# The shared file system the vitl model's checkpoint lives on (stated assumptions; a Lustre/GPFS-class cluster file
# system): what one process reads or writes of large files, and what all clients together read.
FS_READER_GBPS = 2.0
FS_WRITER_GBPS = 1.0
FS_TOTAL_GBPS = 50.0


# ------------------------------------------------------------------------------------------------ re-planning


def time_median(work: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def traced_peak(work: Callable[[], Any]) -> int:
    """Peak bytes Python and numpy allocate while `work` runs (tracemalloc), beyond what was allocated before."""
    tracemalloc.start()
    try:
        work()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def epoch_shape(samples: int, shuffle_buffer: int) -> Any:
    """The epoch as the loader shapes it (ShardDataset._shape): its length, seed, epoch and Stage I's settings."""
    from emi.data.plan import EpochShape

    return EpochShape((samples,), 0, 0, shuffle_buffer, True)


def resized_epoch(shape: Any, ranks: int, new_ranks: int) -> tuple[list[Any], Callable[[], tuple[Any, Any]]]:
    """(the epoch's stretches: the first layout with CONSUMED of its batches done, what every process of the new
    layout computes once per epoch)."""
    from emi.data.plan import samples_per_consumer, stretch_steps
    from emi.formats.checkpoint import Layout, Stretch

    per_consumer = samples_per_consumer(shape.total, ranks * WORKERS, BATCH, shape.drop_last)
    batches = WORKERS * per_consumer // BATCH
    stretches = [Stretch(Layout(ranks, WORKERS, BATCH, 1), int(batches * CONSUMED))]
    return stretches, lambda: stretch_steps(shape, stretches, new_ranks, BATCH)


def worker_share(shape: Any, stretches: list[Any], steps: np.ndarray, rank: int, worker: int) -> dict[str, Any]:
    """What dataloader worker `worker` of `rank` computes from the epoch's steps, as ShardDataset._stretch_samples
    does (at the start of the stretch): its tickets, their passes over the old slices; the slices and streams it
    reads from, and how many streams are open at once (each holds a shuffle buffer of read-ahead samples)."""
    from emi.data.loader import _slice_passes
    from emi.data.plan import consumers_of, samples_per_consumer, worker_batches

    first = stretches[0].layout
    mine = list(worker_batches(len(steps), worker, WORKERS, 0))
    tickets = steps[mine, rank].reshape(-1)
    per_consumer = samples_per_consumer(
        shape.total, consumers_of(first.world_size, first.num_workers), first.batch_size, shape.drop_last
    )
    passes = _slice_passes(tickets, per_consumer, shape)
    return {"tickets": len(tickets), **stream_counts(passes)}


def stream_counts(passes: list[tuple[tuple[int, int], int]]) -> dict[str, int]:
    """Slices and streams a worker's passes read from, and the most streams open at once: the loader opens a stream
    at its first ticket and closes it after its last."""
    first: dict[tuple[int, int], int] = {}
    last: dict[tuple[int, int], int] = {}
    for index, (stream, _) in enumerate(passes):
        first.setdefault(stream, index)
        last[stream] = index
    change = np.zeros(len(passes) + 1, dtype=np.int64)
    np.add.at(change, list(first.values()), 1)
    np.add.at(change, [index + 1 for index in last.values()], -1)
    return {
        "slices": len({consumer for consumer, _ in first}),
        "streams": len(first),
        "open_at_once": int(np.cumsum(change).max()) if passes else 0,
    }


def slices_per_worker(steps: np.ndarray, per_consumer: int) -> list[int]:
    """For every (rank, worker) of the new layout: how many of the old layout's slices its tickets come from."""
    counts = []
    for worker in range(WORKERS):
        consumers = steps[worker::WORKERS] // per_consumer  # (batches, ranks, batch)
        for rank in range(steps.shape[1]):
            counts.append(len(np.unique(consumers[:, rank])))
    return counts


def replan(samples: int, ranks: int, new_ranks: int, shuffle_buffer: int, repeats: int) -> dict[str, Any]:
    """The measured cost of re-planning an epoch of `samples` resized from `ranks` to `new_ranks` mid-epoch."""
    from emi.data.plan import samples_per_consumer

    shape = epoch_shape(samples, shuffle_buffer)
    try:
        stretches, plan = resized_epoch(shape, ranks, new_ranks)
    except ValueError as err:  # drop_last leaves a consumer no whole batch
        return {"samples": samples, "ranks": ranks, "new_ranks": new_ranks, "impossible": str(err)}
    steps, _ = plan()
    share = worker_share(shape, stretches, steps, 0, 0)
    per_consumer = samples_per_consumer(samples, ranks * WORKERS, BATCH, True)
    slices = slices_per_worker(steps, per_consumer)
    return {
        "samples": samples,
        "ranks": ranks,
        "new_ranks": new_ranks,
        "batches_per_rank": len(steps),
        "plan_s": time_median(plan, repeats),
        "plan_peak_bytes": traced_peak(plan),
        "worker_s": time_median(lambda: worker_share(shape, stretches, steps, 0, 0), repeats),
        "worker_peak_bytes": traced_peak(lambda: worker_share(shape, stretches, steps, 0, 0)),
        "worker_tickets": share["tickets"],
        "worker_slices": share["slices"],
        "worker_streams": share["streams"],
        "worker_open_at_once": share["open_at_once"],
        "slices_max": max(slices),
        "slices_median": statistics.median(slices),
        "read_ahead_samples": share["open_at_once"] * shuffle_buffer,
    }


def replanning(data_sets: dict[str, int], sizes: tuple[int, ...], repeats: int) -> dict[str, Any]:
    shuffle_buffer = yaml.safe_load(VITL.read_text())["data"]["shuffle_buffer"]
    load_before = load_average()
    rows = [
        {"data": name, **replan(samples, ranks, new_ranks, shuffle_buffer, repeats)}
        for name, samples in data_sets.items()
        for ranks in sizes
        for new_ranks in (ranks // 2, ranks * 2)
    ]
    return {
        "rows": rows,
        "shuffle_buffer": shuffle_buffer,
        "repeats": repeats,
        "load_before": load_before,
        "load_after": load_average(),
    }


# ------------------------------------------------------------------------------------------------ checkpoints


class RssPeak:
    """The highest resident set size of this process over a `with` block, sampled every few milliseconds."""

    def __enter__(self) -> RssPeak:
        import psutil

        self.process, self.peak, self.running = psutil.Process(), 0, True
        self.before = self.process.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)  # a sampling interval, not synchronisation

    def __exit__(self, *exc: object) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def io_bytes() -> dict[str, int]:
    """Bytes this process read and wrote through system calls so far (page cache hits included)."""
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return {"read": int(fields["rchar"]), "written": int(fields["wchar"])}


def measured(work: Callable[[], Any], accelerator: Any) -> dict[str, Any]:
    """Wall seconds (all ranks, between barriers), rank 0's bytes read and written and its RSS over `work`."""
    accelerator.wait_for_everyone()
    io = io_bytes()
    with RssPeak() as rss:
        start = time.perf_counter()
        work()
        accelerator.wait_for_everyone()
        wall = time.perf_counter() - start
    after = io_bytes()
    return {
        "wall_s": wall,
        "read_bytes": after["read"] - io["read"],
        "written_bytes": after["written"] - io["written"],
        "rss_before": rss.before,
        "rss_peak": rss.peak,
    }


def folder_bytes(folder: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in folder.rglob(pattern) if p.is_file() and not p.is_symlink())


def timed_conversion() -> dict[str, Any]:
    """Wraps emi.engine.reshard's conversion (rank 0) so that it records its own cost and what it wrote."""
    from emi.engine import reshard

    convert, record = reshard._convert, {}

    def recorded(path: Path, universal: Path) -> str | None:
        io = io_bytes()
        with RssPeak() as rss:
            start = time.perf_counter()
            problem = convert(path, universal)
            record["wall_s"] = time.perf_counter() - start
        after = io_bytes()
        record.update(
            read_bytes=after["read"] - io["read"],
            written_bytes=after["written"] - io["written"],
            universal_bytes=folder_bytes(universal),
            rss_peak=rss.peak,
        )
        return problem

    reshard._convert = recorded
    return record


def checkpoint_worker(strategy: str, run_dir: Path, result: Path, hidden: int, layers: int) -> None:
    """One rank: with no checkpoint in `run_dir`, one step, save and a same-size load; with one, a load on this
    (other) number of processes. Rank 0 writes what it measured to `result`."""
    import torch

    from emi.config import OptimSection, TrainSection
    from emi.engine.checkpointer import checkpoints, load_checkpoint, save_checkpoint
    from emi.engine.distributed import build_accelerator
    from emi.engine.optim import build_optimizer
    from emi.formats.checkpoint import TrainerState, create_run_id, read_run_id

    train = TrainSection(strategy=strategy, clip_grad=0.0, mixed_precision="no")
    accelerator = build_accelerator(train, micro_batch_size=2)
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(hidden, hidden) for _ in range(layers)])
    parameters = sum(p.numel() for p in model.parameters())
    model, optimizer = accelerator.prepare(model, build_optimizer(model, OptimSection(lr=1e-3)))
    report: dict[str, Any] = {"strategy": strategy, "processes": accelerator.num_processes, "parameters": parameters}
    if not checkpoints(run_dir):
        if accelerator.is_main_process:
            run_dir.mkdir(parents=True, exist_ok=True)
            create_run_id(run_dir)
        accelerator.backward(model(torch.randn(2, hidden)).square().mean())
        optimizer.step()
        optimizer.zero_grad()
        state, run_id = TrainerState(step=1), read_run_id(run_dir)
        report["save"] = measured(lambda: save_checkpoint(accelerator, run_dir, state, 1, run_id), accelerator)
        path = checkpoints(run_dir)[-1]
        report["optimizer_bytes"] = folder_bytes(path, "*optim_states.pt")
        report["checkpoint_bytes"] = folder_bytes(path)
        report["load"] = measured(lambda: load_checkpoint(accelerator, path), accelerator)
    else:
        conversion = timed_conversion()
        report["load"] = measured(lambda: load_checkpoint(accelerator, checkpoints(run_dir)[-1]), accelerator)
        report["conversion"] = conversion
    if accelerator.is_main_process:
        result.write_text(json.dumps(report, indent=2))
    accelerator.wait_for_everyone()
    accelerator.end_training()


def launched(strategy: str, processes: int, run_dir: Path, hidden: int, layers: int) -> dict[str, Any]:
    """checkpoint_worker on `processes` CPU processes (gloo, DeepSpeed on the CPU accelerator)."""
    result = run_dir.parent / f"{strategy}-{processes}.json"
    env = dict(os.environ, PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "configs" / "accelerate" / "cpu.yaml"),
        "--num_processes",
        str(processes),
        "--main_process_port",
        str(free_port()),
        "-m",
        "benchmarks.scaling_resize",
        "--worker",
        strategy,
        str(run_dir),
        str(result),
        str(hidden),
        str(layers),
    ]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{strategy} on {processes} processes failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(result.read_text())


def free_port() -> int:
    """A port nobody listens on now, so that a run beside another job does not meet it on torch's default."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def conversions(strategies: tuple[str, ...], hidden: int, layers: int, resumed: int) -> dict[str, Any]:
    """Per strategy: saved on SAVED_PROCESSES processes and loaded by as many, then loaded by `resumed`."""
    results = {}
    with tempfile.TemporaryDirectory(prefix="emi-resize-") as tmp:
        for strategy in strategies:
            run_dir = Path(tmp) / strategy / "run"
            results[strategy] = {
                "same": launched(strategy, SAVED_PROCESSES, run_dir, hidden, layers),
                "other": launched(strategy, resumed, run_dir, hidden, layers),
            }
    return results


# ------------------------------------------------------------------------------------------------ the model


@dataclass(frozen=True)
class Rates:
    """What one strategy's measurement gives per parameter (bytes) and per second (bytes/s) on one process."""

    saved: float  # the checkpoint, all partitions
    partitioned_read: float  # what a rank reads of its own partition in a same-size load, times the ranks
    replicated_read: float  # what every rank reads in a same-size load whatever the ranks (the rest)
    conversion_read: float  # what ds_to_universal reads (it opens each partition file more than once)
    conversion_written: float  # what it writes: its temporary fragments, then the universal form
    other_read: float  # what one rank reads loading the universal form: every full tensor, whatever the ranks
    conversion: float  # bytes of checkpoint converted per second
    load_same: float  # bytes read per second by a rank loading its own partition
    load_other: float  # bytes read per second by a rank loading the universal form

    @classmethod
    def of(cls, result: dict[str, Any]) -> Rates:
        same, other, converted = result["same"], result["other"], result["other"]["conversion"]
        parameters, ranks = same["parameters"], same["processes"]
        own = same["optimizer_bytes"] / ranks
        other_read = other["load"]["read_bytes"] - converted["read_bytes"]
        return cls(
            saved=same["checkpoint_bytes"] / parameters,
            partitioned_read=same["optimizer_bytes"] / parameters,
            replicated_read=max(0, same["load"]["read_bytes"] - own) / parameters,
            conversion_read=converted["read_bytes"] / parameters,
            conversion_written=converted["written_bytes"] / parameters,
            other_read=other_read / parameters,
            conversion=same["checkpoint_bytes"] / converted["wall_s"],
            load_same=same["load"]["read_bytes"] / same["load"]["wall_s"],
            load_other=other_read / (other["load"]["wall_s"] - converted["wall_s"]),
        )


def read_s(own: float, shared: float, ranks: int, rate: float, fs: dict[str, float]) -> float:
    """Seconds for each of `ranks` processes to read and load its `own` bytes and the `shared` bytes every rank reads
    whole, all at once: the CPU time at the measured `rate`, then the I/O at one client's bandwidth or the file
    system's total, whichever is slower; the shared bytes cross the file system once per node (its page cache
    serves the node's other ranks)."""
    nodes = math.ceil(ranks / GPUS_PER_NODE)
    io = max((own + shared) / (fs["reader"] * 1e9), (ranks * own + nodes * shared) / (fs["total"] * 1e9))
    return (own + shared) / rate + io


def resume_times(rates: Rates, parameters: int, ranks: int, fs: dict[str, float]) -> dict[str, float]:
    """Seconds to resume a checkpoint of `parameters` on `ranks` processes from the shared file system: on the same
    number (each rank reads its partition, and what every rank reads whole), and on another (rank 0 reads every
    partition, converts and writes the universal form, serially; then every rank reads every full tensor of it).
    The conversion reads the checkpoint once from the file system (its second reads, and those of its temporary
    fragments, come from rank 0's page cache) and writes everything it writes."""
    own = rates.partitioned_read / ranks * parameters
    shared = rates.replicated_read * parameters
    other_read = rates.other_read * parameters
    saved = rates.saved * parameters
    convert = (
        saved / rates.conversion
        + saved / (fs["reader"] * 1e9)
        + rates.conversion_written * parameters / (fs["writer"] * 1e9)
    )
    same = read_s(own, shared, ranks, rates.load_same, fs)
    other_load = read_s(0.0, other_read, ranks, rates.load_other, fs)
    return {
        "state_bytes": saved,
        "same_read": own + shared,
        "other_read": other_read,
        "same_s": same,
        "convert_s": convert,
        "other_load_s": other_load,
        "other_s": convert + other_load,
    }


def vitl_parameters() -> int:
    from benchmarks.scaling import vitl_model

    return vitl_model()["parameters"]


# ------------------------------------------------------------------------------------------------ the document


def gb(value: float) -> str:
    return f"{value / 1e9:.2f}"


def mib(value: float) -> str:
    return f"{value / 2**20:.1f}"


def replanning_part(plan: dict[str, Any]) -> list[str]:
    rows = []
    for row in plan["rows"]:
        head = [row["data"], f"{row['ranks']} -> {row['new_ranks']}"]
        if "impossible" in row:
            rows.append(head + ["not possible: " + row["impossible"]] + [""] * 8)
            continue
        rows.append(
            head
            + [
                row["batches_per_rank"],
                f"{row['plan_s']:.3f}",
                mib(row["plan_peak_bytes"]),
                f"{row['worker_s'] * 1e3:.1f}",
                mib(row["worker_peak_bytes"]),
                f"{row['worker_tickets']:,}",
                f"{row['worker_slices']} / {row['worker_streams']} / {row['worker_open_at_once']}",
                f"{row['slices_median']:g} / {row['slices_max']}",
                f"{row['read_ahead_samples']:,}",
            ]
        )
    header = [
        "epoch",
        "ranks",
        "batches per rank after",
        "stretch_steps s (every process)",
        "its peak MiB",
        "one worker's share ms",
        "its peak MiB",
        "worker's tickets",
        "worker's slices / streams / open at once",
        "slices per worker, median / max (all workers)",
        "read-ahead samples (worst case)",
    ]
    return [
        "### Re-planning the epoch (measured)",
        "",
        f"{WORKERS} dataloader workers per rank, batch {BATCH}, drop_last (Stage I's training loader), shuffle buffer "
        f"{plan['shuffle_buffer']} (configs/stage1/vitl.yaml); the resize comes "
        f"after {CONSUMED:.0%} of the first layout's batches. `stretch_steps` is what every process (and every "
        "dataloader worker) computes once per resumed epoch; one worker's share is what worker 0 of rank 0 computes "
        "from it (its tickets and the loader's `_slice_passes`). Median of "
        f"{plan['repeats']} runs each; peak memory by tracemalloc in a separate run (numpy's and Python's "
        f"allocations). Load average {plan['load_before']:.2f} before, {plan['load_after']:.2f} after; "
        f"{cpu_model()}.",
        "",
        table(header, rows),
        "",
        *replanning_reading(plan),
    ]


def replanning_reading(plan: dict[str, Any]) -> list[str]:
    """The slowest re-planning, what a rank spends on it in all (its process and each of its workers plan the
    whole epoch), and the most slices a worker reads from."""
    done = [row for row in plan["rows"] if "impossible" not in row]
    slowest = max(done, key=lambda row: row["plan_s"])
    largest = [row["plan_s"] for row in done if row["samples"] == slowest["samples"]]
    impossible = list(dict.fromkeys(f"{row['data']} on {row['ranks']}" for row in plan["rows"] if "impossible" in row))
    lines = [
        f"Reading: the slowest re-planning, {slowest['data']} from {slowest['ranks']} to {slowest['new_ranks']} "
        f"ranks, takes {slowest['plan_s']:.2f} s and {mib(slowest['plan_peak_bytes'])} MiB in each of a rank's "
        f"{1 + WORKERS} processes (the rank and its {WORKERS} workers each plan the whole epoch): "
        f"{(1 + WORKERS) * slowest['plan_s']:.1f} CPU seconds per rank, once per resumed epoch; for that epoch "
        f"{min(largest):.2f} to {max(largest):.2f} s whatever the ranks, as it is linear in the epoch's samples "
        "(the shuffle buffers' emission orders of every old slice). "
        f"A worker's own share is at most {max(row['worker_s'] for row in done) * 1e3:.0f} ms, and a worker reads "
        f"from at most {max(row['slices_max'] for row in done)} old slices, so its read-ahead stays within "
        f"{max(row['worker_open_at_once'] for row in done)} shuffle buffers.",
        "",
    ]
    if impossible:
        lines += [
            f"Not possible with drop_last: {', '.join(impossible)} ranks ({WORKERS} workers each leave a "
            f"consumer less than one batch of {BATCH}), before any resize.",
            "",
        ]
    return lines


def conversion_part(conv: dict[str, Any], resumed: int) -> list[str]:
    rows = []
    for strategy, result in conv.items():
        same, other = result["same"], result["other"]
        state = same["checkpoint_bytes"]
        converted = other["conversion"]
        rows.append(
            [
                strategy,
                f"{same['parameters'] / 1e6:.1f} M",
                f"{gb(state)} ({gb(same['optimizer_bytes'])})",
                f"{same['save']['wall_s']:.2f}",
                f"{same['load']['wall_s']:.2f}",
                gb(same["load"]["read_bytes"]),
                mib(same["load"]["rss_peak"]),
                f"{converted['wall_s']:.2f}",
                f"{gb(converted['read_bytes'])} / {gb(converted['written_bytes'])}",
                gb(converted["universal_bytes"]),
                f"{other['load']['wall_s']:.2f}",
                gb(other["load"]["read_bytes"] - converted["read_bytes"]),
                mib(max(converted["rss_peak"], other["load"]["rss_peak"])),
                f"{state / converted['wall_s'] / 1e9:.3f}",
            ]
        )
    header = [
        "strategy",
        "parameters",
        "checkpoint GB (of it optimizer)",
        "save s",
        f"same-size load s ({SAVED_PROCESSES})",
        "rank 0 read GB",
        "rank 0 peak RSS MiB",
        "conversion s (rank 0)",
        "conversion read / written GB",
        "universal GB",
        f"other-size load s ({resumed}, conversion included)",
        "rank 0 read GB after conversion",
        "rank 0 peak RSS MiB",
        "GB/s converted",
    ]
    first = next(iter(conv.values()))["same"]
    return [
        "### Converting the checkpoint (measured on CPU processes)",
        "",
        f"An MLP of {first['parameters'] / 1e6:.1f} M parameters (fp32, AdamW), one step, saved by "
        f"{SAVED_PROCESSES} processes through emi's save_checkpoint, loaded with load_checkpoint by "
        f"{SAVED_PROCESSES} (each rank its partition) and by {resumed} (rank 0 converts with ds_to_universal, "
        "every rank loads the universal form): gloo, DS_ACCELERATOR=cpu, OMP_NUM_THREADS=1, a local disk, every "
        "file in the page cache (just written), so these are CPU rates, not disk rates. Seconds are wall time "
        "between barriers; bytes read and written are rank 0's system calls (/proc/self/io); RSS is rank 0's, "
        "sampled every 5 ms during the load.",
        "",
        table(header, rows),
        "",
    ]


def load_overtakes_conversion(rates: Rates, parameters: int, fs: dict[str, float], limit: int = 1 << 16) -> int | None:
    """The fewest ranks at which loading the universal form takes longer than converting to it (None up to
    `limit`): the conversion is fixed, the load grows with N once the file system's total bandwidth binds."""
    return next(
        (
            ranks
            for ranks in range(1, limit + 1)
            if (t := resume_times(rates, parameters, ranks, fs))["other_load_s"] > t["convert_s"]
        ),
        None,
    )


def model_part(conv: dict[str, Any], parameters: int, fs: dict[str, float]) -> list[str]:
    rows, reading, shares = [], [], []
    for strategy, result in conv.items():
        rates = Rates.of(result)
        times = {ranks: resume_times(rates, parameters, ranks, fs) for ranks in SIZES}
        for ranks, t in times.items():
            rows.append(
                [
                    strategy,
                    ranks,
                    gb(t["state_bytes"]),
                    gb(t["same_read"]),
                    f"{t['same_s']:.1f}",
                    f"{t['convert_s']:.1f}",
                    gb(t["other_read"]),
                    f"{t['other_load_s']:.1f}",
                    f"{t['other_s']:.1f}",
                    f"{t['other_s'] / t['same_s']:.1f}",
                    f"{t['convert_s'] / t['other_s']:.0%}",
                ]
            )
        shares += [t["convert_s"] / t["other_s"] for t in times.values()]
        small, large = times[SIZES[0]], times[SIZES[-1]]
        overtakes = load_overtakes_conversion(rates, parameters, fs)
        reading.append(
            f"{strategy}: a same-size resume takes {small['same_s']:.0f} s at {SIZES[0]} ranks and "
            f"{large['same_s']:.0f} s at {SIZES[-1]}; on another size rank 0 first converts "
            f"{gb(small['state_bytes'])} GB in {small['convert_s']:.0f} s whatever N (measured "
            f"{rates.conversion / 1e9:.3f} GB/s of CPU on one process, reading "
            f"{rates.conversion_read / rates.saved:.1f} and writing {rates.conversion_written / rates.saved:.1f} "
            "times the checkpoint), "
            f"{small['convert_s'] / small['same_s']:.1f} times the whole same-size resume at {SIZES[0]} ranks and "
            f"{large['convert_s'] / large['same_s']:.1f} times at {SIZES[-1]}; then every rank reads "
            f"{rates.other_read / rates.saved:.2f} times the checkpoint whatever N, so the load grows with N once "
            f"the file system's total binds and "
            + (
                f"takes longer than the conversion from {overtakes:,} ranks on"
                if overtakes is not None
                else "stays below the conversion"
            )
        )
    fs_ranks = fs["total"] / fs["reader"]
    header = [
        "strategy",
        "ranks",
        "checkpoint GB",
        "same size: GB read per rank",
        "same size: s",
        "other size: conversion s (rank 0)",
        "other size: GB read per rank",
        "other size: load s",
        "other size: s",
        "other / same",
        "conversion's share",
    ]
    return [
        "### The vitl model on 8, 64 and 512 ranks (modelled)",
        "",
        f"- configs/stage1/vitl.yaml's model: {parameters / 1e6:.1f} M parameters (meta device). Every byte count "
        "per parameter is the measured one above, carried over linearly; the measured weights are fp32 where vitl "
        "saves bf16, so ZeRO-2's weights file (read whole by every rank) is overstated up to twofold.",
        f"- the shared file system (assumed): {fs['reader']:g} GB/s read and {fs['writer']:g} GB/s written by one "
        f"process, {fs['total']:g} GB/s read by all clients together (a Lustre/GPFS-class cluster file system); "
        f"past {fs_ranks:.0f} ranks reading at once, the total binds. A file every rank reads whole crosses it once "
        f"per node of {GPUS_PER_NODE} ranks (the node's page cache serves the others); rank 0's second reads of "
        "what it converts, and of its temporary fragments, come from its page cache.",
        "- a load: the measured CPU rate of one process (deserialising from the page cache) plus its I/O, the slower "
        "of one client's bandwidth and its share of the total. Same size: each rank reads its partition and what "
        "every rank reads whole (ZeRO-2's weights file), as measured on 2 ranks, the partition scaled by 2/N.",
        "- other size: rank 0 alone reads every partition, converts (the measured CPU rate) and writes the universal "
        "form, while the other ranks wait; then every rank reads every full tensor of the universal form (DeepSpeed's "
        "load_hp_checkpoint_state loads each whole and slices its part out), as measured on "
        f"{next(iter(conv.values()))['other']['processes']} process(es): a rank's read does not shrink with N.",
        "- not modelled: the checksum pass before a load (the ranks hash a share each, the same in both cases), "
        "starting the processes, and building the model and optimizer.",
        "",
        table(header, rows),
        "",
        "Reading:",
        "",
        *[f"- {line}." for line in reading],
        f"- The serial conversion on rank 0 is {min(shares):.0%} to {max(shares):.0%} of a resume on another size "
        f"at {SIZES[0]} to {SIZES[-1]} ranks, the rest every rank reading every full universal tensor. What "
        "would remove them (not built): converting in parallel across the ranks (each rank converting the "
        "parameters it will own: ds_to_universal's extract and merge work per partition file and per parameter, so "
        "they split without coordination), and each rank reading only its slice of each universal tensor "
        "(torch.load with mmap=True, or byte ranges), which brings the load back to 1/N of the state per rank: the "
        "same-size cost. Until then, resuming on the same number of processes avoids both.",
        "",
    ]


def document(plan: dict[str, Any], conv: dict[str, Any], parameters: int, resumed: int, quick: bool) -> str:
    fs = {"reader": FS_READER_GBPS, "writer": FS_WRITER_GBPS, "total": FS_TOTAL_GBPS}
    command = "python -m benchmarks.scaling_resize" + (" --quick" if quick else "")
    lines = [
        f"Written by `{command}` on {datetime.date.today().isoformat()}"
        + (" (quick: small sizes, a check that it runs, not the measurement)." if quick else ".")
        + " A checkpoint saved by N processes resumes on another number (emi.engine.reshard) and its epoch is dealt "
        "out again to the new ranks and workers (emi.data.plan): what that costs against a resume on the same "
        "number.",
        "",
        *replanning_part(plan),
        *conversion_part(conv, resumed),
        *model_part(conv, parameters, fs),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=SCALING)
    parser.add_argument("--quick", action="store_true", help="small sizes: a check that everything runs")
    parser.add_argument("--worker", nargs=5, metavar=("STRATEGY", "RUN_DIR", "RESULT", "HIDDEN", "LAYERS"))
    args = parser.parse_args()
    if args.worker:
        strategy, run_dir, result, hidden, layers = args.worker
        checkpoint_worker(strategy, Path(run_dir), Path(result), int(hidden), int(layers))
        return
    if args.quick:
        plan = replanning({"20,000 samples": 20_000}, (2, 4), repeats=2)
        conv = conversions(("zero2",), hidden=256, layers=2, resumed=1)
        resumed = 1
    else:
        plan = replanning(DATA_SETS, SIZES, REPEATS)
        conv = conversions(("zero2", "zero3"), HIDDEN, LAYERS, RESUMED_PROCESSES)
        resumed = RESUMED_PROCESSES
    body = document(plan, conv, vitl_parameters(), resumed, args.quick)
    write_section(HEADING, body, args.out)
    print(f"wrote section {HEADING!r} of {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
