"""The engine's small parts on their own: the SGDR schedule, EMA, optimizer groups, checkpoint pruning, verification
and fallback, folder swaps, the run command line, the evaluation collector, step telemetry, and what a failed Slurm
requeue does."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import signal
import stat
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from emi.arguments import parse_run_args, run_overrides
from emi.config import OptimSection, TrainSection
from emi.data.collect import collect, evaluation_batches
from emi.engine.checkpointer import checkpoints, load_checkpoint, prune_checkpoints, resolve_resume, save_checkpoint
from emi.engine.distributed import build_accelerator, extensions_dir
from emi.engine.ema import EMA
from emi.engine.loop import FitResult
from emi.engine.main import exit_code
from emi.engine.optim import build_optimizer, sgdr_lr
from emi.engine.signals import RequeueError, requeue_slurm_job
from emi.engine.telemetry import StepClock, peak_flops, step_scalars
from emi.errors import EXIT_NOT_FINISHED, UsageError
from emi.formats.checkpoint import CHECKSUM_FILE, STATE_FILE, TrainerState
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


def test_pruning_keeps_the_newest_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (5, 10, 15, 20):
        (root / f"step-{step:08d}").mkdir(parents=True)
    (root / ".tmp-step-00000025").mkdir()  # a save in progress: remove_stale_temporaries' business, not pruning's
    (root / "damaged-step-00000030").mkdir()  # moved aside by a resume: kept for inspection
    prune_checkpoints(root, keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == [
        ".tmp-step-00000025",
        "damaged-step-00000030",
        "step-00000015",
        "step-00000020",
    ]
    assert checkpoints(tmp_path) == [root / "step-00000015", root / "step-00000020"]


@pytest.fixture(scope="module")
def trainer():
    """One process's accelerator, a small model and its optimizer, prepared as the loop prepares them."""
    accelerator = build_accelerator(TrainSection(), micro_batch_size=1)
    model = torch.nn.Linear(4, 3)
    model, optimizer = accelerator.prepare(model, build_optimizer(model, OptimSection()))
    return accelerator, model


