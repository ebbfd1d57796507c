#!/usr/bin/env bash
# Start a real Slurm cluster on this machine, as root and without systemd: munged, slurmctld and two slurmd
# nodes n1 and n2 (partition "debug"), which share the local cores. State, logs and pid files go to
# ${EMI_SLURM_DIR:-/tmp/emi-slurm}. Ports: EMI_SLURMCTLD_PORT (16817), EMI_SLURMD_PORT (17001 for n1, +1 for n2).
# Idempotent: if the cluster in that folder is up, it says so and exits 0. Stop it with slurm/local/down.sh.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$here/common.sh"

ctld_port=${EMI_SLURMCTLD_PORT:-16817}
slurmd_port=${EMI_SLURMD_PORT:-17001}
timeout_s=${EMI_SLURM_UP_TIMEOUT:-30}

die() {
    echo "slurm/local/up.sh: $*" >&2
    exit 1
}

print_usage() {
    local down="bash $here/down.sh"
    [[ $dir == /tmp/emi-slurm ]] || down="EMI_SLURM_DIR=$dir $down"
    echo "Point sbatch, srun, squeue and scontrol at it with:"
    echo "  export SLURM_CONF=$SLURM_CONF"
    echo "Stop it with: $down"
}

# Shows every daemon log, stops whatever did start, and fails.
fail() {
    echo "slurm/local/up.sh: $*" >&2
    for log in "$dir"/log/*.log "$dir/munge/munged.log"; do
        [[ -f $log ]] || continue
        echo "----- $log (last 40 lines)" >&2
        tail -n 40 "$log" >&2
    done
    bash "$here/down.sh" >&2 || true
    exit 1
}

[[ $(id -u) == 0 ]] || die "must run as root: it starts munged as user munge and slurmctld/slurmd as root"
for program in munged mungekey slurmctld slurmd sinfo scontrol runuser setsid; do
    command -v "$program" >/dev/null || die "$program not found: install slurm-wlm and munge (run: make setup)"
done
id munge >/dev/null 2>&1 || die "user munge does not exist: reinstall the munge package (run: make setup)"

running=()
for daemon in "${daemons[@]}"; do
    if daemon_pid "$daemon" >/dev/null; then running+=("$daemon"); fi
done
if ((${#running[@]} == ${#daemons[@]})); then
    echo "Slurm is already up (state in $dir)."
    print_usage
    exit 0
fi
((${#running[@]} == 0)) || die "partly up (${running[*]} running from $dir): run slurm/local/down.sh first"

ports=("$ctld_port" "$slurmd_port" "$((slurmd_port + 1))")
for port in "${ports[@]}"; do
    [[ $port =~ ^[0-9]+$ ]] && ((port > 0 && port < 65536)) ||
        die "port '$port' is not a TCP port number (EMI_SLURMCTLD_PORT / EMI_SLURMD_PORT)"
    if (: <"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        die "port $port is already in use (another local cluster?): set EMI_SLURMCTLD_PORT / EMI_SLURMD_PORT"
    fi
done

mkdir -p "$dir"/{run,log,state,spool/n1,spool/n2,munge}
runuser -u munge -- test -x "$dir" ||
    die "user munge cannot enter $dir (munged needs every folder above its socket open to all, not 0700):" \
        "set EMI_SLURM_DIR to a folder under /tmp"
# munged insists: key readable only by munge, socket folder traversable by all (clients connect as any user).
chown munge:munge "$dir/munge"
chmod 0711 "$dir/munge"
if [[ ! -f $dir/munge/munge.key ]]; then
    runuser -u munge -- mungekey --create --keyfile="$dir/munge/munge.key"
fi
chmod 0400 "$dir/munge/munge.key"

cat >"$SLURM_CONF" <<EOF
# Written by slurm/local/up.sh: a two-node test cluster on one machine.
ClusterName=emi-local
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Our own munged socket, so a system munged does not matter; short credentials make requeue fast.
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd-%n.pid
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Both nodes run on the same cores: trust the node lines below, not the hardware.
SlurmdParameters=config_overrides
ReturnToService=2
MailProg=/bin/true
KillWait=5
JobRequeue=1
# Ended jobs stay visible to scontrol for an hour (default 300 s): tests and the demo read a job's state and exit
# code after the jobs beside it have ended, which on a loaded machine can be more than 5 minutes later.
MinJobAge=3600
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=2
NodeName=n1 NodeHostname=localhost NodeAddr=127.0.0.1 Port=$slurmd_port CPUs=2 RealMemory=2000 State=UNKNOWN
NodeName=n2 NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((slurmd_port + 1)) CPUs=2 RealMemory=2000 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
EOF

runuser -u munge -- munged --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/munged.seed" ||
    fail "munged did not start"

# Foreground daemons in their own sessions; the pid written here is the daemon's (setsid execs), and the
# daemon rewrites the same file itself. -f puts the folder on the command line, so `pgrep -f $dir` finds them.
setsid slurmctld -D -f "$SLURM_CONF" </dev/null >"$dir/log/slurmctld.log" 2>&1 &
echo $! >"$(pid_file slurmctld)"
for node in "${nodes[@]}"; do
    setsid slurmd -D -N "$node" -f "$SLURM_CONF" </dev/null >"$dir/log/slurmd-$node.log" 2>&1 &
    echo $! >"$(pid_file "slurmd-$node")"
done

deadline=$((SECONDS + timeout_s))
until [[ $(sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | tr '\n' ' ') == "${nodes[*]} " ]]; do
    for daemon in "${daemons[@]}"; do
        daemon_pid "$daemon" >/dev/null || fail "$daemon exited during start-up"
    done
    ((SECONDS < deadline)) ||
        fail "nodes ${nodes[*]} not idle after ${timeout_s}s (sinfo: $(sinfo -h -N 2>&1 | tr '\n' ';'))"
    sleep 0.2
done

echo "Slurm is up: nodes ${nodes[*]} idle in partition debug (state and logs in $dir)."
print_usage
