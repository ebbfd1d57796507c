#!/usr/bin/env bash
# A training stage on every node of a Slurm job, for slurm/stage1.sh and slurm/stage2.sh (which hold each stage's
# #SBATCH settings and call this); modes and knobs: slurm/common.sh.
#   bash slurm/train.sh STAGE [section.key=value ...]     (STAGE: stage1 or stage2; inside a batch job)
# The run config: EMI_CONFIG, a path or a shipped config's name (default: the stage's vitl.yaml). Every (re)start of
# the job resumes from the run's newest checkpoint (--resume latest).
set -euo pipefail
source slurm/common.sh ||
    { echo "slurm/train.sh: run sbatch from the repository root (or --chdir=REPO)" >&2; exit 2; }

stage=${1:-}
[[ $stage == stage1 || $stage == stage2 ]] || die "slurm/train.sh: the first argument is the stage: stage1 or stage2"
shift
config=${EMI_CONFIG:-$stage/vitl.yaml}
# the config and the overrides checked here, once, before any node starts
"$(emi_python)" -m emi.cli config show --kind "$stage" "$config" "$@" >/dev/null ||
    die "EMI_CONFIG=$config with the overrides [$*]: refused (the reason above)"
run_on_every_node -m "emi.stages.$stage" --config "$config" --resume latest "$@"
