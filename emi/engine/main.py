"""How every training entry point runs: its command line (emi.arguments.parse_run_args: `--config FILE
[--resume latest|PATH] [--trust-checkpoint] [key=value ...]`), the processes, the stage's task, the shared loop.

Usage errors (bad config, missing shards) exit with code 2 and one clear line; a run stopped by SIGUSR1/SIGTERM
exits 0 after its checkpoint, ready for `--resume latest`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from emi.arguments import parse_run_args, run_overrides
from emi.config import load_config
from emi.engine.distributed import build_accelerator
from emi.engine.loop import FitResult, Task, fit
from emi.engine.resize import launched_world_size, resized_config
from emi.errors import EXIT_NOT_FINISHED, EXIT_OK, EXIT_USAGE, UsageError

C = TypeVar("C")


def run_stage(
    schema: type[C],
    build_task: Callable[[C, Accelerator], Task],
    argv: list[str] | None,
    description: str,
    check: Callable[[C], None] = lambda config: None,
) -> FitResult | int:
    """Load the config and `check` it (the stage's own checks: its model's options), set up the processes, build
    the stage's task and hand it to the shared loop."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_run_args(argv, description=description)
    try:
        config: Any = load_config(schema, args.config, run_overrides(args))
        check(config)
        run_dir = Path(config.run.output_dir) / config.run.name
        config = resized_config(config, run_dir, launched_world_size())  # a resume on another number of processes
        accelerator = build_accelerator(config.train, config.data.batch_size)
        set_seed(config.run.seed)  # the same initial weights on every rank
        task = build_task(config, accelerator)
        torch.manual_seed(config.run.seed + accelerator.process_index)  # distinct dropout per rank
        return fit(task, accelerator, config, run_dir)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE


def exit_code(result: FitResult | int) -> int:
    """0 when the run ended or stopped at a checkpoint it will resume from; EXIT_NOT_FINISHED when Slurm did not
    requeue a stopped job, so the scheduler does not take it for finished."""
    if isinstance(result, int):
        return result
    return EXIT_NOT_FINISHED if result.requeue_failed else EXIT_OK
