"""Trainer overhead: the step time of the real `emi.engine.loop.fit` (accelerate + DeepSpeed ZeRO-2) against a plain
PyTorch loop doing the same work per step, and against the floor of that work.

Three contenders train the Stage I tiny model (configs/stage1/tiny.yaml: CLIP-ViT, BERT and Wav2Vec2 from small
random configs, both pairs, the same seed) on the same batch, made once by emi/stages/stage1.py's own loader from
synthetic shards, saved, and held in memory by every contender, so no data loading is timed:
- `fit`: the real `fit` with the real Task of emi/stages/stage1.py's `build_task` (model and loss), only its training
  data swapped for the in-memory batch; logging and checkpoints are pushed past the end of the run;
- `plain`: what `fit` does per step, written as a plain loop: the batch to the device, forward and loss, backward,
  gradient clipping (the config's max norm), AdamW (emi's parameter groups) step, the learning rate set by emi's own
  SGDR schedule (`sgdr_lr`), zero_grad;
- `floor`: forward and loss, backward, AdamW step, zero_grad: the least a training step costs.

Each contender runs in its own fresh process every round (a fresh accelerate/DeepSpeed state), one process, fp32 on
the CPU; benchmarks/harness.py interleaves them over the rounds, the order reversed every other round. A step's time
is measured by the child itself: the time between two requests for a batch, so it holds everything the loop does per
step. After `warmup` steps the rest are cut into `blocks` blocks of `block_steps`; the child's step time is the
median of the blocks' means. Ratios of step times are taken within each round; the report is their median over the
rounds with the range. Target: fit / plain <= 1.15 (median).

Why: one more `fit` process and one more plain loop run under py-spy (sampling, where it is installed: it is not a
dependency of emi), and each sample taken inside the training loop is put in one category of a step's work (forward
and loss, autograd, DeepSpeed's gradient hooks, the optimizer step, clipping, the learning rate, telemetry, the stop
flag, the rest): each category's share of the step and its milliseconds, side by side.

    python -m benchmarks.bench_trainer [--quick]    (writes synthetic shards to a temp dir, prints the section)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks import harness
from benchmarks.harness import show, spread_json

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "stage1" / "tiny.yaml"
TARGET = 1.15  # fit's step time over the plain loop's (the same work per step)
CONTENDERS = ("fit", "plain", "floor")
DESCRIBED = {
    "fit": "`fit`, DeepSpeed ZeRO-2",
    "plain": "plain loop: forward, loss, backward, clipping, AdamW, SGDR lr, zero_grad",
    "floor": "floor: forward, loss, backward, AdamW, zero_grad",
}


@dataclass(frozen=True)
class Sizes:
    """Steps per process and rounds. A process starts in 6-9 s (imports, the model, DeepSpeed) and a step of the
    tiny model takes 0.3-0.45 s on 2 cores; see the module's `run` for the whole run's time."""

    warmup: int = 5
    blocks: int = 3
    block_steps: int = 10
    rounds: int = harness.MIN_ROUNDS

    @property
    def timed_steps(self) -> int:
        return self.blocks * self.block_steps

    def child_args(self) -> list[str]:
        return ["--warmup", str(self.warmup), "--blocks", str(self.blocks), "--block-steps", str(self.block_steps)]


QUICK = Sizes(warmup=1, blocks=2, block_steps=2, rounds=2)
PROFILE_RATE = 100  # py-spy samples per second
PROFILED = ("fit", "plain")
# A sample of a training loop goes to the first category one of whose frames holds a marker (the step's DeepSpeed
# frames before the hooks', the hooks' before autograd's, which runs them).
PROFILE_CATEGORIES = {
    "optimizer step and zero_grad (fit: DeepSpeed's, with clipping)": ("DeepSpeedEngine.step (", "torch/optim/"),
    "DeepSpeed ZeRO-2 gradient hooks during backward": ("deepspeed/runtime/zero/",),
    "gradient clipping (plain loop)": ("clip_grad.py",),
    "backward: autograd": ("Tensor.backward (",),
    "DeepSpeed backward around autograd": ("DeepSpeedEngine.backward (",),
    "forward and loss": ("compute_loss (",),
    "learning rate: sgdr_lr": ("sgdr_lr (",),
    "batch to the device": ("move_to_device (",),
    "telemetry: loss window, step clock, log line": ("emi/engine/telemetry.py",),
    "stop-flag agreement": ("StopRequest.agreed (",),
}
REST = "the rest: accelerate's step wrappers, the loop's own Python"
LOOP_FRAMES = {"fit": "train_epoch (emi/engine/loop.py", "plain": "plain_loop ("}


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


def plain_loop(model, optimizer, compute_loss, data: InMemoryData, config: Any, device: Any) -> None:
    """What `fit` does per step, as a competent user would write it with the same libraries."""
    import torch

    from emi.devices import move_to_device
    from emi.engine.optim import sgdr_lr

    model.train()
    for step, batch in enumerate(data.dataloader):
        for group in optimizer.param_groups:
            group["lr"] = sgdr_lr(step, config.optim, data.num_batches)  # one epoch of num_batches steps, as fit
        loss, _ = compute_loss(model, move_to_device(batch, device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def floor_loop(model, optimizer, compute_loss, data: InMemoryData) -> None:
    """Forward, loss, backward and the optimizer step alone."""
    model.train()
    for batch in data.dataloader:
        loss, _ = compute_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def load_stage1_config(contender: str, shards: Path, out: Path) -> Any:
    from emi.config import Stage1Config, load_config

    return load_config(
        Stage1Config,
        TINY_CONFIG,
        [
            f"data.train={shards}",
            "data.val=null",
            "data.num_workers=0",
            f"run.output_dir={out}",
            f"run.name={contender}",
            # fit gets ZeRO-2; the plain loops a bare single-process Accelerator (only its device is used)
            f"train.strategy={'zero2' if contender == 'fit' else 'ddp'}",
            "train.epochs=1",
            "train.log_every=1000000000",
            "train.checkpoint_every=1000000000",
        ],
    )


def build(contender: str, shards: Path, out: Path) -> tuple[Any, Any, Any]:
    """(config, accelerator, Task) as emi.engine.run_stage builds them, the model seeded alike in every process."""
    from accelerate.utils import set_seed

    from emi.engine.distributed import build_accelerator
    from emi.stages.stage1 import build_task

    config = load_stage1_config(contender, shards, out)
    accelerator = build_accelerator(config.train, config.data.batch_size)
    set_seed(config.run.seed)
    return config, accelerator, build_task(config, accelerator)


def make_batch(shards: Path, out: Path, batch_file: Path) -> None:
    """The first training batch of the Stage I loader, saved for every contender to load."""
    import torch

    _, _, task = build("plain", shards, out)
    task.train_data.set_epoch(0)
    torch.save(next(iter(task.train_data.dataloader)), batch_file)


def measure(contender: str, shards: Path, out: Path, batch_file: Path, sizes: Sizes) -> dict[str, Any]:
    """One contender in this process (launched by `launch`): its steps' block means and their median, seconds."""
    import torch

    from emi.engine.loop import fit
    from emi.engine.optim import build_optimizer

    config, accelerator, task = build(contender, shards, out)
    data = InMemoryData(torch.load(batch_file), sizes.warmup + sizes.timed_steps + 1, config.data.batch_size)
    if contender == "fit":
        task.train_data = data
        fit(task, accelerator, config, out / config.run.name)
    else:
        optimizer = build_optimizer(task.model, config.optim)  # fit's: AdamW with emi's parameter groups
        if contender == "plain":
            plain_loop(task.model, optimizer, task.compute_loss, data, config, accelerator.device)
        else:
            floor_loop(task.model, optimizer, task.compute_loss, data)
    blocks = block_means(data.request_times, sizes.warmup, sizes.blocks, sizes.block_steps)
    return {"block_step_s": blocks, "step_s": statistics.median(blocks), "timed_steps": sizes.timed_steps}


