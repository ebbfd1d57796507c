"""Trainer overhead: the real `emi.engine.loop.fit` (accelerate + DeepSpeed ZeRO) against a plain PyTorch loop.

Both train the Stage I tiny model (configs/stage1/tiny.yaml: CLIP-ViT, BERT and Wav2Vec2 from small random
configs, both pairs) on the same batch, built once by emi/stages/stage1.py's own loader from synthetic shards and held
in memory, so no data loading is timed. `fit` gets the real Task from emi/stages/stage1.py's `build_task` (model and
loss), with only its training data swapped for that in-memory batch; logging and checkpoints are pushed past the
end of the run. The plain loop is model(batch) -> loss -> backward -> AdamW step -> zero_grad.

A step's time is the time between two requests for a batch, so it holds everything the loop does per step
(learning rate, device move, forward, backward, clipping, optimizer, stop-flag agreement). After `warmup` steps
the rest are cut into `blocks` blocks of `block_steps`; the median of the blocks' means is reported (the best block
flatters whichever configuration had one quiet moment on a shared machine).
Each configuration runs in its own process (a fresh accelerate/DeepSpeed state), under `accelerate launch` for
two processes (gloo).

    python -m benchmarks.bench_trainer [--warmup 5] [--blocks 5] [--block-steps 10]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.timing import table, verdict

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "stage1" / "tiny.yaml"
ACCELERATE = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--config_file",
    str(REPO / "configs" / "accelerate" / "cpu.yaml"),
]
TARGET = 1.3  # fit's step time (ZeRO-2, one process) over the plain loop's
# name -> (loop, strategy, processes)
CONFIGS = {
    "plain": ("plain", "ddp", 1),
    "fit_zero2": ("fit", "zero2", 1),
    "fit_zero3": ("fit", "zero3", 1),
    "fit_zero2_2proc": ("fit", "zero2", 2),
}


class InMemoryData:
    """The DataInfo interface `fit` uses, yielding one batch `num_batches` times and timing every request."""

    def __init__(self, batch: dict[str, Any], num_batches: int, batch_size: int) -> None:
        self.batch, self.num_batches, self.batch_size = batch, num_batches, batch_size
        self.skip = 0
        self.request_times: list[float] = []

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.skip = skip_batches

    def skipped(self) -> int:
        return 0  # nothing to decode, nothing corrupt

    @property
    def dataloader(self) -> Iterator[dict[str, Any]]:
        for _ in range(self.num_batches - self.skip):
            self.request_times.append(time.perf_counter())
            yield self.batch
        self.request_times.append(time.perf_counter())


def block_means(request_times: list[float], warmup: int, blocks: int, block_steps: int) -> list[float]:
    """Mean step seconds of each block of `block_steps` steps after `warmup` steps."""
    steps = [b - a for a, b in zip(request_times, request_times[1:])][warmup:]
    if len(steps) < blocks * block_steps:
        raise ValueError(f"{len(steps)} timed steps after warm-up, expected {blocks * block_steps}")
    return [sum(steps[i * block_steps : (i + 1) * block_steps]) / block_steps for i in range(blocks)]


def plain_loop(model, compute_loss, data: InMemoryData, lr: float, weight_decay: float) -> None:
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    for batch in data.dataloader:
        loss, _ = compute_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def measure(loop: str, strategy: str, shards: Path, out: Path, warmup: int, blocks: int, block_steps: int) -> dict:
    """One configuration in this process (launched by `run`): per-block mean step seconds on rank 0."""
    from accelerate.utils import set_seed

    from emi.config import Stage1Config, load_config
    from emi.engine.distributed import build_accelerator
    from emi.engine.loop import fit
    from emi.stages.stage1 import build_task

    config = load_config(
        Stage1Config,
        TINY_CONFIG,
        [
            f"data.train={shards}",
            "data.val=null",
            "data.num_workers=0",
            f"run.output_dir={out}",
            f"run.name={loop}-{strategy}",
            f"train.strategy={strategy}",
            "train.epochs=1",
            "train.log_every=1000000000",
            "train.checkpoint_every=1000000000",
        ],
    )
    accelerator = build_accelerator(config.train, config.data.batch_size)  # the order of emi.engine.run_stage
    set_seed(config.run.seed)
    task = build_task(config, accelerator)
    task.train_data.set_epoch(0)
    batch = next(iter(task.train_data.dataloader))  # a real batch of the Stage I loader
    data = InMemoryData(batch, warmup + blocks * block_steps + 1, config.data.batch_size)
    if loop == "plain":
        plain_loop(task.model, task.compute_loss, data, config.optim.lr, config.optim.weight_decay)
    else:
        task.train_data = data
        fit(task, accelerator, config, out / config.run.name)
    return {
        "block_step_s": block_means(data.request_times, warmup, blocks, block_steps),
        "rank": accelerator.process_index,
        "world_size": accelerator.num_processes,
        "batch_size": config.data.batch_size,
    }


def launch(name: str, shards: Path, work: Path, warmup: int, blocks: int, block_steps: int) -> dict:
    loop, strategy, processes = CONFIGS[name]
    result_file = work / f"{name}.json"
    args = [
        "-m",
        "benchmarks.bench_trainer",
        "--measure",
        loop,
        "--strategy",
        strategy,
        "--shards",
        str(shards),
        "--out",
        str(work / "runs"),
        "--warmup",
        str(warmup),
        "--blocks",
        str(blocks),
        "--block-steps",
        str(block_steps),
        "--result",
        str(result_file),
    ]
    command = [*ACCELERATE, "--num_processes", str(processes), *args] if processes > 1 else [sys.executable, *args]
    env = dict(os.environ, PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"trainer benchmark {name} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return json.loads(result_file.read_text())


def run(
    work: Path, warmup: int = 5, blocks: int = 5, block_steps: int = 10, configs: tuple[str, ...] = tuple(CONFIGS)
) -> dict:
    from benchmarks.bench_loader import write_synthetic_shards

    shards = write_synthetic_shards(work / "shards", num_clips=32, shard_size=16)
    measured = {name: launch(name, shards, work, warmup, blocks, block_steps) for name in configs}
    result: dict[str, Any] = {
        "warmup": warmup,
        "blocks": blocks,
        "block_steps": block_steps,
        "batch_size": measured[configs[0]]["batch_size"],
    }
    for name, values in measured.items():
        result[name] = {
            "step_ms": round(1000 * statistics.median(values["block_step_s"]), 2),
            "block_step_ms": [round(1000 * s, 2) for s in values["block_step_s"]],
            "processes": values["world_size"],
        }
    if "plain" in measured and "fit_zero2" in measured:
        result["overhead_zero2"] = round(result["fit_zero2"]["step_ms"] / result["plain"]["step_ms"], 3)
        result["met"] = result["overhead_zero2"] <= TARGET
    if "fit_zero3" in measured and "fit_zero2" in measured:
        result["zero3_over_zero2"] = round(result["fit_zero3"]["step_ms"] / result["fit_zero2"]["step_ms"], 3)
    if "fit_zero2_2proc" in measured and "fit_zero2" in measured:
        result["two_processes_over_one"] = round(
            result["fit_zero2_2proc"]["step_ms"] / result["fit_zero2"]["step_ms"], 3
        )
    return result


def section(result: dict) -> str:
    described = {
        "plain": "plain PyTorch loop, 1 process",
        "fit_zero2": "fit, DeepSpeed ZeRO-2, 1 process",
        "fit_zero3": "fit, DeepSpeed ZeRO-3, 1 process",
        "fit_zero2_2proc": "fit, DeepSpeed ZeRO-2, 2 processes (gloo)",
    }
    rows = [
        [described[name], result[name]["step_ms"], ", ".join(map(str, result[name]["block_step_ms"]))]
        for name in CONFIGS
        if name in result
    ]
    return "\n".join(
        [
            "## 3. Trainer overhead",
            "",
            "What: step time of the real trainer (`emi.engine.loop.fit` with emi/stages/stage1.py's `build_task`: "
            "accelerate + DeepSpeed) against a plain PyTorch loop (model(batch) -> loss -> backward -> AdamW step), "
            f"on the Stage I tiny model (configs/stage1/tiny.yaml, both pairs) and the same batch of "
            f"{result['batch_size']} clips per process, built once by the Stage I loader and held in memory.",
            "",
            "How: a step is the time between two requests for a batch, so it includes everything the loop does per "
            f"step. After {result['warmup']} warm-up steps, {result['blocks']} blocks of {result['block_steps']} "
            "steps; "
            "the median of the blocks' means is reported. Each configuration runs in a fresh process; logging and "
            "checkpoints "
            "are pushed past the run's end. fp32 on the CPU (DeepSpeed's CPU accelerator, gloo).",
            "",
            table(["configuration", "step ms (median block)", "block means ms"], rows),
            "",
            f"Overhead (fit ZeRO-2 / plain, one process): **{result.get('overhead_zero2')}**; target <= {TARGET}: "
            f"{verdict(result['met']) if 'met' in result else 'not measured'}. "
            f"ZeRO-3 / ZeRO-2: {result.get('zero3_over_zero2')}. Two processes / one (ZeRO-2, each process its own "
            f"batch of {result['batch_size']}, so twice the work per step on 2 cores): "
            f"{result.get('two_processes_over_one')} (for information).",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--block-steps", type=int, default=10)
    parser.add_argument("--measure", choices=("plain", "fit"), help="internal: measure one configuration here")
    parser.add_argument("--strategy", choices=("ddp", "zero2", "zero3"))
    parser.add_argument("--shards", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--result", type=Path)
    args = parser.parse_args()
    if args.measure:
        measured = measure(
            args.measure, args.strategy, args.shards, args.out, args.warmup, args.blocks, args.block_steps
        )
        if measured["rank"] == 0:
            args.result.write_text(json.dumps(measured))
        return
    with tempfile.TemporaryDirectory(prefix="emi-bench-trainer-") as tmp:
        print(json.dumps(run(Path(tmp), args.warmup, args.blocks, args.block_steps), indent=2))


if __name__ == "__main__":
    main()
