"""Resuming a checkpoint on another number of processes than saved it (emi.engine.reshard, load_checkpoint), in real
launches of tests/reshard_worker.py: the weights and Adam moments loaded are the ones saved, and the next step on the
same global batch is the one the saving run took."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from emi.engine.checkpointer import checkpoints, resharded_seed, saved_processes
from emi.errors import UsageError
from emi.formats.checkpoint import CHECKSUM_FILE
from emi.io import file_problem

from helpers import REPO, cpu_env, launch_command

WORKER = "tests/reshard_worker.py"
SAVED_STEP = 3  # tests/reshard_worker.py's


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """launched(strategy, processes): what the worker wrote when `processes` resumed the run that 2 processes
    trained with `strategy` (processes=None: that training launch). Each launch runs once for the module."""
    root = tmp_path_factory.mktemp("reshard")
    results = {}

    def run(strategy: str, processes: int | None) -> dict:
        key = (strategy, processes)
        if key not in results:
            if processes is not None:
                run(strategy, None)  # the checkpoint to resume
            mode = "train" if processes is None else "resume"
            out = root / f"{strategy}-{mode}-{processes}.pt"
            args = [strategy, str(root / strategy), str(out), mode]
            command = launch_command(WORKER, args, processes or 2)
            if processes == 1 and strategy == "ddp":
                command = [sys.executable, str(REPO / WORKER), *args]  # one DDP process is a plain one
            result = subprocess.run(command, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=300)
            assert result.returncode == 0, f"{key} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
            results[key] = torch.load(out) | {"run_dir": root / strategy}
        return results[key]

    return run


def assert_states_close(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def assert_checkpoint_untouched(run_dir) -> None:
    """The conversion lives beside the checkpoint only while it loads; the checkpoint's files stay as recorded."""
    (checkpoint,) = checkpoints(run_dir)
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == [checkpoint.name]
    record = json.loads((checkpoint / CHECKSUM_FILE).read_text())["files"]
    assert [name for name, entry in record.items() if file_problem(checkpoint, name, entry)] == []
    assert {str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*") if p.is_file()} == {*record, CHECKSUM_FILE}


@pytest.mark.parametrize(("strategy", "processes"), [("zero2", 1), ("zero3", 3), ("ddp", 1)])
def test_a_checkpoint_of_two_processes_resumes_on_another_number(launched, strategy, processes):
    saved, resumed = launched(strategy, None), launched(strategy, processes)
    assert (saved_processes(checkpoints(saved["run_dir"])[0]), resumed["saved_processes"]) == (2, 2)
    assert_states_close(resumed["state"], saved["state"])
    torch.testing.assert_close(resumed["outputs"], saved["outputs"])  # the weights the model computes with too
    # The next step depends on the step count (Adam's bias correction) and both moments: it moves the weights far
    # more than the tolerance, and the same way in both worlds.
    moved = max((saved["next_state"][name] - saved["state"][name]).abs().max() for name in saved["state"])
    assert moved > 0.05
    assert_states_close(resumed["next_state"], saved["next_state"])
    # Each rank's torch RNG starts from (step, rank): the same resume on this world size draws the same.
    seeds = [torch.Generator().manual_seed(resharded_seed(SAVED_STEP, rank)) for rank in range(processes)]
    assert torch.equal(resumed["rng"], torch.stack([torch.rand(4, generator=seed) for seed in seeds]))
    assert_checkpoint_untouched(saved["run_dir"])


def test_a_same_size_resume_restores_exactly_what_was_saved(launched):
    saved, resumed = launched("zero3", None), launched("zero3", 2)
    assert all(torch.equal(resumed["state"][name], saved["state"][name]) for name in saved["state"])
    assert torch.equal(resumed["rng"], saved["rng"])  # every rank's own RNG state, restored
    assert_states_close(resumed["next_state"], saved["next_state"])
    assert_checkpoint_untouched(saved["run_dir"])


def test_a_checkpoint_that_cannot_be_converted_stops_every_rank_with_the_reason(launched, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(launched("zero2", None)["run_dir"], run_dir, symlinks=True)
    (checkpoint,) = checkpoints(run_dir)
    (checkpoint / "pytorch_model" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    command = launch_command(WORKER, ["zero2", str(run_dir), str(tmp_path / "out.pt"), "resume"], 3)
    result = subprocess.run(command, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    reason = f"UsageError: {checkpoint}: cannot convert its DeepSpeed partitions for 3 processes ("
    assert {rank for rank in range(3) if f"[rank{rank}]: emi.errors.{reason}" in result.stderr} == {0, 1, 2}
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == [checkpoint.name]


def test_saved_processes_refuses_a_folder_without_rng_states(tmp_path):
    with pytest.raises(UsageError, match=f"^{tmp_path}: no rng-rank\\*.safetensors files; not a checkpoint emi saved$"):
        saved_processes(tmp_path)
