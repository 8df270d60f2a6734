#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, loopback only, for the real-SLURM tests.
#
#   tests/slurm/cluster.sh start DIR    # writes DIR/slurm.conf, starts munged (if not running),
#                                       # slurmctld and slurmd; prints `export SLURM_CONF=...`
#   tests/slurm/cluster.sh stop DIR     # stops what start started, by its pid files
#
# Needs Debian's slurmctld, slurmd, slurm-client and munge packages and root (the daemons run as
# root; munged as user munge). Both daemons bind 127.0.0.1 only (NoCtldInAddrAny, NoInAddrAny and
# NodeAddr=127.0.0.1). cred_expire=5 lets a requeued job start again after 6 s instead of 121 s.
# Two partitions: "debug" and "urgent" (higher priority tier: a job there preempts and requeues
# a running "debug" job). SLURM_CTLD_PORT / SLURM_D_PORT choose the ports (default 6817 / 6818).
set -euo pipefail

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; }
[[ "${1:-}" == "-h" || "${1:-}" == "--help" ]] && { usage; exit 0; }
[[ $# -eq 2 && ( "$1" == start || "$1" == stop ) ]] || { usage >&2; exit 2; }
action=$1
dir=$(mkdir -p "$2" && cd "$2" && pwd)
conf="$dir/slurm.conf"

stop_pidfile() {  # stop the daemon whose pid is in $1, waiting up to 10 s
    local pidfile=$1 pid
    [[ -s "$pidfile" ]] || return 0
    pid=$(cat "$pidfile")
    if kill "$pid" 2>/dev/null; then
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
}

if [[ "$action" == stop ]]; then
    stop_pidfile "$dir/slurmd.pid"
    stop_pidfile "$dir/slurmctld.pid"
    if [[ -f "$dir/munged.ours" ]]; then
        stop_pidfile /run/munge/munged.pid
        rm -f "$dir/munged.ours"
    fi
    exit 0
fi

for tool in munged slurmctld slurmd sinfo; do
    command -v "$tool" >/dev/null || { echo "error: $tool not found; install Debian's slurmctld slurmd slurm-client munge packages" >&2; exit 2; }
done
[[ $(id -u) -eq 0 ]] || { echo "error: the one-node cluster's daemons run as root; run this as root" >&2; exit 2; }

mkdir -p "$dir/state" "$dir/spool" "$dir/log"
node=$(slurmd -C | head -1)
cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$node")
mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node")
cat > "$conf" <<CONF
ClusterName=dwltest
SlurmctldHost=localhost
SlurmctldPort=${SLURM_CTLD_PORT:-6817}
SlurmdPort=${SLURM_D_PORT:-6818}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=5
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MailProg=/bin/true
JobRequeue=1
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
ReturnToService=2
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP PriorityTier=1
PartitionName=urgent Nodes=localhost MaxTime=INFINITE State=UP PriorityTier=10
CONF

if ! pgrep -x munged >/dev/null; then
    mkdir -p /run/munge
    chown munge:munge /run/munge
    runuser -u munge -- /usr/sbin/munged
    touch "$dir/munged.ours"
fi
export SLURM_CONF="$conf"
slurmctld -f "$conf"
slurmd -N localhost -f "$conf"
for _ in $(seq 100); do
    if sinfo -h -o %t 2>/dev/null | grep -qx idle; then
        echo "export SLURM_CONF=$conf"
        exit 0
    fi
    sleep 0.2
done
echo "error: the node did not come up within 20 s; see $dir/log/" >&2
exit 1
