"""Resumable checkpoints and safetensors exports.

A checkpoint is a folder `<run>/checkpoints/step-00000123/` holding what `accelerator.save_state` writes (model and
optimizer, DeepSpeed's partitioned files under ZeRO, every rank's RNG states) plus `trainer_state.json` (epoch, step,
batches consumed in the epoch, best metric) and, when EMA is on, `ema.safetensors`. It is written under a temporary
name and renamed once complete, so a killed job never leaves a checkpoint that looks complete; `latest` is the
highest complete step. The folder is expected on storage every rank can see (a cluster's shared file system).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from emi.errors import UsageError
from emi.io import replace_folder, write_json_atomic

STATE_FILE = "trainer_state.json"
EMA_FILE = "ema.safetensors"
RNG_FILE = "rng-rank{rank}.safetensors"  # accelerate keeps only the main process's RNG state on each node


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps completed
    epoch: int = 0  # the epoch in progress
    batch_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    best_metric: float | None = None
    best_step: int | None = None


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def latest_checkpoint(run_dir: Path) -> Path | None:
    root = checkpoint_root(run_dir)
    complete = sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file()) if root.is_dir() else []
    return complete[-1] if complete else None


def resolve_resume(run_dir: Path, resume: str) -> Path | None:
    """`none` -> None; `latest` -> the newest complete checkpoint or None; anything else must be a checkpoint."""
    if resume == "none":
        return None
    if resume == "latest":
        return latest_checkpoint(run_dir)
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise UsageError(f"--resume {resume}: not a complete checkpoint folder (no {STATE_FILE})")
    return path


def save_checkpoint(accelerator: Accelerator, run_dir: Path, state: TrainerState, keep_last: int,
                    ema: dict[str, torch.Tensor] | None = None) -> Path:
    """Every rank calls this (DeepSpeed writes per-rank partitions); rank 0 commits by renaming."""
    root = checkpoint_root(run_dir)
    final = root / f"step-{state.step:08d}"
    tmp = root / f".tmp-step-{state.step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    save_file(_rng_state(), str(tmp / RNG_FILE.format(rank=accelerator.process_index)))
    if accelerator.is_main_process:
        if ema is not None:
            save_file({k: v.contiguous() for k, v in ema.items()}, str(tmp / EMA_FILE))
        write_json_atomic(tmp / STATE_FILE, asdict(state))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        replace_folder(tmp, final)
        prune_checkpoints(root, keep_last)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: Path) -> tuple[TrainerState, dict[str, torch.Tensor] | None]:
    """Every rank calls this after `accelerator.prepare`; restores model, optimizer and RNG states."""
    accelerator.load_state(str(path))
    rng_path = path / RNG_FILE.format(rank=accelerator.process_index)
    if not rng_path.is_file():
        raise UsageError(f"{path}: no RNG state for rank {accelerator.process_index}; was it saved with a "
                         "different number of processes?")
    _set_rng_state(load_file(str(rng_path)))
    state = TrainerState(**json.loads((path / STATE_FILE).read_text()))
    ema_path = path / EMA_FILE
    return state, (load_file(str(ema_path)) if ema_path.is_file() else None)


def remove_stale_temporaries(run_dir: Path) -> None:
    """A job killed while saving leaves `.tmp-step-*`; it was never committed, so it is safe to delete."""
    root = checkpoint_root(run_dir)
    for tmp in root.glob(".tmp-step-*") if root.is_dir() else []:
        shutil.rmtree(tmp, ignore_errors=True)


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def prune_checkpoints(root: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints (temporaries are remove_stale_temporaries')."""
    complete = sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file())
    for old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
