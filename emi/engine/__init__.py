"""The training machinery both stages share: distributed set-up, the loop, checkpoints, logging, signals."""

from emi.engine.distributed import build_accelerator
from emi.engine.loop import FitResult, Task, fit
from emi.engine.main import exit_code, run_stage

__all__ = ["FitResult", "Task", "build_accelerator", "exit_code", "fit", "run_stage"]