def child_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")


def child(args: list[str], what: str) -> None:
    command = [sys.executable, "-m", "benchmarks.bench_trainer", *args]
    result = subprocess.run(command, cwd=REPO, env=child_env(), capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"trainer benchmark, {what}, failed ({result.returncode}):\n{result.stderr[-4000:]}")


class Contenders:
    """Each contender launched in a fresh process, for harness.interleave, and the step times the children measured
    (the harness's wall time holds the process start, which is not a step)."""

    def __init__(self, shards: Path, work: Path, batch_file: Path, sizes: Sizes) -> None:
        self.shards, self.work, self.batch_file, self.sizes = shards, work, batch_file, sizes
        self.measured: dict[str, list[dict[str, Any]]] = {name: [] for name in CONTENDERS}

    def functions(self) -> dict[str, Callable[[], int]]:
        return {name: (lambda name=name: self.launch(name)) for name in CONTENDERS}

    def launch(self, contender: str) -> int:
        round_index = len(self.measured[contender])
        result_file = self.work / f"{contender}-{round_index}.json"
        child(
            ["--measure", contender, "--shards", str(self.shards), "--out", str(self.work / "runs" / str(round_index)),
             "--batch", str(self.batch_file), "--result", str(result_file), *self.sizes.child_args()],
            f"{contender} round {round_index}",
        )  # fmt: skip
        measured = json.loads(result_file.read_text())
        self.measured[contender].append(measured)
        return measured["timed_steps"]


