"""Stage I resumed on another number of processes, through accelerate launch (gloo, CPU): the epoch's samples are each
trained on exactly once across the layouts, and with the global batch kept the weights match the uninterrupted run."""

from __future__ import annotations

import re
import shutil
from collections import Counter

import pytest
import torch

from emi.config import TrainSection
from emi.engine.loop import Schedule
from emi.engine.resize import resized
from emi.errors import UsageError
from emi.formats.checkpoint import Layout, TrainerState
from emi.formats.samples import read_run_records

from helpers import exported, launch

# Dropout off: the resumed processes draw other random streams than the ones they replace, and the test compares
# weights; everything else random in the data comes from (seed, epoch, sample key).
NO_DROPOUT = [
    *(f"model.text.config.{name}=0.0" for name in ("hidden_dropout_prob", "attention_probs_dropout_prob")),
    *(
        f"model.audio.config.{name}=0.0"
        for name in ("hidden_dropout", "activation_dropout", "attention_dropout", "feat_proj_dropout")
    ),
]


def stage1_args(shards, out, name, *extra):
    """48 training clips in batches of 4, one worker per process: 6 batches per process per epoch on 2 processes."""
    return [
        "--config",
        "configs/stage1/tiny.yaml",
        f"data.train={shards['train']}",
        "data.val=null",
        f"run.output_dir={out}",
        f"run.name={name}",
        "data.batch_size=4",
        "train.log_every=1",
        "train.record_samples=true",
        "train.keep_last=20",
        *NO_DROPOUT,
        *extra,
    ]


def log_of(run_dir) -> str:
    return (run_dir / "log.txt").read_text()


def test_two_processes_resumed_on_three_then_one_train_on_every_sample_once_per_epoch(synthetic_shards, tmp_path):
    """ZeRO-2 on 2 processes stops after 3 of its 6 steps (24 samples left), resumes on 3 processes with their own
    batch of 4 (train.resize=rank: 2 micro-steps of 12 left), stops after one, and finishes on one process; the
    second epoch runs on that one process. Each epoch's sample record holds every clip once."""
    args = stage1_args(
        synthetic_shards, tmp_path, "elastic", "train.strategy=zero2", "train.epochs=2", "train.resize=rank"
    )
    run_dir = tmp_path / "elastic"
    launch("train/stage1.py", [*args, "train.max_steps=3"], num_processes=2)
    launch("train/stage1.py", [*args, "train.max_steps=4", "--resume", "latest"], num_processes=3)
    launch("train/stage1.py", [*args, "--resume", "latest"], num_processes=1)
    log = log_of(run_dir)
    assert "resumed from 2 to 3 processes: global batch 8 -> 12 (train.resize=rank" in log, log
    assert "resumed from 3 to 1 processes: global batch 12 -> 4 (train.resize=rank" in log, log
    records = read_run_records(run_dir)
    keys = {key for record in records for key in record.keys}
    assert len(keys) == 48
    for epoch in (0, 1):
        seen = Counter(key for record in records if record.epoch == epoch for key in record.keys)
        assert seen == Counter(keys), f"epoch {epoch}: {sorted(k for k, n in seen.items() if n != 1)}"
    assert {record.processes for record in records if record.epoch == 0} == {1, 2, 3}
    assert {record.processes for record in records if record.epoch == 1} == {1}
    # 3 steps of 8, 1 of 12 and 3 of 4 in the first epoch, then 12 steps of 4
    assert re.search(r"done: 19 steps", log), log


@pytest.mark.parametrize("strategy", ["zero3"])
def test_resumed_on_one_process_with_the_global_batch_kept_ends_with_the_uninterrupted_weights(
    synthetic_shards, tmp_path, strategy
):
    """A 2-process run checkpoints after 2 of its 6 steps; the same run resumed from there on one process with
    train.resize=batch (batch 4 -> 8: each step's samples and gathered contrastive batch as before) ends with the
    weights of the uninterrupted 2-process run, within float rounding."""
    args = stage1_args(
        synthetic_shards,
        tmp_path,
        "whole",
        f"train.strategy={strategy}",
        "train.epochs=1",
        "train.checkpoint_every=2",
        "train.resize=batch",
    )
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    launch("train/stage1.py", args, num_processes=2)
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "export")
    for checkpoint in (resumed / "checkpoints").glob("step-*"):
        if checkpoint.name != "step-00000002":
            shutil.rmtree(checkpoint)
    launch("train/stage1.py", [*args, "run.name=resumed", "--resume", "latest"], num_processes=1)
    log = log_of(resumed)
    assert "resumed from 2 to 1 processes: global batch 8 kept (train.resize=batch); batch 4 -> 8" in log, log
    reference, weights = exported(whole), exported(resumed)
    assert reference.keys() == weights.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(weights[name], tensor, atol=2e-5, rtol=1e-4, msg=name)
    steps = Counter(record.step for record in read_run_records(resumed))
    assert steps == {step: 2 for step in (1, 2)} | {step: 1 for step in range(3, 7)}  # batches per step


def test_resize_keeps_the_global_batch_the_way_it_is_told_or_names_the_ways_that_would():
    saved = Layout(world_size=2, num_workers=1, batch_size=4, grad_accum=2)  # global batch 16
    assert resized(saved, 4, "accum") == (4, 1) and resized(saved, 1, "accum") == (4, 4)
    assert resized(saved, 4, "batch") == (2, 2) and resized(saved, 8, "batch") == (1, 2)
    assert resized(saved, 3, "rank") == (4, 2) and resized(saved, 2, "accum") == (4, 2)
    with pytest.raises(
        UsageError,
        match=r"train.resize=accum: the global batch 16 .* on 8 processes .*use "
        r"train.resize=batch or train.resize=rank",
    ):
        resized(saved, 8, "accum")
    with pytest.raises(UsageError, match=r"on 3 processes by changing grad_accum; use train.resize=rank"):
        resized(saved, 3, "accum")


def test_the_schedule_counts_the_steps_left_from_where_a_resumed_run_stands():
    train = TrainSection(epochs=3, grad_accum=2)
    assert Schedule.of(12, train).total_steps == 18
    # at step 8 in epoch 2, whose rest was re-dealt into 6 batches (3 steps), with epoch 3 (6 steps) to come
    state = TrainerState(step=8, epoch=1, batch_in_epoch=0)
    assert Schedule.of(12, train, state, epoch_batches=6).total_steps == 8 + 3 + 6
    assert Schedule.of(12, TrainSection(epochs=3, grad_accum=2, max_steps=10), state, 6).total_steps == 10
