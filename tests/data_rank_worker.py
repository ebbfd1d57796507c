"""One rank of the multi-rank loader test (tests/test_data_multirank.py).

    RANK=r WORLD_SIZE=w MASTER_ADDR=... MASTER_PORT=... python tests/data_rank_worker.py SHARDS OUT.json B [B ...]

For each per-rank batch size B: two epochs over SHARDS with 2 dataloader workers and an all_reduce every
step, as a training loop does (a rank with fewer batches than another would leave it waiting there).
Writes {B: [{"keys": [...], "steps": n, "num_batches": n} per epoch]} to OUT.json.
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from emi.data import AudioSpec, ImageSpec

from helpers import flat_loader


def main(shards: str, out: str, batch_sizes: list[int]) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=30))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    result = {}
    for batch_size in batch_sizes:
        data = flat_loader(
            shards,
            mode="clip",
            batch_size=batch_size,
            num_workers=2,
            world_size=world_size,
            rank=rank,
            seed=1,
            shuffle=True,
            train=True,
            shuffle_buffer=4,
            num_frames=2,
            image=ImageSpec(size=16),
            audio=AudioSpec(seconds=0.1),
        )
        epochs = []
        for epoch in range(2):
            data.set_epoch(epoch)
            keys, steps = [], 0
            for batch in data.dataloader:
                seen = torch.tensor([len(batch["key"])])
                dist.all_reduce(seen)
                keys += batch["key"]
                steps += 1
            epochs.append({"keys": keys, "steps": steps, "num_batches": data.num_batches})
        result[batch_size] = epochs
    dist.barrier()
    with open(out, "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], [int(b) for b in sys.argv[3:]])
