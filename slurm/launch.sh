#!/usr/bin/env bash
# Per-task launcher shared by the sbatch scripts: `srun bash slurm/launch.sh ENTRY.py [ARGS...]`, or for a module
# `srun bash slurm/launch.sh -m MODULE [ARGS...]` (e.g. -m emi.cli features extract ...).
# It runs once per srun task and turns Slurm's view of the job into torch.distributed's rendezvous.
#
# EMI_LAUNCH_MODE=accelerate (default) - srun --ntasks-per-node=1: one `accelerate launch` per node, which starts
#   the node's processes: EMI_PROCS_PER_NODE if set, else SLURM_GPUS_ON_NODE, else 1. Without
#   EMI_ACCELERATE_CONFIG it adds --multi_gpu for >1 processes (torchrun underneath; on CPU the code picks gloo);
#   with a config file (e.g. distributed_type: DEEPSPEED) the file chooses. Checked on CPU with gloo, 2 nodes x 1
#   process and 1 node x 2 processes, both with --multi_gpu and with a DeepSpeed (ZeRO-2) config file.
#   A bare `accelerate launch --num_processes 2` without GPUs starts ONE process: never rely on it.
# EMI_LAUNCH_MODE=srun - srun --ntasks-per-node=<GPUs per node>: each task is one training process;
#   SLURM_PROCID/SLURM_LOCALID/SLURM_STEP_NUM_TASKS become RANK/LOCAL_RANK/WORLD_SIZE and the entry point runs
#   directly (accelerate's Accelerator reads that env). Each task must see all of the node's GPUs (request
#   --gpus-per-node, no per-task GPU binding), since the process uses GPU LOCAL_RANK.
#
# Signals: the batch scripts use `#SBATCH --signal=USR1@120` (no "B:"), so Slurm signals every process of the
# job steps, the training processes included. With "B:" only the batch shell gets it; it sits in `srun` and
# the trainer never hears of it. This script execs into its launcher, so SIGTERM (time limit, scancel,
# scontrol requeue) reaches the launcher and the trainer directly. In accelerate mode the launcher is torchrun,
# which dies on SIGUSR1 (and its step with it, killing the checkpointing trainer), so SIGUSR1 is ignored here
# before exec; the trainer installs its own handler, which replaces the inherited "ignore". On SIGTERM torchrun
# also forwards SIGTERM to its workers, so the trainer may get it twice (its handler must be idempotent), and
# Slurm sends SIGKILL KillWait seconds (default 30) after SIGTERM.
#
# Env knobs: EMI_LAUNCH_MODE, EMI_PROCS_PER_NODE, EMI_ACCELERATE_CONFIG, EMI_MASTER_PORT (default: derived from
# the job id and restart count), EMI_PYTHON (default: the repo's .venv, else python3 on PATH).
set -euo pipefail

die() {
    echo "slurm/launch.sh: $*" >&2
    exit 2
}

