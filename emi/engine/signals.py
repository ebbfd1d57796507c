"""Stop requests from the scheduler: SIGUSR1 (Slurm's warning before the time limit) and SIGTERM (preemption,
`scontrol requeue`, `scancel`). The handler only sets a flag; the loop turns it into a checkpoint at the next step
boundary, agreed by every rank through one all-reduce so no rank is left waiting in a collective.
"""

from __future__ import annotations

import os
import signal
import subprocess

import torch
from accelerate import Accelerator

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopRequest:
    def __init__(self) -> None:
        self.signum: int | None = None
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.signum = signum

    def agreed(self, accelerator: Accelerator) -> int | None:
        """The signal any rank received (every rank must call this at the same step)."""
        flag = torch.tensor([self.signum or 0], device=accelerator.device)
        if accelerator.num_processes > 1:
            flag = accelerator.reduce(flag, reduction="max")
        return int(flag.item()) or None


class RequeueError(Exception):
    """`scontrol requeue` failed: the job will not restart by itself."""


def requeue_slurm_job() -> str | None:
    """On SIGUSR1 inside a Slurm batch job, put the job back in the queue; it resumes from the checkpoint.
    Returns the job id, or None where there is nothing to requeue: outside Slurm, and under submitit, whose own
    USR1 handler requeues the job (EMI_SLURM_REQUEUE=0 turns it off too). RequeueError with scontrol's message
    when scontrol fails.
    """
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id or os.environ.get("EMI_SLURM_REQUEUE", "1") == "0" or "SUBMITIT_FOLDER" in os.environ:
        return None
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise RequeueError(f"scontrol requeue {job_id}: {err}") from None
    if result.returncode != 0:
        message = (result.stderr or result.stdout).strip() or f"exit code {result.returncode}"
        raise RequeueError(f"scontrol requeue {job_id} failed: {message}")
    return job_id
