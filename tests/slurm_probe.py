"""Distributed probe for the Slurm tests: each rank joins the process group through accelerate, all-reduces its
rank and writes what it saw to OUT_DIR/rank-<rank>.json, so a test can check that every rank ran exactly once
and that the collective reached all of them. With --wait-for-signal it then acts like a trainer that is told to
stop: it waits for SIGUSR1 or SIGTERM, meets the other ranks once more (where a trainer would checkpoint) and
records the signal."""

import argparse
import json
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir", type=Path, help="existing folder that receives one JSON file per rank")
    parser.add_argument("--wait-for-signal", action="store_true", help="block until SIGUSR1/SIGTERM arrives")
    args = parser.parse_args()
    out_dir = args.out_dir
    if not out_dir.is_dir():
        raise SystemExit(f"slurm_probe: output folder {out_dir} does not exist")

    received: list[str] = []
    if args.wait_for_signal:  # installed first: a signal that comes early must not be lost
        for signum in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(signum, lambda signum, frame: received.append(signal.Signals(signum).name))

    # gloo: the test cluster has no GPU, and gloo is what the trainer uses on CPU too.
    accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    rank_sum = torch.tensor(accelerator.process_index)
    dist.all_reduce(rank_sum)

    if args.wait_for_signal:
        (out_dir / f"ready-{accelerator.process_index}").touch()
        deadline = time.monotonic() + 120
        while not received and time.monotonic() < deadline:
            time.sleep(0.1)
        if not received:
            raise SystemExit("slurm_probe: no SIGUSR1/SIGTERM within 120 s")
        dist.barrier()  # every rank got the signal and can still talk to the others

    record = {
        "rank": accelerator.process_index,
        "world_size": accelerator.num_processes,
        "local_rank": accelerator.local_process_index,
        "node": int(os.environ["SLURM_NODEID"]),
        "sum": int(rank_sum),
        "backend": dist.get_backend(),
        "master_addr": os.environ["MASTER_ADDR"],
        "master_port": int(os.environ["MASTER_PORT"]),
        "signals": received,
    }
    # "x": a rank that runs twice fails here instead of silently overwriting its first record.
    with open(out_dir / f"rank-{accelerator.process_index}.json", "x") as f:
        json.dump(record, f)
    accelerator.end_training()


if __name__ == "__main__":
    main()
