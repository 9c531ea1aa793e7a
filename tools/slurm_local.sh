#!/usr/bin/env bash
# A single-node Slurm on this machine, for neuralign's real-Slurm tests (tests/study/test_slurm.py) and for trying
# `neuralign study --executor slurm` without a cluster.
#
#   tools/slurm_local.sh up      install slurm-wlm and munge if missing (Debian/Ubuntu, as root), write a slurm.conf
#                                for this host (its CPUs and memory, from `slurmd -C`), start munged (unless one
#                                already answers), slurmctld and slurmd, and wait until `sinfo` shows the node idle
#   tools/slurm_local.sh down    cancel every job, stop the daemons this script started (and munged if it started
#                                it), and check that none of them is left running
#   tools/slurm_local.sh status  which daemons run, and sinfo
#   tools/slurm_local.sh env     the line to paste into a shell: export SLURM_CONF=...
#
# Everything lives in $NEURALIGN_SLURM_DIR (default /tmp/neuralign-slurm): slurm.conf, state, spool, logs and pid
# files. /etc/slurm is not touched: the Slurm commands find this cluster through SLURM_CONF (`eval
# "$(tools/slurm_local.sh env)"`), and jobs inherit it. Scheduling: select/cons_tres with CR_CPU_Memory (CPUs and
# memory are consumable, so jobs that ask for part of the node run side by side); no cgroups, no accounting
# database (squeue answers; sacct does not), jobs may run as root. `up` is idempotent; exit status 0 when the node is
# idle (or allocated), 1 with the reason on standard error otherwise.
set -euo pipefail

DIR=${NEURALIGN_SLURM_DIR:-/tmp/neuralign-slurm}
CONF=$DIR/slurm.conf
WAIT=${NEURALIGN_SLURM_WAIT:-60}  # seconds to wait for the node to become idle
MUNGED_PID=/run/munge/munged.pid  # munged runs as the munge user: its pid file is in its own folder

die() { echo "slurm_local: $*" >&2; exit 1; }
say() { echo "slurm_local: $*" >&2; }

alive() {  # alive PIDFILE: the process of the pid file exists
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

install_packages() {
    local missing=()
    for cmd in slurmctld slurmd sbatch munged; do
        command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$(id -u)" -eq 0 ] || die "${missing[*]} not installed, and installing slurm-wlm and munge needs root"
    command -v apt-get >/dev/null 2>&1 || die "${missing[*]} not installed, and there is no apt-get to install them"
    say "installing slurm-wlm and munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    # packages' postinst scripts must not start daemons of their own (no init system here, or a real one)
    local policy=/usr/sbin/policy-rc.d created=0
    if [ ! -e $policy ]; then printf '#!/bin/sh\nexit 101\n' > $policy && chmod 755 $policy && created=1; fi
    local status=0
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends slurm-wlm munge; } >"$DIR/apt.log" 2>&1 \
        || status=$?
    [ $created -eq 1 ] && rm -f $policy
    [ $status -eq 0 ] || die "apt-get install slurm-wlm munge failed (see $DIR/apt.log): $(tail -n 1 "$DIR/apt.log")"
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return 0  # a munged answers already (ours from an earlier `up`, or the machine's): use it
    fi
    [ "$(id -u)" -eq 0 ] || die "munged is not running and starting it needs root"
    if [ ! -s /etc/munge/munge.key ]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    runuser -u munge -- /usr/sbin/munged --pid-file="$MUNGED_PID" 2>>"$DIR/log/munged.err" \
        || die "munged did not start (see $DIR/log/munged.err)"
    for _ in $(seq 50); do
        if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
            touch "$DIR/munged.ours"
            return 0
        fi
        sleep 0.1
    done
    die "munged started but does not answer (see $DIR/log/munged.err)"
}

