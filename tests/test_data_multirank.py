"""The acceptance test: 2 ranks (gloo) x 2 dataloader workers over uneven shards, an all_reduce every step,
2 epochs: no hang, the same number of batches on every rank, full coverage, duplicates only in the wrap."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from emi.data.plan import cycle_segments, shard_order, take_samples, whole_shards

from helpers import write_shards

SIZES = [7, 13, 20]  # N = 40; 2 ranks x 2 workers = 4 consumers
WORKER = Path(__file__).with_name("data_rank_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], list[list[str]]]:
    root = tmp_path_factory.mktemp("multirank")
    keys = write_shards(root / "shards", SIZES, frames=(1, 2), size=(24, 16))
    env = {
        **os.environ,
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "OMP_NUM_THREADS": "1",
    }
    ranks = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(root / "shards"), str(root / f"rank{r}.json"), "2", "3"],
            env={**env, "RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    try:
        outputs = [rank.communicate(timeout=180)[0] for rank in ranks]
    except subprocess.TimeoutExpired:
        for rank in ranks:
            rank.kill()
        pytest.fail("the ranks did not finish within 180 s: a collective is waiting for a missing batch")
    for rank, output in zip(ranks, outputs):
        assert rank.returncode == 0, output
    return [json.loads((root / f"rank{r}.json").read_text()) for r in range(2)], keys


def epoch_keys(results: list[dict], batch_size: int, epoch: int) -> list[list[str]]:
    return [r[str(batch_size)][epoch]["keys"] for r in results]


def test_every_rank_runs_the_same_number_of_steps(results):
    per_rank, _ = results
    for batch_size, batches in [(2, 10), (3, 8)]:  # 2 workers x P/B: P = 10 for B=2, 12 for B=3
        for epoch in range(2):
            for r in per_rank:
                assert r[str(batch_size)][epoch]["steps"] == r[str(batch_size)][epoch]["num_batches"] == batches


def test_divisible_data_set_is_covered_exactly_once_per_epoch(results):
    per_rank, keys = results
    everything = sorted(k for shard in keys for k in shard)
    for epoch in range(2):
        seen = [k for rank in epoch_keys(per_rank, 2, epoch) for k in rank]
        assert sorted(seen) == everything  # 40 = 2 x 4 x 5: no duplicate, no loss
    assert epoch_keys(per_rank, 2, 0) != epoch_keys(per_rank, 2, 1)


def test_uneven_split_covers_everything_and_repeats_only_the_wrap(results):
    per_rank, keys = results
    for epoch in range(2):
        seen = Counter(k for rank in epoch_keys(per_rank, 3, epoch) for k in rank)
        assert set(seen) == {k for shard in keys for k in shard}
        # 4 consumers x 12 = 48 planned: the wrap repeats the first 8 samples of the epoch's sequence.
        order = shard_order(len(SIZES), seed=1, epoch=epoch, shuffle=True)
        wrapped = [
            keys[s.shard][i]
            for s in take_samples(cycle_segments(whole_shards(SIZES, order), 0), 8)
            for i in range(s.start, s.stop)
        ]
        assert sorted(k for k, n in seen.items() if n == 2) == sorted(wrapped)
        assert sum(seen.values()) == 48 and max(seen.values()) == 2
