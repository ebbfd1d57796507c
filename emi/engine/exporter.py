"""Exports: the model's full weights, written by the stage's export function into `<run>/<name>/` (rank 0), swapped
in whole, and published to `run.publish_to` (a URL or folder) when the config names one."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from emi import storage
from emi.engine.logging import RunLogger
from emi.errors import UsageError
from emi.io import replace_folder, write_json_atomic

ExportFn = Callable[[dict[str, torch.Tensor], Path], None]
TRAINER_FILE = "trainer.json"  # written last into an export: the step, epoch and metrics it was taken at


class Exporter:
    """`export(model, name, extra)`: every rank calls it (ZeRO-3 gathers the partitions); rank 0 writes."""

    def __init__(
        self,
        accelerator: Accelerator,
        export_fn: ExportFn | None,
        run_dir: Path,
        publish_to: str | None,
        enabled: bool,
        logger: RunLogger | None,
    ) -> None:
        self.accelerator, self.export_fn, self.run_dir = accelerator, export_fn, run_dir
        self.publish_to, self.enabled, self.logger = publish_to, enabled and export_fn is not None, logger

    def export(self, model: torch.nn.Module, name: str, extra: dict[str, Any]) -> None:
        if not self.enabled:
            return
        full_state = self.accelerator.get_state_dict(model)  # every rank: ZeRO-3 gathers the partitions here
        if self.accelerator.is_main_process:
            self._write(full_state, self.run_dir / name, extra)
        self.accelerator.wait_for_everyone()

    def _write(self, full_state: dict[str, torch.Tensor], folder: Path, extra: dict[str, Any]) -> None:
        """Rank 0: written aside and swapped in whole (a crash never leaves a half-written export), then published;
        a failed publication is logged and the next export publishes again."""
        tmp = folder.with_name(f".tmp-{folder.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        self.export_fn(full_state, tmp)
        write_json_atomic(tmp / TRAINER_FILE, extra)
        replace_folder(tmp, folder)
        if self.publish_to:
            target = storage.join(self.publish_to, folder.name)
            try:
                storage.upload_folder(folder, target, last=TRAINER_FILE)
            except (OSError, UsageError) as err:  # the local export stands
                self.logger.line(f"error: could not publish {folder} to {storage.shown(target)}: {err}")