[[ $# -ge 1 ]] || die "usage: srun bash slurm/launch.sh ENTRY.py [ARGS...], or -m MODULE [ARGS...]"
if [[ $1 == -m ]]; then # a module, as `python -m` (accelerate launch takes the same flag)
    [[ $# -ge 2 ]] || die "usage: srun bash slurm/launch.sh -m MODULE [ARGS...]"
    entry=(-m "$2")
    shift 2
else
    entry=("$1")
    shift
    [[ -f ${entry[0]} ]] || die "entry point '${entry[0]}': no such file (paths are relative to $(pwd))"
fi
for var in SLURM_JOB_ID SLURM_STEP_NODELIST SLURM_STEP_NUM_NODES SLURM_STEP_NUM_TASKS SLURM_NODEID SLURM_PROCID \
    SLURM_LOCALID; do
    [[ -n ${!var:-} ]] || die "$var is not set: run this through srun inside a Slurm job, not from the batch shell"
done

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -n ${EMI_PYTHON:-} ]]; then
    python=$EMI_PYTHON
elif [[ -x $repo/.venv/bin/python ]]; then
    python=$repo/.venv/bin/python
else
    python=python3
fi

# No visible GPU: DeepSpeed must use its CPU accelerator (the Python side picks gloo).
if [[ ${CUDA_VISIBLE_DEVICES-unset} == "" ]] || ! nvidia-smi -L >/dev/null 2>&1; then
    export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# Rank 0 lives on the step's first node. Cluster hostnames normally resolve; where they do not (the local
# test cluster's n1, n2), ask Slurm for the node's address.
mapfile -t step_nodes < <(scontrol show hostnames "$SLURM_STEP_NODELIST")
[[ ${#step_nodes[@]} -ge 1 ]] || die "cannot expand SLURM_STEP_NODELIST='$SLURM_STEP_NODELIST' with scontrol"
master_addr=${step_nodes[0]}
if ! getent hosts "$master_addr" >/dev/null; then
    master_addr=$(scontrol show node -o "${step_nodes[0]}" | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
    [[ -n $master_addr ]] || die "node ${step_nodes[0]} does not resolve and scontrol shows no NodeAddr for it"
fi
# Concurrent jobs and a requeued run of the same job (same id) must not meet on one port. 20000-31999 stays
# below Linux's ephemeral range (32768+), where outgoing connections could already hold the port.
restart_count=${SLURM_RESTART_COUNT:-0}
master_port=${EMI_MASTER_PORT:-$((20000 + (SLURM_JOB_ID * 10 + restart_count % 10) % 12000))}

mode=${EMI_LAUNCH_MODE:-accelerate}
case $mode in
accelerate)
    num_nodes=$SLURM_STEP_NUM_NODES
    ((SLURM_STEP_NUM_TASKS == num_nodes)) ||
        die "accelerate mode starts one launcher per node: use srun --ntasks-per-node=1" \
            "(this step has $SLURM_STEP_NUM_TASKS tasks on $num_nodes nodes), or EMI_LAUNCH_MODE=srun"
    if [[ -n ${EMI_PROCS_PER_NODE:-} ]]; then
        [[ $EMI_PROCS_PER_NODE =~ ^[1-9][0-9]*$ ]] ||
            die "EMI_PROCS_PER_NODE='$EMI_PROCS_PER_NODE' is not a positive integer"
        procs_per_node=$EMI_PROCS_PER_NODE
    elif [[ ${SLURM_GPUS_ON_NODE:-0} =~ ^[1-9][0-9]*$ ]]; then
        procs_per_node=$SLURM_GPUS_ON_NODE
    else
        procs_per_node=1
    fi
    num_processes=$((num_nodes * procs_per_node))
    args=(--num_machines "$num_nodes" --machine_rank "$SLURM_NODEID" --num_processes "$num_processes"
        --main_process_ip "$master_addr" --main_process_port "$master_port" --rdzv_backend static
        # srun already started one launcher per node: DeepSpeed must not ssh/pdsh to the others.
        --deepspeed_multinode_launcher standard)
    if [[ -n ${EMI_ACCELERATE_CONFIG:-} ]]; then
        [[ -f $EMI_ACCELERATE_CONFIG ]] || die "EMI_ACCELERATE_CONFIG=$EMI_ACCELERATE_CONFIG: no such file"
        args+=(--config_file "$EMI_ACCELERATE_CONFIG")
    elif ((num_processes > 1)); then
        args+=(--multi_gpu)
    fi
    trap '' USR1
    exec "$python" -m accelerate.commands.launch "${args[@]}" "${entry[@]}" "$@"
    ;;
srun)
    export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_STEP_NUM_TASKS
    export MASTER_ADDR=$master_addr MASTER_PORT=$master_port
    exec "$python" "${entry[@]}" "$@"
    ;;
*)
    die "EMI_LAUNCH_MODE='$mode' is not one of: accelerate, srun"
    ;;
esac
