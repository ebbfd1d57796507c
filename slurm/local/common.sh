# Sourced by up.sh and down.sh: where the local cluster keeps its state and how to find its daemons.
# Everything lives under one folder, so several clusters (e.g. a test's) can coexist on different ports.

dir=${EMI_SLURM_DIR:-/tmp/emi-slurm}
export SLURM_CONF=$dir/slurm.conf
nodes=(n1 n2)
daemons=(munged slurmctld slurmd-n1 slurmd-n2)

pid_file() {
    if [[ $1 == munged ]]; then echo "$dir/munge/munged.pid"; else echo "$dir/run/$1.pid"; fi
}

# Prints the pid of daemon $1 (munged, slurmctld, slurmd-n1, ...) and succeeds only while the process in its pid
# file is alive and still that program: a stale pid file must never make us signal an unrelated process.
daemon_pid() {
    local file pid comm state
    file=$(pid_file "$1")
    [[ -r $file ]] || return 1
    pid=$(<"$file")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    read -r comm state < <(ps -o comm=,stat= -p "$pid") || return 1
    [[ $comm == "${1%%-*}" && $state != Z* ]] || return 1
    echo "$pid"
}