def py_spy() -> str | None:
    """py-spy next to this Python (the venv's) or on the PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.is_file() else shutil.which("py-spy")


def profile_shares(raw: str, loop_frame: str) -> dict[str, Any]:
    """Each category's share of the samples py-spy took inside a training loop (`loop_frame`) from its `-f raw`
    output: one stack a line, frames joined by ';', then the count."""
    counts = dict.fromkeys([*PROFILE_CATEGORIES, REST], 0)
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if loop_frame not in stack:
            continue  # the start, the export, imports: not a step
        markers = PROFILE_CATEGORIES.items()
        name = next((name for name, marks in markers if any(mark in stack for mark in marks)), REST)
        counts[name] += int(count)
    samples = sum(counts.values())
    if samples == 0:
        raise ValueError(f"no py-spy sample inside the training loop {loop_frame}")
    return {"samples": samples, "shares": {name: count / samples for name, count in counts.items()}}


def profile_contender(contender: str, shards: Path, work: Path, batch_file: Path, sizes: Sizes) -> dict[str, Any]:
    """One more process of `contender`, sampled by py-spy: each category's share of its step, and its step time."""
    spy = py_spy()
    if spy is None:
        return {"skipped": "py-spy is not installed"}
    raw, result_file = work / f"profile-{contender}.txt", work / f"profile-{contender}.json"
    args = ["--measure", contender, "--shards", str(shards), "--out", str(work / "runs" / "profile"), "--batch",
            str(batch_file), "--result", str(result_file), *sizes.child_args()]  # fmt: skip
    command = [spy, "record", "-r", str(PROFILE_RATE), "-f", "raw", "-o", str(raw), "--", sys.executable, "-m",
               "benchmarks.bench_trainer", *args]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, env=child_env(), capture_output=True, text=True)
    if done.returncode != 0 or not raw.is_file():  # e.g. no ptrace in a container
        return {"skipped": f"py-spy failed ({done.returncode}): {done.stderr.strip()[-300:]}"}
    step_s = json.loads(result_file.read_text())["step_s"]
    return {**profile_shares(raw.read_text(), LOOP_FRAMES[contender]), "step_ms": 1000 * step_s}


def step_ratio(measured: dict[str, list[dict[str, Any]]], name: str, baseline: str) -> harness.Spread:
    """name's step time over baseline's, taken within each round, over the rounds."""
    pairs = zip(measured[name], measured[baseline])
    return harness.Spread.of([ours["step_s"] / theirs["step_s"] for ours, theirs in pairs])