write_conf() {
    local host node
    host=$(hostname -s)
    # e.g. "NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24036"
    node=$(slurmd -C | head -n 1)
    [[ $node == NodeName=* ]] || die "slurmd -C did not describe this node: $node"
    node="${node/NodeName=$host/NodeName=$host NodeAddr=127.0.0.1}"
    # slurm.conf is read by the daemons and the commands; the user may be root (as in CI containers)
    cat > "$CONF" <<EOF
# written by neuralign's tools/slurm_local.sh: a single-node cluster on $host
ClusterName=neuralign-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=$(id -un)
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldPort=${NEURALIGN_SLURMCTLD_PORT:-6817}
SlurmdPort=${NEURALIGN_SLURMD_PORT:-6818}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
ReturnToService=2
MpiDefault=none
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
SchedulerParameters=sched_interval=2,bf_interval=2
$node State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

up() {
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
    install_packages
    start_munge
    export SLURM_CONF=$CONF
    if ! alive "$DIR/slurmctld.pid" || ! alive "$DIR/slurmd.pid"; then
        stop_daemons
        write_conf
        slurmctld -f "$CONF" 2>>"$DIR/log/slurmctld.err" || die "slurmctld did not start (see $DIR/log/slurmctld.log)"
        slurmd -f "$CONF" 2>>"$DIR/log/slurmd.err" || die "slurmd did not start (see $DIR/log/slurmd.log)"
    fi
    local state=""
    for _ in $(seq $((WAIT * 2))); do
        state=$(sinfo -h -o %T 2>/dev/null | head -n 1 || true)
        case $state in
            idle|mixed|allocated) say "up: node $(hostname -s) $state ($(sinfo -h -o '%c CPUs, %m MB')); $(env_line)"
                                  return 0 ;;
            down*|drain*) scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true ;;
        esac
        sleep 0.5
    done
    die "the node is not idle after ${WAIT} s (sinfo: ${state:-no answer}); see $DIR/log/slurmctld.log and slurmd.log"
}

stop_pid() {  # stop_pid PIDFILE NAME: TERM, then KILL after 10 s; fails if the process is still there
    local file=$1 name=$2 pid
    alive "$file" || { rm -f "$file"; return 0; }
    pid=$(cat "$file")
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
        say "$name ($pid) ignored SIGTERM: killing it"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.5
    fi
    kill -0 "$pid" 2>/dev/null && die "$name ($pid) is still running"
    rm -f "$file"
}

stop_daemons() {
    stop_pid "$DIR/slurmd.pid" slurmd
    stop_pid "$DIR/slurmctld.pid" slurmctld
}

down() {
    export SLURM_CONF=$CONF
    if alive "$DIR/slurmctld.pid"; then
        scancel --full --quiet --user "$(id -un)" 2>/dev/null || true
        for _ in $(seq 40); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.25; done
    fi
    stop_daemons
    if [ -e "$DIR/munged.ours" ]; then
        stop_pid "$MUNGED_PID" munged
        rm -f "$DIR/munged.ours"
    fi
    # jobs' processes (slurmstepd and the job's own) end with slurmd's steps; check that none of ours is left
    local left
    left=$(pgrep -f "slurmstepd|$DIR" || true)
    [ -z "$left" ] || die "processes still running after down: $(echo "$left" | tr '\n' ' ')"
    say "down: no daemon of $DIR running"
}

status() {
    export SLURM_CONF=$CONF
    for name in slurmctld slurmd munged; do
        local file=$DIR/$name.pid
        [ $name = munged ] && file=$MUNGED_PID
        if alive "$file"; then echo "$name: running (pid $(cat "$file"))"; else echo "$name: stopped"; fi
    done
    if alive "$DIR/slurmctld.pid"; then sinfo; fi
    env_line
}

env_line() { echo "export SLURM_CONF=$CONF"; }

case ${1:-} in
    up) up ;;
    down) down ;;
    status) status ;;
    env) env_line ;;
    *) echo "usage: $0 up|down|status|env" >&2; exit 2 ;;
esac
