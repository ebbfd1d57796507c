#!/usr/bin/env bash
# Stop the local cluster that slurm/local/up.sh started in ${EMI_SLURM_DIR:-/tmp/emi-slurm}: cancel its jobs,
# then stop slurmd, slurmctld and munged through their pid files. Safe when nothing runs. Keeps the folder
# (logs, saved state, munge key) and touches no process it did not start.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$here/common.sh"

# Waits up to $2 seconds for daemon $1 to exit after SIGTERM, then kills it.
stop_daemon() {
    local name=$1 wait_s=$2 pid i
    pid=$(daemon_pid "$name") || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < wait_s * 10; i++)); do
        daemon_pid "$name" >/dev/null || return 0
        sleep 0.1
    done
    echo "$name (pid $pid) ignored SIGTERM for ${wait_s}s: killing it"
    kill -KILL "$pid" 2>/dev/null || true
}

running=()
for daemon in "${daemons[@]}"; do
    if daemon_pid "$daemon" >/dev/null; then running+=("$daemon"); fi
done
if ((${#running[@]} == 0)); then
    echo "Slurm is not running from $dir: nothing to stop."
    exit 0
fi

# Jobs first: their slurmstepd processes would outlive slurmd and keep running.
if daemon_pid slurmctld >/dev/null && [[ -n $(squeue -h -o %A 2>/dev/null) ]]; then
    squeue -h -o %A | xargs scancel
    for ((i = 0; i < 150; i++)); do
        [[ -z $(squeue -h -o %A 2>/dev/null) ]] && break
        sleep 0.2
    done
fi

for node in "${nodes[@]}"; do stop_daemon "slurmd-$node" 10; done
stop_daemon slurmctld 10
stop_daemon munged 5
for daemon in "${daemons[@]}"; do rm -f "$(pid_file "$daemon")"; done
echo "Slurm stopped (${running[*]}); state and logs kept in $dir."