def summarise(measured: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    step_ms = {name: spread_json([1000 * m["step_s"] for m in measured[name]]) for name in CONTENDERS}
    ratios = {
        "fit_over_plain": asdict(step_ratio(measured, "fit", "plain")),
        "fit_over_floor": asdict(step_ratio(measured, "fit", "floor")),
        "plain_over_floor": asdict(step_ratio(measured, "plain", "floor")),
    }
    return {"step_ms": step_ms, "ratios": ratios, "met": ratios["fit_over_plain"]["median"] <= TARGET}


def run(work: Path, quick: bool = False, sizes: Sizes | None = None, profile: bool | None = None) -> dict[str, Any]:
    """The trainer benchmark; `profile` (default: not `quick`): py-spy profiles of one more fit and plain process.
    On an idle 2-core machine the full run takes about 5.5 minutes: 17 processes of 6-9 s start-up and 36 steps of
    0.3-0.45 s each, and one that makes the batch."""
    from benchmarks.bench_loader import write_synthetic_shards

    work = Path(work)
    sizes = sizes or (QUICK if quick else Sizes())
    shards = write_synthetic_shards(work / "shards", num_clips=32, shard_size=16)
    batch_file = work / "batch.pt"
    child(["--make-batch", "--shards", str(shards), "--out", str(work / "runs"), "--batch", str(batch_file)], "batch")
    contenders = Contenders(shards, work, batch_file, sizes)
    rounds = harness.interleave(contenders.functions(), sizes.rounds)
    profile = not quick if profile is None else profile
    profiles = {name: profile_contender(name, shards, work, batch_file, sizes) for name in PROFILED} if profile else {}
    config = load_stage1_config("fit", shards, work)
    return {
        **summarise(contenders.measured),
        "measured": contenders.measured,
        "profiles": profiles,
        "rounds": rounds.to_json(),
        "load": rounds.load(),
        "sizes": asdict(sizes),
        "batch_size": config.data.batch_size,
        "clip_grad": config.train.clip_grad,
        "cpu_cores": os.cpu_count(),
    }


def profile_table(profiles: dict[str, dict[str, Any]]) -> str:
    """ms per step and share of the step of each category, fit's and the plain loop's side by side."""
    if not profiles:
        return "Not profiled (--quick)."
    skipped = [f"{name}: {p['skipped']}" for name, p in profiles.items() if "skipped" in p]
    if skipped:
        return f"Not profiled: {'; '.join(skipped)}."
    fit, plain = profiles["fit"], profiles["plain"]

    def cell(measured: dict[str, Any], name: str) -> str:
        share = measured["shares"][name]
        return f"{share * measured['step_ms']:.1f} ({100 * share:.1f} %)"

    names = sorted(fit["shares"], key=lambda name: -fit["shares"][name])
    rows = [[name, cell(fit, name), cell(plain, name)] for name in names]
    rows.append(["step (samples)", *(f"{p['step_ms']:.1f} ({p['samples']})" for p in (fit, plain))])
    header = ["where a step's time goes", "fit: ms per step (share)", "plain loop: ms per step (share)"]
    return harness.table(header, rows)


def section(result: dict[str, Any]) -> str:
    ratios, step_ms = result["ratios"], result["step_ms"]
    rows = [
        [DESCRIBED[name], show(step_ms[name], 1), show(ratios["fit_over_" + name]) if name != "fit" else "1"]
        for name in CONTENDERS
    ]
    sizes = result["sizes"]
    return harness.render(
        "bench_trainer",
        batch=result["batch_size"], clip_grad=result["clip_grad"], cores=result["cpu_cores"],
        rounds=sizes["rounds"], warmup=sizes["warmup"], blocks=sizes["blocks"], block_steps=sizes["block_steps"],
        load=result["load"], table=harness.table(["contender", "step ms", "fit / contender"], rows),
        fit_over_plain=show(ratios["fit_over_plain"]), fit_over_floor=show(ratios["fit_over_floor"]),
        plain_over_floor=show(ratios["plain_over_floor"]), target=TARGET, verdict=harness.verdict(result["met"]),
        profile=profile_table(result["profiles"]), rate=PROFILE_RATE,
    )  # fmt: skip


def summary(result: dict[str, Any]) -> list[list[str]]:
    what = "trainer step time, fit (ZeRO-2) / plain loop doing the same work"
    return [[what, show(result["ratios"]["fit_over_plain"]), f"<= {TARGET}", "yes" if result["met"] else "**no**"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK.rounds} rounds of {QUICK.timed_steps} steps")
    parser.add_argument("--measure", choices=CONTENDERS, help="internal: measure one contender in this process")
    parser.add_argument("--make-batch", action="store_true", help="internal: save the batch every contender trains on")
    parser.add_argument("--shards", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--batch", type=Path)
    parser.add_argument("--result", type=Path)
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--blocks", type=int)
    parser.add_argument("--block-steps", type=int)
    args = parser.parse_args()
    if args.make_batch:
        make_batch(args.shards, args.out, args.batch)
    elif args.measure:
        sizes = Sizes(args.warmup, args.blocks, args.block_steps)
        args.result.write_text(json.dumps(measure(args.measure, args.shards, args.out, args.batch, sizes)))
    else:
        with tempfile.TemporaryDirectory(prefix="emi-bench-trainer-") as tmp:
            print(section(run(Path(tmp), quick=args.quick)))


if __name__ == "__main__":
    main()
