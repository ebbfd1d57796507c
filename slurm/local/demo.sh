#!/usr/bin/env bash
# `make demo-slurm`: the tiny demo pipeline as sbatch jobs on the local two-node cluster (2 nodes x 1 process, gloo):
# Stage I (slurm/stage1.sh), feature extraction (slurm/features.sh, train and val), Stage II (slurm/stage2.sh).
# Brings the cluster up (and down again on exit) unless one is already running from ${EMI_SLURM_DIR:-/tmp/emi-slurm};
# synthesises clips and builds shards into data/ first when data/shards/{train,val} have no manifest.
# Runs: runs/stage1-slurm, runs/stage2-slurm (re-running the demo resumes or re-exports them); job logs: logs/.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
source "$here/common.sh"
cd "$repo"

python=${EMI_PYTHON:-$repo/.venv/bin/python}
timeout_s=${EMI_DEMO_TIMEOUT:-1800}
export EMI_PYTHON=$python DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if daemon_pid slurmctld >/dev/null; then
    echo "Using the Slurm cluster already running from $dir (left up)."
else
    trap 'bash "$here/down.sh"' EXIT
    bash "$here/up.sh"
fi

# Train and val shards like the demo's: synthetic clips whose labels live in video, audio and text cues.
for split in train val; do
    [[ -f data/shards/$split/manifest.json ]] && continue
    clips=96 seed=0
    [[ $split == val ]] && clips=32 seed=1
    "$python" -m emi.cli synth --out "data/synth/$split" --clips "$clips" --seed "$seed" --prefix "$split-" --workers 2
    "$python" -m emi.cli shards build --videos "data/synth/$split/videos" --labels "data/synth/$split/labels.csv" \
        --transcripts "data/synth/$split/transcripts.csv" --out "data/shards/$split" --split "$split" \
        --frame-size 64 --shard-size 16 --workers 2
done
mkdir -p logs

# Submits a batch script on both nodes (CPU only, one core each), waits for the job and fails with its log.
run_job() {
    local script=$1 job state log i
    shift
    job=$(sbatch --parsable --nodes=2 --gpus-per-node=0 --cpus-per-task=1 "$script" "$@")
    job=${job%%;*}
    log=$(scontrol show job -o "$job" | grep -o 'StdOut=[^ ]*' | cut -d= -f2)
    echo "$script: job $job (log $log)"
    for ((i = 0; ; i++)); do
        state=$(scontrol show job -o "$job" | grep -o 'JobState=[A-Z_]*' | cut -d= -f2)
        case $state in
        PENDING | CONFIGURING | RUNNING | COMPLETING | REQUEUED | SUSPENDED) ;;
        COMPLETED) break ;;
        *)
            tail -n 40 "$log" >&2
            echo "slurm/local/demo.sh: job $job ended $state; its log: $log" >&2
            exit 1
            ;;
        esac
        if ((i >= timeout_s)); then
            scancel "$job"
            echo "slurm/local/demo.sh: job $job still $state after ${timeout_s}s: cancelled (EMI_DEMO_TIMEOUT)" >&2
            exit 1
        fi
        sleep 1
    done
    grep -E '\] (done|epoch [0-9]+ val|resumed)' "$log" | tail -n 3 || true
}

EMI_CONFIG=stage1/tiny.yaml run_job slurm/stage1.sh run.name=stage1-slurm
for split in train val; do
    run_job slurm/features.sh --encoders runs/stage1-slurm/export --shards "data/shards/$split" \
        --out "data/features/stage1-slurm/$split"
done
EMI_CONFIG=stage2/tiny.yaml run_job slurm/stage2.sh run.name=stage2-slurm \
    data.train=data/features/stage1-slurm/train data.val=data/features/stage1-slurm/val

echo "TensorBoard logs: runs/stage1-slurm/tb and runs/stage2-slurm/tb (tensorboard --logdir runs);" \
    "best Stage II model: runs/stage2-slurm/best; job logs: logs/"
