"""Distributed set-up: one Accelerator for every launcher (accelerate launch, torchrun, srun, plain python).

The run config's `train.strategy` is the single source of truth: `ddp`, or DeepSpeed ZeRO `zero2` / `zero3` built
here from the shipped `configs/deepspeed/<strategy>.json` (package data: `emi.configs`), so the same run behaves the
same whichever launcher started it. On machines without CUDA the process group uses gloo (DeepSpeed needs
DS_ACCELERATOR=cpu there).
"""
from __future__ import annotations

import json
import os
import socket
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DeepSpeedPlugin
from accelerate.utils import DistributedType, InitProcessGroupKwargs

from emi import configs as shipped_configs
from emi.config import TrainSection
from emi.errors import UsageError

DEEPSPEED_CONFIGS = Path(shipped_configs.__file__).parent / "deepspeed"


def resolve_mixed_precision(setting: str) -> str:
    if setting == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    return setting


def deepspeed_config(train: TrainSection, micro_batch_size: int) -> dict:
    path = Path(train.deepspeed_config) if train.deepspeed_config else DEEPSPEED_CONFIGS / f"{train.strategy}.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UsageError(f"DeepSpeed config {path}: {err}") from None
    # The trainer owns these numbers; DeepSpeed must agree with them exactly.
    config["train_micro_batch_size_per_gpu"] = micro_batch_size
    config["gradient_accumulation_steps"] = train.grad_accum
    config["gradient_clipping"] = train.clip_grad
    config.pop("train_batch_size", None)
    return config


def build_accelerator(train: TrainSection, micro_batch_size: int, project_dir: str | None = None) -> Accelerator:
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "gloo" and train.strategy != "ddp":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    plugin = None
    if train.strategy in ("zero2", "zero3"):
        if "WORLD_SIZE" not in os.environ:
            _single_process_group_env()  # plain `python train/...`: DeepSpeed still needs a process group
        plugin = DeepSpeedPlugin(hf_ds_config=deepspeed_config(train, micro_batch_size))
    accelerator = Accelerator(
        # accelerate only sets up CPU DDP (MULTI_CPU) when told cpu=True, and cpu=True would drop DeepSpeed.
        cpu=backend == "gloo" and plugin is None,
        mixed_precision=resolve_mixed_precision(train.mixed_precision),
        gradient_accumulation_steps=train.grad_accum,
        deepspeed_plugin=plugin,
        project_dir=project_dir,
        kwargs_handlers=[InitProcessGroupKwargs(backend=backend, timeout=timedelta(minutes=30))]
        if plugin is not None or int(os.environ.get("WORLD_SIZE", "1")) > 1 else [],
    )
    if plugin is not None:
        expected = (DistributedType.DEEPSPEED,)
    elif accelerator.num_processes > 1:
        expected = (DistributedType.MULTI_GPU, DistributedType.MULTI_CPU)
    else:
        expected = (DistributedType.NO,)
    if accelerator.distributed_type not in expected:
        raise RuntimeError(f"train.strategy={train.strategy} needs {[t.value for t in expected]} but accelerate set "
                           f"up {accelerator.distributed_type.value}")
    return accelerator


def _single_process_group_env() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def move_to_device(batch: dict[str, Any], device: torch.device, float_dtype: torch.dtype | None) -> dict[str, Any]:
    """Tensors to the device; floating inputs cast when DeepSpeed runs the model in bf16/fp16 (no autocast)."""
    moved = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if float_dtype is not None and value.is_floating_point() and key != "labels":
                value = value.to(float_dtype)
        moved[key] = value
    return moved


def input_dtype(accelerator: Accelerator) -> torch.dtype | None:
    """DeepSpeed runs the model itself in bf16/fp16 (no autocast), so floating inputs must match it."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)


def describe(accelerator: Accelerator) -> str:
    return (f"{accelerator.distributed_type.value} world={accelerator.num_processes} "
            f"rank={accelerator.process_index} device={accelerator.device} "
            f"precision={accelerator.mixed_precision}")
