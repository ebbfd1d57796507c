#!/usr/bin/env bash
# Stage II (quality-aware fusion on frozen-encoder features) as a Slurm batch job: slurm/train.sh with this stage's
# resources (the #SBATCH lines; any can be overridden on the sbatch command line). Script arguments are config
# overrides (section.key=value):
#   EMI_CONFIG=stage2/tiny.yaml sbatch --nodes 2 --gpus-per-node 0 --cpus-per-task 1 slurm/stage2.sh train.epochs=3
# EMI_CONFIG: a path or a shipped config's name (default stage2/vitl.yaml); modes and knobs: slurm/common.sh.
#SBATCH --job-name=emi-stage2
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=12:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
[[ -f slurm/train.sh ]] ||
    { echo "slurm/stage2.sh: run sbatch from the repository root (or --chdir=REPO)" >&2; exit 2; }
exec bash slurm/train.sh stage2 "$@"
