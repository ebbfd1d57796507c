#!/usr/bin/env bash
# Per-task launcher shared by the sbatch scripts: `srun bash slurm/launch.sh ENTRY.py [ARGS...]`, or for a module
# `srun bash slurm/launch.sh -m MODULE [ARGS...]` (e.g. -m emi.cli features extract ...). It runs once per srun task
# and hands over to `python -m emi.cluster node`, which turns Slurm's view of the step into torch.distributed's
# rendezvous (the port and the launch command are defined there once, for these scripts and the submitit launcher):
#
# EMI_LAUNCH_MODE=accelerate (default) - srun --ntasks-per-node=1: one `accelerate launch` per node, which starts
#   the node's processes: EMI_PROCS_PER_NODE if set, else SLURM_GPUS_ON_NODE, else 1. Without
#   EMI_ACCELERATE_CONFIG it adds --multi_gpu for >1 processes (torchrun underneath; on CPU the code picks gloo);
#   with a config file (e.g. distributed_type: DEEPSPEED) the file chooses.
#   A bare `accelerate launch --num_processes 2` without GPUs starts ONE process: never rely on it.
# EMI_LAUNCH_MODE=srun - srun --ntasks-per-node=<GPUs per node>: each task is one training process;
#   SLURM_PROCID/SLURM_LOCALID/SLURM_STEP_NUM_TASKS become RANK/LOCAL_RANK/WORLD_SIZE and the entry point runs
#   directly (accelerate's Accelerator reads that env). Each task must see all of the node's GPUs (request
#   --gpus-per-node, no per-task GPU binding), since the process uses GPU LOCAL_RANK.
#
# Signals: the batch scripts use `#SBATCH --signal=USR1@120` (no "B:"), so Slurm signals every process of the
# job steps, the training processes included. With "B:" only the batch shell gets it; it sits in `srun` and
# the trainer never hears of it. The launcher replaces this shell (exec), so SIGTERM (time limit, scancel,
# scontrol requeue) reaches it and the trainer directly. In accelerate mode the launcher is torchrun, which dies
# on SIGUSR1 (and its step with it, killing the checkpointing trainer), so SIGUSR1 is ignored before it starts;
# the trainer installs its own handler, which replaces the inherited "ignore". On SIGTERM torchrun also forwards
# SIGTERM to its workers, so the trainer may get it twice (its handler is idempotent), and Slurm sends SIGKILL
# KillWait seconds (default 30) after SIGTERM.
#
# Env knobs: EMI_LAUNCH_MODE, EMI_PROCS_PER_NODE, EMI_ACCELERATE_CONFIG, EMI_MASTER_PORT (default: derived from the
# job id and restart count, emi.cluster.rendezvous_port), EMI_PYTHON (slurm/common.sh).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
exec "$(emi_python)" -m emi.cluster node -- "$@"
