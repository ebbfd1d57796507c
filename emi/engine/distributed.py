"""Distributed set-up: one Accelerator for every launcher (accelerate launch, torchrun, srun, plain python).

The run config's `train.strategy` is the single source of truth: `ddp`, or DeepSpeed ZeRO `zero2` / `zero3` built
here from the shipped `configs/deepspeed/<strategy>.json` (package data: `emi.configs`), so the same run behaves the
same whichever launcher started it. On machines without CUDA the process group uses gloo (DeepSpeed needs
DS_ACCELERATOR=cpu there).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import socket
import sys
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator, DeepSpeedPlugin
from accelerate.utils import DistributedType, InitProcessGroupKwargs

from emi import configs as shipped_configs
from emi.config import TrainSection
from emi.errors import UsageError

DEEPSPEED_CONFIGS = Path(shipped_configs.__file__).parent / "deepspeed"
SHM_OP = "deepspeed_shm_comm"  # DeepSpeed's shared-memory collectives on the CPU, built when it starts there


def build_deepspeed_cpu_ops() -> Path:
    """Build DeepSpeed's CPU communication op into `extensions_dir()` now (`make setup` does), not at the first
    training run; returns the folder."""
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    use_extensions_dir()
    ShareMemCommBuilder().load()
    return extensions_dir()


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


def extensions_dir() -> Path:
    """Where torch builds DeepSpeed's just-in-time ops for this Python environment (TORCH_EXTENSIONS_DIR when set):
    a folder per DeepSpeed install, torch and Python version. torch's default folder is shared by every environment
    of the user and holds one build of an op at a time, so two checkouts (or a checkout and an installed wheel)
    rebuilt DeepSpeed's CPU communication op for each other, minutes each time."""
    if "TORCH_EXTENSIONS_DIR" in os.environ:
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    installed = importlib.util.find_spec("deepspeed").origin  # without importing it: ddp runs never do
    environment = f"{installed}|{importlib.metadata.version('deepspeed')}|{torch.__version__}|{sys.version}"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "emi" / "torch_extensions" / hashlib.sha256(environment.encode()).hexdigest()[:16]


def use_extensions_dir() -> None:
    """Build and find DeepSpeed's ops in `extensions_dir()`; when its CPU communication op (which DeepSpeed builds as
    it starts on the CPU) is not built there yet, say so on one line: the build takes a minute or more, silently."""
    folder = extensions_dir()
    os.environ["TORCH_EXTENSIONS_DIR"] = str(folder)
    built = folder / SHM_OP / f"{SHM_OP}.so"
    if os.environ.get("DS_ACCELERATOR") == "cpu" and not built.exists() and os.environ.get("LOCAL_RANK", "0") == "0":
        print(
            f"emi: building DeepSpeed's CPU communication op {SHM_OP} for this Python environment, once (a minute "
            f"or more), in {folder}",
            file=sys.stderr,
            flush=True,
        )


def build_accelerator(train: TrainSection, micro_batch_size: int, project_dir: str | None = None) -> Accelerator:
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "gloo" and train.strategy != "ddp":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if train.strategy != "ddp":
        use_extensions_dir()
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
        if plugin is not None or int(os.environ.get("WORLD_SIZE", "1")) > 1
        else [],
    )
    if plugin is not None:
        expected = (DistributedType.DEEPSPEED,)
    elif accelerator.num_processes > 1:
        expected = (DistributedType.MULTI_GPU, DistributedType.MULTI_CPU)
    else:  # a launcher asked for one process may still set up a process group of one (accelerate launch does)
        expected = (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU)
    if accelerator.distributed_type not in expected:
        raise RuntimeError(
            f"train.strategy={train.strategy} needs {[t.value for t in expected]} but accelerate set "
            f"up {accelerator.distributed_type.value}"
        )
    return accelerator


def _single_process_group_env() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def input_dtype(accelerator: Accelerator) -> torch.dtype | None:
    """DeepSpeed runs the model itself in bf16/fp16 (no autocast), so floating inputs must match it."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)


def describe(accelerator: Accelerator) -> str:
    return (
        f"{accelerator.distributed_type.value} world={accelerator.num_processes} "
        f"rank={accelerator.process_index} device={accelerator.device} "
        f"precision={accelerator.mixed_precision}"
    )
