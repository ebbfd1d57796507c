"""The engine's small parts on their own: the SGDR schedule, EMA, optimizer groups, checkpoint pruning and folder
swaps, the run command line, the evaluation collector, and what a failed Slurm requeue does."""
from __future__ import annotations

import math
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from emi.config import OptimSection
from emi.engine.checkpoint import STATE_FILE, latest_checkpoint, prune_checkpoints
from emi.engine.ema import EMA
from emi.engine.evaluation import collect, evaluation_batches
from emi.engine.loop import FitResult, TrainerState
from emi.engine.main import exit_code, parse_run_args
from emi.engine.optim import build_optimizer, sgdr_lr
from emi.engine.signals import RequeueError, requeue_slurm_job
from emi.errors import EXIT_NOT_FINISHED
from emi.io import replace_folder
from helpers import REPO, cpu_env


def test_sgdr_restarts_every_cycle_and_keeps_to_its_bounds():
    optim = OptimSection(lr=1e-3, min_lr=1e-5, restart_epochs=2.0, warmup_steps=0)
    steps_per_epoch = 5  # cycles of 10 steps
    lrs = [sgdr_lr(step, optim, steps_per_epoch) for step in range(30)]
    assert [step for step in range(30) if lrs[step] == optim.lr] == [0, 10, 20]  # the restart points
    assert lrs[5] == pytest.approx(optim.min_lr + 0.5 * (optim.lr - optim.min_lr))  # half way down the cosine
    assert lrs[9] == pytest.approx(optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1 + math.cos(math.pi * 0.9)))
    assert all(a > b for a, b in zip(lrs[:9], lrs[1:10]))  # strictly falling within a cycle
    assert min(lrs) > optim.min_lr and max(lrs) == optim.lr


def test_sgdr_warms_up_linearly_before_the_first_cycle():
    optim = OptimSection(lr=1e-3, min_lr=0.0, restart_epochs=1.0, warmup_steps=4)
    assert [sgdr_lr(step, optim, 8) for step in range(5)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])
    assert sgdr_lr(4 + 8, optim, 8) == optim.lr  # cycles count from the end of the warm-up


def test_ema_warms_up_then_uses_its_decay_and_resumes_exactly():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    ema = EMA(model, decay=0.9)
    assert ema.current_decay() == pytest.approx(2 / 11)  # (1 + n) / (10 + n) for the first update, n = 1
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)
    assert torch.allclose(ema.shadow["weight"], torch.full((1, 2), 1 - 2 / 11))
    for _ in range(77):
        ema.update(model)
    assert ema.current_decay() == pytest.approx(80 / 89)  # update n = 79 still warms up: (1 + n) / (10 + n) < 0.9
    ema.update(model)
    assert ema.current_decay() == pytest.approx(0.9)  # from n = 80 on: (1 + n) / (10 + n) >= 0.9
    restored = EMA(model, decay=0.9)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 79 and torch.equal(restored.shadow["weight"], ema.shadow["weight"])
    with restored.applied(model):
        assert torch.equal(model.weight, ema.shadow["weight"])
    assert torch.equal(model.weight, torch.ones(1, 2))  # the training weights come back


def test_optimizer_groups_exempt_vectors_and_logit_scales_from_weight_decay():
    model = torch.nn.ModuleDict({"proj": torch.nn.Linear(4, 8), "norm": torch.nn.LayerNorm(8)})
    model.logit_scale = torch.nn.Parameter(torch.ones(1))
    frozen = torch.nn.Linear(2, 2)
    frozen.requires_grad_(False)
    model["frozen"] = frozen
    optimizer = build_optimizer(model, OptimSection(weight_decay=0.1))
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and [p.shape for p in decay["params"]] == [torch.Size([8, 4])]
    assert no_decay["weight_decay"] == 0.0
    # 1-D tensors; the logit scale comes first in the model but, not a multiple of 8 elements, last here
    assert list(dict(model.named_parameters()))[0] == "logit_scale"
    assert [tuple(p.shape) for p in no_decay["params"]] == [(8,), (8,), (8,), (1,)]
    assert no_decay["params"][-1] is model.logit_scale


