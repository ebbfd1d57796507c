#!/usr/bin/env bash
# Feature extraction with the frozen Stage I encoders (`emi features extract`, every rank writes its own shards)
# as a Slurm batch job; modes and knobs: slurm/common.sh. Script arguments go to `emi features extract`:
#   sbatch --nodes 2 slurm/features.sh --encoders runs/stage1-vitl/export --shards data/shards/train \
#       --out data/features/train [--batch-size N]
# Extraction is resumable at shard granularity: a requeued (preempted) job, or the same command submitted again
# after a time limit, keeps the finished feature shards and extracts the rest. So no time-limit signal is asked for.
#SBATCH --job-name=emi-features
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=4:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
set -euo pipefail
source slurm/common.sh ||
    { echo "slurm/features.sh: run sbatch from the repository root (or --chdir=REPO)" >&2; exit 2; }

run_on_every_node -m emi.cli features extract "$@"
