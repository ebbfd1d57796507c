"""Loading a DeepSpeed ZeRO-2/3 checkpoint on a different number of processes than saved it.

ZeRO splits the fp32 master weights and Adam's moments (and, at stage 3, the parameters) over the data-parallel
ranks, and each rank's file holds only its own partition, so a new world size cannot read them as they are.
DeepSpeed's universal checkpoint is its own answer: `ds_to_universal` merges the partitions into one full tensor per
parameter and state (`zero/<param>/{fp32,exp_avg,exp_avg_sq}.pt`, the step and hyper-parameters in
`zero/optimizer_state.pt`), and an engine whose config says `load_universal` slices its own partitions out of them
as it loads, restoring step, moments, weights and the loss scaler at once. That loader is used rather than setting
the full tensors through the tensor-fragment API (`safe_set_full_*`), which has no way to set Adam's step and would
leave emi to reproduce DeepSpeed's optimizer bookkeeping. The engine's `load_universal` flag is set only for the
duration of this load: a flag in the run's DeepSpeed config would make every same-size resume convert too.

Rank 0 converts into `<checkpoints>/.universal-<checkpoint>/`, outside the checkpoint (whose files are verified
against its checkpoint.json), the other files of the checkpoint linked beside it so that `accelerator.load_state`
restores everything else as usual; the folder is removed once every rank has loaded. The conversion runs in rank
0's process and reads every partition: minutes for a large model, once per resume on a new world size.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from accelerate.utils.constants import MODEL_NAME

from emi.errors import UsageError


def universal_folder(path: Path) -> Path:
    """Where checkpoint `path` is converted to: beside it, hidden, so that no checkpoint listing sees it."""
    return path.parent / f".universal-{path.name}"


def load_resharded_deepspeed(accelerator: Accelerator, path: Path) -> None:
    """Every rank calls this: load DeepSpeed checkpoint `path`, saved by another number of processes."""
    universal = universal_folder(path)
    problem = _convert(path, universal) if accelerator.is_main_process else None
    problem = broadcast_object_list([problem])[0]  # every rank waits for the conversion, and fails with it
    if problem is not None:
        if accelerator.is_main_process:
            shutil.rmtree(universal, ignore_errors=True)
        raise UsageError(
            f"{path}: cannot convert its DeepSpeed partitions for {accelerator.num_processes} processes ({problem})"
        )
    engines = accelerator._models  # the prepared DeepSpeed engines, which accelerate.load_state loads
    configured = [engine._config.load_universal_checkpoint for engine in engines]
    try:
        for engine in engines:
            engine._config.load_universal_checkpoint = True
        accelerator.load_state(str(universal))
        for engine in engines:
            _repair_zero3_universal_load(engine, universal)
    finally:
        for engine, setting in zip(engines, configured, strict=True):
            engine._config.load_universal_checkpoint = setting
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(universal, ignore_errors=True)


def _repair_zero3_universal_load(engine, universal: Path) -> None:
    """Undo two slips of DeepSpeed's ZeRO-3 universal loader: it gives every parameter group the first group's
    hyper-parameters (its weight decay to the biases too), and one step tensor to them all, which each group's Adam
    step then advances in place, so the second group steps with a count one too high."""
    if engine.zero_optimization_stage() != 3:
        return
    adam = engine.optimizer.optimizer
    saved = torch.load(universal / MODEL_NAME / "zero" / "optimizer_state.pt", weights_only=False)  # DeepSpeed's
    for group, saved_group in zip(adam.param_groups, saved["param_groups"], strict=True):
        group.update({key: value for key, value in saved_group.items() if key != "params"})
    for state in adam.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def _convert(path: Path, universal: Path) -> str | None:
    """Write the universal form of checkpoint `path` to `universal` (each engine's folder of partitions converted,
    every other file linked); None, or why it failed."""
    from deepspeed.checkpoint import ds_to_universal

    shutil.rmtree(universal, ignore_errors=True)  # a conversion a killed job left behind
    universal.mkdir(parents=True)
    try:
        for entry in sorted(path.iterdir()):
            if entry.is_dir() and any(entry.glob("*_optim_states.pt")):
                ds_to_universal.main(_conversion_arguments(entry, universal / entry.name))
            else:
                (universal / entry.name).symlink_to(entry.resolve())
    except Exception as err:  # noqa: BLE001 - any failure is reported to every rank, which all stop with it
        return f"{type(err).__name__}: {err}"
    return None


def _conversion_arguments(partitions: Path, out: Path) -> argparse.Namespace:
    """ds_to_universal's command line, as its main() takes it."""
    return argparse.Namespace(
        input_folder=str(partitions),
        output_folder=str(out),
        num_extract_workers=1,  # in this process: no worker processes to start inside a training job
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # emi has no tensor parallelism to describe: the default info is right
    )