def test_pruning_keeps_the_newest_complete_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (5, 10, 15, 20):
        (root / f"step-{step:08d}").mkdir(parents=True)
        (root / f"step-{step:08d}" / STATE_FILE).write_text("{}")
    (root / "step-00000025").mkdir()  # no state file: not a complete checkpoint, never counted or pruned here
    prune_checkpoints(root, keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000015", "step-00000020", "step-00000025"]
    assert latest_checkpoint(tmp_path) == root / "step-00000020"


def test_replace_folder_swaps_in_a_complete_folder(tmp_path):
    final, tmp = tmp_path / "best", tmp_path / ".tmp-best"
    final.mkdir()
    (final / "old.txt").write_text("old")
    tmp.mkdir()
    (tmp / "new.txt").write_text("new")
    replace_folder(tmp, final)
    assert [p.name for p in final.iterdir()] == ["new.txt"] and not tmp.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_run_options_may_stand_anywhere_among_the_overrides():
    args = parse_run_args(["train.epochs=2", "--resume", "latest", "data.batch_size=4", "--config", "c.yaml"], "x")
    assert (args.config, args.resume, args.overrides) == ("c.yaml", "latest", ["train.epochs=2", "data.batch_size=4"])


class FakeData:
    """What the collector needs of a DataInfo: two batches, the second wrapping around to repeat 'a', then 'c'."""

    def __init__(self):
        self.epochs = []
        self.dataloader = [{"key": ["a", "b"], "x": torch.tensor([1.0, 2.0])},
                           {"key": ["c", "a", "c"], "x": torch.tensor([3.0, 1.0, 3.0])}]

    def set_epoch(self, epoch, skip_batches=0):
        self.epochs.append(epoch)


def test_the_collector_sees_each_sample_once_without_gradients():
    data = FakeData()
    assert [fresh for _, fresh in evaluation_batches(data, "cpu")] == [[True, True], [True, False, False]]
    weight = torch.ones(1, requires_grad=True)
    keys, out = collect(data, lambda batch: {"y": batch["x"] * weight, "grad": torch.tensor(
        [torch.is_grad_enabled()] * len(batch["key"]))})
    assert keys == ["a", "b", "c"] and out["y"].tolist() == [1.0, 2.0, 3.0]
    assert not out["grad"].any() and not out["y"].requires_grad
    assert data.epochs == [0, 0]


@pytest.fixture
def failing_scontrol(tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "scontrol"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'scontrol: error: Invalid job id specified' >&2\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    return fake.parent


def test_a_failed_requeue_says_scontrols_message(failing_scontrol, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("SUBMITIT_FOLDER", raising=False)
    monkeypatch.delenv("EMI_SLURM_REQUEUE", raising=False)
    with pytest.raises(RequeueError, match=r"scontrol requeue 4242 failed: scontrol: error: Invalid job id"):
        requeue_slurm_job()
    monkeypatch.delenv("SLURM_JOB_ID")
    assert requeue_slurm_job() is None  # outside Slurm there is nothing to requeue
    stopped = FitResult(TrainerState(), signal.SIGUSR1, Path("."), {}, requeue_failed=True)
    assert exit_code(stopped) == EXIT_NOT_FINISHED


def test_a_trainer_whose_requeue_fails_exits_with_not_finished(failing_scontrol, synthetic_shards, tmp_path):
    """SIGUSR1 (the time limit) inside a Slurm job whose requeue fails: checkpoint, log scontrol's message, exit 75."""
    args = ["--config", "configs/stage1/tiny.yaml", f"data.train={synthetic_shards['train']}", "data.val=null",
            f"run.output_dir={tmp_path}", "run.name=requeue", "data.batch_size=4", "train.strategy=ddp",
            "train.epochs=50", "train.log_every=1"]
    env = cpu_env(SLURM_JOB_ID="4242", PATH=f"{failing_scontrol}{os.pathsep}{os.environ['PATH']}")
    env.pop("SUBMITIT_FOLDER", None)
    job = subprocess.Popen([sys.executable, "-m", "emi.stages.stage1", *args], cwd=REPO, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "requeue" / "log.txt"
    deadline = time.monotonic() + 300
    while not (log.is_file() and "step 2/" in log.read_text()):
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()[1][-3000:]
        time.sleep(0.5)
    job.send_signal(signal.SIGUSR1)
    _, stderr = job.communicate(timeout=300)
    text = log.read_text()
    assert job.returncode == EXIT_NOT_FINISHED, stderr[-3000:]
    assert "scontrol requeue 4242 failed: scontrol: error: Invalid job id specified" in text
    assert "will not restart by itself" in text
    assert latest_checkpoint(tmp_path / "requeue") is not None
