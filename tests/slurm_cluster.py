"""The local two-node Slurm cluster the slurm tests run on (slurm/local/up.sh, down.sh): its environment, its
scripts, and reading a job's fields. The module-scoped fixtures `slurm_root` and `cluster` are in conftest.py."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO

UP = REPO / "slurm" / "local" / "up.sh"
DOWN = REPO / "slurm" / "local" / "down.sh"
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def clean_env() -> dict[str, str]:
    """This environment without Slurm job variables (pytest itself may run inside a job) or launcher settings,
    and with python from this venv."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "EMI_"))}
    return env | {"EMI_PYTHON": sys.executable}


def require_slurm() -> None:
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster runs its daemons as root: run the slurm tests as root")
    missing = [p for p in ("munged", "mungekey", "slurmctld", "slurmd", "sbatch") if shutil.which(p) is None]
    if missing:
        pytest.skip(f"slurm-wlm/munge not installed ({', '.join(missing)} not found): run `make setup`")


def free_port_block() -> int:
    """A port p with p, p+1, p+2 free: slurmctld gets p, the two slurmd nodes p+1 and p+2."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        try:
            for port in (base + 1, base + 2):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no three consecutive free TCP ports found")


def cluster_env(state_dir: Path) -> dict[str, str]:
    port = free_port_block()
    return clean_env() | {
        "EMI_SLURM_DIR": str(state_dir),
        "EMI_SLURMCTLD_PORT": str(port),
        "EMI_SLURMD_PORT": str(port + 1),
        "SLURM_CONF": str(state_dir / "slurm.conf"),
    }


def run_script(script: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=120)


def job_field(env: dict[str, str], job_id: int, field: str) -> str:
    shown = subprocess.run(
        ["scontrol", "show", "job", "-o", str(job_id)], env=env, capture_output=True, text=True, timeout=30
    )
    assert shown.returncode == 0, f"scontrol show job {job_id} failed ({shown.returncode}): {shown.stderr}"
    shown = shown.stdout
    match = re.search(rf"\b{field}=(\S*)", shown)
    assert match, f"scontrol shows no {field} for job {job_id}: {shown}"
    return match.group(1)
