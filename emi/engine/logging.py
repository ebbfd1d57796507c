"""Run logging: TensorBoard under `<run>/tb` and a concise console line. Created on rank 0 only, by the caller."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter


class RunLogger:
    def __init__(self, run_dir: Path) -> None:
        self.writer = SummaryWriter(log_dir=str(run_dir / "tb"))
        self.console = open(run_dir / "log.txt", "a", buffering=1)  # noqa: SIM115 (open for the whole run)

    def scalars(self, values: dict[str, float], step: int, prefix: str = "") -> None:
        for name, value in values.items():
            self.writer.add_scalar(prefix + name, value, step)
        self.writer.flush()

    def line(self, text: str) -> None:
        stamped = f"[{time.strftime('%H:%M:%S')}] {text}"
        print(stamped, file=sys.stderr, flush=True)
        self.console.write(stamped + "\n")

    def close(self) -> None:
        self.writer.close()
        self.console.close()


def format_scalars(values: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4g}" for k, v in values.items())
