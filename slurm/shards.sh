#!/usr/bin/env bash
# Shard building as a Slurm job array, and the merge as a job that waits for it:
#   sbatch --array=0-31 slurm/shards.sh --videos DIR --labels CSV --out data/shards/train [build options]
# Array task I of N runs `emi shards build ... ` on its slice of the clips (N and I from SLURM_ARRAY_TASK_COUNT and
# SLURM_ARRAY_TASK_ID: number the array from 0) with --workers = its CPUs (--cpus-per-task), into the shared --out
# (a shared folder or an s3:// prefix). The array's first task submits `emi shards merge OUT` with
# --dependency=afterany on the array: it writes manifest.json and failures.jsonl when every task is complete, or exits 3
# naming the tasks to run again; re-run those with the same arguments and the array's size:
#   sbatch --array=2,5 slurm/shards.sh --videos DIR --labels CSV --out data/shards/train --num-tasks 32
# (which submits another merge). A re-run task keeps its complete shards; so does a requeued (preempted) one.
# Submit from the repository root (or --chdir=REPO); EMI_PYTHON as in slurm/common.sh.
#SBATCH --job-name=emi-shards
#SBATCH --array=0-7
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --time=4:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%A_%a.out
set -euo pipefail
source slurm/common.sh ||
    { echo "slurm/shards.sh: run sbatch from the repository root (or --chdir=REPO)" >&2; exit 2; }

[[ -n ${SLURM_ARRAY_JOB_ID:-} ]] || die "not a job array: submit with sbatch --array=0-<tasks - 1> slurm/shards.sh ..."
python=$(emi_python)
out= workers=
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case ${args[i]} in
    --out) out=${args[i + 1]:-} ;;
    --out=*) out=${args[i]#--out=} ;;
    --workers | --workers=*) workers=given ;;
    esac
done
[[ -n $out ]] || die "slurm/shards.sh: pass the build's arguments, --out included"
[[ -n $workers ]] || args+=(--workers "${SLURM_CPUS_PER_TASK:-1}")

if [[ $SLURM_ARRAY_TASK_ID == "${SLURM_ARRAY_TASK_MIN:-0}" && ${SLURM_RESTART_COUNT:-0} == 0 ]]; then
    merge_log=$(dirname "$(scontrol show job "$SLURM_JOB_ID" | grep -o 'StdOut=[^ ]*' | cut -d= -f2)")
    sbatch --parsable --job-name=emi-shards-merge --dependency="afterany:$SLURM_ARRAY_JOB_ID" --ntasks=1 \
        --cpus-per-task=1 --time=4:00:00 --output="$merge_log/emi-shards-merge-%j.out" \
        --wrap="$(printf '%q ' "$python" -m emi.cli shards merge "$out")" |
        sed 's/^/submitted the merge: job /'
fi
echo "array job $SLURM_ARRAY_JOB_ID task $SLURM_ARRAY_TASK_ID of ${SLURM_ARRAY_TASK_COUNT:-?} (restart ${SLURM_RESTART_COUNT:-0})"
exec "$python" -m emi.cli shards build "${args[@]}"
