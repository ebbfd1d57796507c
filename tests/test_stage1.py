"""Stage I end to end on synthetic shards with tiny encoders, 2 processes on the CPU (gloo)."""
from __future__ import annotations

import re
import signal
import subprocess
import time

import psutil
import pytest
import torch

from helpers import REPO, cpu_env, exported, launch, launch_command, scalars

STRATEGY_TYPE = {"ddp": "MULTI_CPU", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED"}


def stage1_args(shards, out, *extra):
    return ["--config", "configs/stage1/tiny.yaml", f"data.train={shards['train']}", f"data.val={shards['val']}",
            f"run.output_dir={out}", "data.batch_size=8", "train.log_every=1", *extra]


@pytest.fixture(scope="module")
def strategy_runs(synthetic_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1")
    for strategy in STRATEGY_TYPE:
        launch("train/stage1.py", stage1_args(synthetic_shards, out, f"run.name={strategy}",
                                              f"train.strategy={strategy}", "train.epochs=6"))
    return out


@pytest.mark.parametrize("strategy", list(STRATEGY_TYPE))
def test_strategy_trains_two_ranks_and_the_loss_falls(strategy_runs, strategy):
    run_dir = strategy_runs / strategy
    log = (run_dir / "log.txt").read_text()
    assert f"{STRATEGY_TYPE[strategy]} world=2" in log
    losses = [value for _, value in scalars(run_dir, "train/loss")]
    assert len(losses) == 18  # 48 clips / (8 x 2 ranks) = 3 steps per epoch, 6 epochs
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.1, losses
    for tag in ("train/loss_vision_text", "train/loss_audio_text", "train/temperature_vision_text",
                "train/lr", "train/grad_norm", "train/samples_per_s", "val/vision_text/a2b_R@1",
                "val/audio_text/b2a_R@5"):
        assert scalars(run_dir, tag), tag
    assert [value for _, value in scalars(run_dir, "val/num_samples")] == [16.0] * 6  # each val clip once


def test_zero_exports_match_ddp(strategy_runs):
    """Same seed, data and fp32 math: ZeRO-2/3 (partitioned, gathered on export) end where DDP ends."""
    reference = exported(strategy_runs / "ddp")
    for strategy in ("zero2", "zero3"):
        weights = exported(strategy_runs / strategy)
        assert weights.keys() == reference.keys()
        for name, tensor in reference.items():
            assert torch.allclose(weights[name], tensor, atol=1e-4, rtol=1e-3), (strategy, name)


def kill_job_tree(job: subprocess.Popen) -> None:
    """SIGKILL the launcher and every rank at once, as a scheduler does (torchrun puts ranks in new sessions)."""
    processes = [*psutil.Process(job.pid).children(recursive=True), psutil.Process(job.pid)]
    for process in processes:
        process.send_signal(signal.SIGKILL)
    psutil.wait_procs(processes, timeout=30)
    job.wait()


def test_sigkill_mid_epoch_then_resume_ends_with_the_uninterrupted_weights(strategy_runs, synthetic_shards):
    """Kill the whole job (launcher and ranks) with SIGKILL after a mid-epoch checkpoint, restart it with
    --resume latest, and end bit-identical to the uninterrupted ZeRO-2 run of the same config."""
    args = stage1_args(synthetic_shards, strategy_runs, "run.name=killed", "train.strategy=zero2", "train.epochs=6",
                       "train.checkpoint_every=2")
    run_dir = strategy_runs / "killed"
    job = subprocess.Popen(launch_command("train/stage1.py", args), cwd=REPO, env=cpu_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    mid_epoch = run_dir / "checkpoints" / "step-00000008" / "trainer_state.json"  # epoch 2, batch 2 of 3
    deadline = time.monotonic() + 300
    while not mid_epoch.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    kill_job_tree(job)
    assert mid_epoch.exists(), "the run ended or stalled before its step-8 checkpoint"
    assert not (run_dir / "export").exists()

    launch("train/stage1.py", [*args, "--resume", "latest"])
    log = (run_dir / "log.txt").read_text()
    assert "resumed from" in log and "step 18/18" in log
    assert re.search(r"resumed from .*step-0000000[89]: epoch 2 step [89] \(batch [12] of the epoch\)", log), log
    reference, resumed = exported(strategy_runs / "zero2"), exported(run_dir)
    assert reference.keys() == resumed.keys()
    assert all(torch.equal(reference[name], resumed[name]) for name in reference)
    steps = [step for step, _ in scalars(run_dir, "train/loss")]
    assert steps == list(range(1, 19))  # continuous: the resumed run logs where the killed one stopped
