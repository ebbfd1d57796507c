#!/usr/bin/env bash
# Stage II (quality-aware fusion on frozen-encoder features) as a Slurm batch job; modes and knobs: slurm/common.sh.
#   EMI_CONFIG=configs/stage2/tiny.yaml sbatch --nodes 2 --gpus-per-node 0 --cpus-per-task 1 slurm/stage2.sh \
#       train.epochs=3
# Script arguments are config overrides (section.key=value). Default config: configs/stage2/vitl.yaml.
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
set -euo pipefail
source slurm/common.sh ||
    { echo "slurm/stage2.sh: run sbatch from the repository root (or --chdir=REPO)" >&2; exit 2; }

config=${EMI_CONFIG:-configs/stage2/vitl.yaml}
[[ -f $config ]] || die "EMI_CONFIG=$config: no such file (paths are relative to $PWD)"
run_on_every_node -m emi.stages.stage2 --config "$config" --resume latest "$@"
