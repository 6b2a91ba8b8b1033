#!/usr/bin/env bash
# A real one-node SLURM cluster on localhost, for trying wsikit's job arrays (and for its CI test).
#
#   tests/slurm/localhost-cluster.sh install        # Debian/Ubuntu: slurmctld slurmd slurm-client munge (root)
#   tests/slurm/localhost-cluster.sh start DIR      # writes DIR/slurm.conf, starts munged, slurmctld, slurmd
#   export SLURM_CONF=DIR/slurm.conf                # then sbatch / squeue / sinfo talk to it
#   tests/slurm/localhost-cluster.sh stop DIR
#
# Needs root (the daemons run as root here), free ports 6817/6818 and no other slurmctld on the machine.
set -euo pipefail

cmd=${1:?usage: $0 install|start DIR|stop DIR}
dir=${2:-}

install() {
    export DEBIAN_FRONTEND=noninteractive
    command -v slurmctld >/dev/null && command -v munged >/dev/null && return 0
    apt-get update -qq || true
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

start() {
    [ -n "$dir" ] || { echo "start needs a state folder" >&2; exit 2; }
    mkdir -p "$dir"/{spool,state,log,munge}
    dir=$(cd "$dir" && pwd)
    chmod 755 "$dir" "$dir/munge"
    local host mem cpus
    host=$(hostname -s)
    cpus=$(nproc)
    mem=$(( $(free -m | awk 'NR==2{print $2}') - 1024 ))
    [ -f "$dir/munge/munge.key" ] || mungekey --create --keyfile="$dir/munge/munge.key" >/dev/null 2>&1
    chmod 600 "$dir/munge/munge.key"
    munged --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/seed" \
        --force
    cat >"$dir/slurm.conf" <<EOF
ClusterName=wsikit
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/log/jobcomp.txt
ReturnToService=2
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    export SLURM_CONF="$dir/slurm.conf"
    slurmctld -c
    slurmd -N "$host"
    for _ in $(seq 1 60); do
        state=$(timeout 5 sinfo -h -N -o %t 2>/dev/null | head -n1 || true)
        [ "$state" = "idle" ] && { echo "slurm up: SLURM_CONF=$SLURM_CONF"; return 0; }
        sleep 0.5
    done
    echo "slurm did not come up; see $dir/log" >&2
    return 1
}

stop() {
    [ -n "$dir" ] || { echo "stop needs the state folder" >&2; exit 2; }
    export SLURM_CONF="$dir/slurm.conf"
    timeout 10 scontrol shutdown >/dev/null 2>&1 || true
    for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munge/munged.pid"; do
        [ -f "$pidfile" ] || continue
        pid=$(cat "$pidfile")
        for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; kill "$pid" 2>/dev/null || true; sleep 0.25; done
        kill -9 "$pid" 2>/dev/null || true
    done
}

case "$cmd" in
    install) install ;;
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 install|start DIR|stop DIR" >&2; exit 2 ;;
esac