def saved_run(tmp_path, accelerator, steps, run_id="run-a"):
    run_dir = tmp_path / "run"
    for step in steps:
        save_checkpoint(accelerator, run_dir, TrainerState(step=step, epoch=step // 2), keep_last=10, run_id=run_id)
    return run_dir


def test_checkpoints_record_and_verify_every_file(trainer, tmp_path):
    accelerator, model = trainer
    run_dir = saved_run(tmp_path, accelerator, [4])
    folder = run_dir / "checkpoints" / "step-00000004"
    recorded = json.loads((folder / CHECKSUM_FILE).read_text())
    assert recorded["run_id"] == "run-a"
    assert sorted(recorded["files"]) == sorted(p.name for p in folder.iterdir() if p.name != CHECKSUM_FILE)
    assert recorded["files"][STATE_FILE]["bytes"] == (folder / STATE_FILE).stat().st_size
    assert resolve_resume(accelerator, run_dir, "latest", "run-a", trust=False) == (folder, [])
    state, _ = load_checkpoint(accelerator, folder)
    assert (state.step, state.epoch) == (4, 2)


def test_resume_latest_skips_damaged_checkpoints_loudly(trainer, tmp_path):
    accelerator, _ = trainer
    run_dir = saved_run(tmp_path, accelerator, [2, 4, 6])
    root = run_dir / "checkpoints"
    weights, state = root / "step-00000006" / "model.safetensors", root / "step-00000004" / STATE_FILE
    sizes = weights.stat().st_size, state.stat().st_size
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    state.write_text(state.read_text()[:10])  # half-written
    found, warnings = resolve_resume(accelerator, run_dir, "latest", "run-a", trust=False)
    assert found == root / "step-00000002"
    assert warnings == [
        f"checkpoint {root / 'step-00000006'} is damaged (model.safetensors: 100 bytes, {sizes[0]} when written); "
        "moved aside to damaged-step-00000006",
        f"checkpoint {root / 'step-00000004'} is damaged ({STATE_FILE}: 10 bytes, {sizes[1]} when written); "
        "moved aside to damaged-step-00000004",
    ]
    assert checkpoints(run_dir) == [root / "step-00000002"]  # pruning can no longer prefer the damaged ones
    assert (root / "damaged-step-00000006" / "model.safetensors").stat().st_size == 100  # kept for inspection


def test_same_size_damage_and_a_lost_checksum_record_are_caught(trainer, tmp_path):
    accelerator, _ = trainer
    run_dir = saved_run(tmp_path, accelerator, [2, 4])
    root = run_dir / "checkpoints"
    weights = root / "step-00000004" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit: same size
    weights.write_bytes(bytes(data))
    with pytest.raises(
        UsageError,
        match=re.escape(
            f"--resume {root / 'step-00000004'}: the checkpoint is damaged (model.safetensors: its sha256 differs"
        ),
    ):
        resolve_resume(accelerator, run_dir, str(root / "step-00000004"), "run-a", trust=False)
    (root / "step-00000002" / CHECKSUM_FILE).unlink()
    with pytest.raises(UsageError) as error:
        resolve_resume(accelerator, run_dir, "latest", "run-a", trust=False)
    assert str(error.value) == (
        f"no intact checkpoint to resume from in {root}: step-00000004 is damaged (model.safetensors: its sha256 "
        f"differs from when it was written); step-00000002 is damaged (no {CHECKSUM_FILE}: written by an older emi "
        "or another program)"
    )
    assert checkpoints(run_dir) == [root / "step-00000002", root / "step-00000004"]  # nothing moved: nothing to use


def test_a_checkpoint_another_run_wrote_loads_only_when_trusted(trainer, tmp_path):
    accelerator, _ = trainer
    run_dir = saved_run(tmp_path, accelerator, [3], run_id="someone-else")
    folder = run_dir / "checkpoints" / "step-00000003"
    with pytest.raises(
        UsageError,
        match=re.escape(
            f"{folder} was written by run someone-else, not by this run (run-a, in its run.json). Resuming runs "
            "DeepSpeed's checkpoint loader, which unpickles"
        )
        + ".*--trust-checkpoint",
    ):
        resolve_resume(accelerator, run_dir, str(folder), "run-a", trust=False)
    with pytest.raises(
        UsageError,
        match=re.escape(
            f"no intact checkpoint to resume from in {folder.parent}: step-00000003 is another run's (written by "
            "run someone-else, not by this run run-a; --trust-checkpoint resumes it anyway)"
        ),
    ):
        resolve_resume(accelerator, run_dir, "latest", "run-a", trust=False)
    for resume in ("latest", str(folder)):
        assert resolve_resume(accelerator, run_dir, resume, "run-a", trust=True) == (folder, [])


def test_latest_skips_a_checkpoint_of_another_run_or_with_a_malformed_record(trainer, tmp_path):
    """One changed character in the newest checkpoint's run id, a file record without its keys in the next: both
    are skipped and named, moved aside like damaged ones, and the newest intact checkpoint of this run is resumed."""
    accelerator, _ = trainer
    run_dir = saved_run(tmp_path, accelerator, [2, 4, 6, 8])
    root = run_dir / "checkpoints"
    record = json.loads((root / "step-00000008" / CHECKSUM_FILE).read_text())
    (root / "step-00000008" / CHECKSUM_FILE).write_text(json.dumps({**record, "run_id": "run-b"}))
    for step, malformed in ((6, {"size": 1}), (4, "a string")):
        record = json.loads((root / f"step-0000000{step}" / CHECKSUM_FILE).read_text())
        record["files"][STATE_FILE] = malformed
        (root / f"step-0000000{step}" / CHECKSUM_FILE).write_text(json.dumps(record))
    found, warnings = resolve_resume(accelerator, run_dir, "latest", "run-a", trust=False)
    assert found == root / "step-00000002"
    assert warnings == [
        f"checkpoint {root / 'step-00000008'} is another run's (written by run run-b, not by this run run-a; "
        "--trust-checkpoint resumes it anyway); moved aside to damaged-step-00000008",
        f"checkpoint {root / 'step-00000006'} is damaged ({CHECKSUM_FILE}: file {STATE_FILE!r} has a malformed "
        "record {'size': 1}); moved aside to damaged-step-00000006",
        f"checkpoint {root / 'step-00000004'} is damaged ({CHECKSUM_FILE}: file {STATE_FILE!r} has a malformed "
        "record 'a string'); moved aside to damaged-step-00000004",
    ]
    assert checkpoints(run_dir) == [root / "step-00000002"]


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
    args = parse_run_args(["train.epochs=2", "--resume", "latest", "data.batch_size=4", "--config", "c.yaml"])
    assert (args.config, args.resume, args.overrides) == ("c.yaml", "latest", ["train.epochs=2", "data.batch_size=4"])
    assert not args.trust_checkpoint
    assert run_overrides(args) == ["train.epochs=2", "data.batch_size=4", "train.resume=latest"]
    trusted = parse_run_args(["--config", "c.yaml", "a=1", "--trust-checkpoint", "b=2"])
    assert run_overrides(trusted) == ["a=1", "b=2", "train.trust_checkpoint=true"]


class FakeData:
    """What the collector needs of a DataInfo: two batches, the second wrapping around to repeat 'a', then 'c'."""

    def __init__(self):
        self.epochs = []
        self.dataloader = [
            {"key": ["a", "b"], "x": torch.tensor([1.0, 2.0])},
            {"key": ["c", "a", "c"], "x": torch.tensor([3.0, 1.0, 3.0])},
        ]

    def set_epoch(self, epoch, skip_batches=0):
        self.epochs.append(epoch)


def test_the_collector_sees_each_sample_once_without_gradients():
    data = FakeData()
    assert [fresh for _, fresh in evaluation_batches(data, "cpu")] == [[True, True], [True, False, False]]
    weight = torch.ones(1, requires_grad=True)
    keys, out = collect(
        data,
        lambda batch: {"y": batch["x"] * weight, "grad": torch.tensor([torch.is_grad_enabled()] * len(batch["key"]))},
    )
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
    args = [
        "--config",
        "configs/stage1/tiny.yaml",
        f"data.train={synthetic_shards['train']}",
        "data.val=null",
        f"run.output_dir={tmp_path}",
        "run.name=requeue",
        "data.batch_size=4",
        "train.strategy=ddp",
        "train.epochs=50",
        "train.log_every=1",
    ]
    env = cpu_env(SLURM_JOB_ID="4242", PATH=f"{failing_scontrol}{os.pathsep}{os.environ['PATH']}")
    env.pop("SUBMITIT_FOLDER", None)
    job = subprocess.Popen(
        [sys.executable, "-m", "emi.stages.stage1", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
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
    assert checkpoints(tmp_path / "requeue")


def test_the_step_clock_splits_a_window_into_data_wait_and_compute():
    now = [100.0]  # a clock the test moves: the loader waits 0.05 s per batch, each step computes 0.02 s

    def slow_loader():
        for item in range(3):
            now[0] += 0.05
            yield item

    clock = StepClock(torch.device("cpu"), now=lambda: now[0])
    for _ in clock.batches(slow_loader()):
        now[0] += 0.02
    with clock.paused():  # a checkpoint: not part of any step
        now[0] += 0.5
    elapsed, data_wait = clock.close_window()
    assert data_wait == pytest.approx(0.15) and elapsed == pytest.approx(0.21)
    values = step_scalars(
        elapsed,
        data_wait,
        steps=3,
        samples=12,
        train_flops_per_sample=1e9,
        device=torch.device("cpu"),
        precision="no",
        world_size=2,
    )
    assert values["step_s"] == pytest.approx(0.07) and values["samples_per_s"] == pytest.approx(12 / 0.21)
    assert values["data_wait_s"] == pytest.approx(0.05) and values["compute_s"] == pytest.approx(0.02)
    assert values["data_wait_share"] == pytest.approx(0.15 / 0.21)
    assert values["tflops_per_device"] == pytest.approx(1e9 * 6 / 0.21 / 1e12)  # 6 samples per device
    assert "mfu" not in values and "peak_memory_gib" not in values  # no known peak, no GPU
    assert clock.close_window() == (0.0, 0.0)  # a new window


def test_peak_flops_by_device_name_and_precision():
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert peak_flops("NVIDIA H100 PCIe", "bf16") == 756e12
    assert peak_flops("NVIDIA H200", "fp16") == 989e12
    assert peak_flops("NVIDIA H200", "no") is None  # fp32 has another peak
    assert peak_flops("Some GPU", "bf16") is None and peak_flops("cpu", "bf16") is None


def test_deepspeed_ops_are_built_in_a_folder_of_the_python_environment(monkeypatch, tmp_path):
    """Two environments (checkouts, a wheel) never share the folder torch builds DeepSpeed's ops in: it held one
    build at a time, and they rebuilt the CPU communication op for each other."""
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    here = extensions_dir()
    assert here.parent == tmp_path / "emi" / "torch_extensions" and here == extensions_dir()
    elsewhere = types.SimpleNamespace(origin="/another/venv/site-packages/deepspeed/__init__.py")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: elsewhere)
    assert extensions_dir().parent == here.parent and extensions_dir() != here
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "mine"))  # the user's choice stands
    assert extensions_dir() == tmp_path / "mine"
