# Sourced by the batch scripts slurm/stage1.sh, slurm/stage2.sh and slurm/features.sh inside the job. It picks the
# job step's task layout for the launch mode and starts slurm/launch.sh on every node:
#
#   EMI_CONFIG=configs/stage1/tiny.yaml sbatch --nodes 2 slurm/stage1.sh train.epochs=3
#   EMI_LAUNCH_MODE=srun sbatch --nodes 4 --gpus-per-node 8 slurm/stage2.sh
#   sbatch slurm/features.sh --encoders runs/stage1-vitl/export --shards data/shards/train --out data/features/train
#
# Submit from the repository root (or pass --chdir=REPO): sbatch runs a copy of the script from the job's working
# directory, so slurm/, train/, configs/, logs/ and the config's relative paths (runs/, data/) resolve there.
# logs/ must exist before the job starts (Slurm opens logs/%x-%j.out first): mkdir -p logs.
#
# The allocation is one task per node holding all the node's CPUs and GPUs (the #SBATCH headers; override any of
# them on the sbatch command line: --nodes, --gpus-per-node, --cpus-per-task, --time, --partition, --job-name).
# EMI_LAUNCH_MODE picks how the step uses it (see slurm/launch.sh):
#   accelerate (default): srun --ntasks-per-node=1, one `accelerate launch` per node starting the node's processes.
#   srun: srun --ntasks-per-node=<processes per node>, one training process per task, CPUs split between them.
# Processes per node: EMI_PROCS_PER_NODE, else the GPUs per node, else 1 (a CPU-only cluster runs gloo).
#
# Preemption and time limits: the scripts carry --requeue and --signal=USR1@120. SIGTERM (scontrol requeue,
# preemption) and SIGUSR1 (120 s before the time limit) make the trainer save a checkpoint at the next step and
# exit 0; on SIGUSR1 it also runs `scontrol requeue` itself. A requeued job keeps its id, its script arguments and
# its environment, so it trains in the same run directory (<run.output_dir>/<run.name> from the config and
# overrides: never derive run.name from the job id) and `--resume latest` continues at the checkpointed step.
# --open-mode=append keeps the output of every attempt in the one log file.
#
# Env knobs: EMI_CONFIG (the run config; each stage script has a default), EMI_LAUNCH_MODE, EMI_PROCS_PER_NODE,
# EMI_PYTHON, and, read by emi.cluster on the nodes, EMI_ACCELERATE_CONFIG, EMI_MASTER_PORT.

die() {
    echo "slurm: $*" >&2
    exit 2
}

# The Python to run emi with: EMI_PYTHON, else the checkout's .venv, else python3 on PATH.
emi_python() {
    local repo
    repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    if [[ -n ${EMI_PYTHON:-} ]]; then
        echo "$EMI_PYTHON"
    elif [[ -x $repo/.venv/bin/python ]]; then
        echo "$repo/.venv/bin/python"
    else
        echo python3
    fi
}

# Runs `srun ... bash slurm/launch.sh ENTRY [ARGS...]` on every node of the job and exits with its status.
run_on_every_node() {
    [[ -n ${SLURM_JOB_ID:-} ]] || die "not inside a Slurm job: submit this script with sbatch"
    local mode=${EMI_LAUNCH_MODE:-accelerate} nodes=$SLURM_JOB_NUM_NODES cpus=${SLURM_CPUS_ON_NODE:-1}
    local procs=1 gpus=${SLURM_GPUS_PER_NODE:-0}
    gpus=${gpus##*:} # a typed request ("a100:8") counts its number
    if [[ -n ${EMI_PROCS_PER_NODE:-} ]]; then
        [[ $EMI_PROCS_PER_NODE =~ ^[1-9][0-9]*$ ]] ||
            die "EMI_PROCS_PER_NODE='$EMI_PROCS_PER_NODE' is not a positive integer"
        procs=$EMI_PROCS_PER_NODE
    elif [[ $gpus =~ ^[1-9][0-9]*$ ]]; then
        procs=$gpus
    fi

    local tasks_per_node
    case $mode in
    accelerate) tasks_per_node=1 ;;
    srun) tasks_per_node=$procs ;;
    *) die "EMI_LAUNCH_MODE='$mode' is not one of: accelerate, srun" ;;
    esac
    ((cpus >= tasks_per_node)) ||
        die "$tasks_per_node tasks per node need at least as many CPUs, the job has $cpus per node (--cpus-per-task)"

    export EMI_PROCS_PER_NODE=$procs # slurm/launch.sh (accelerate mode) starts this many per node

    echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST: mode $mode," \
        "$nodes node(s) x $procs process(es), $tasks_per_node task(s) per node: $*"
    # srun would inherit the allocation's task count; the step states its own layout. --kill-on-bad-exit: a rank
    # that dies must not leave the others waiting in a collective.
    exec srun --nodes="$nodes" --ntasks=$((nodes * tasks_per_node)) --ntasks-per-node="$tasks_per_node" \
        --cpus-per-task=$((cpus / tasks_per_node)) --kill-on-bad-exit=1 bash slurm/launch.sh "$@"
}
