#!/usr/bin/env bash
# A real Slurm cluster on this one machine: Debian's slurmctld and NODES slurmd "nodes" (default 2,
# named node1..nodeN, all 127.0.0.1), with munge for authentication. For trying megalm's Slurm path
# on a workstation, and for the tests. Needs root: it installs the packages when missing, adds the
# node names to /etc/hosts and runs the daemons. Everything else lives under $MEGALM_SLURM_DIR.
#
#   sudo slurm/testcluster/start.sh [NODES]
#   export SLURM_CONF=/tmp/megalm-slurm/slurm.conf     # then sbatch, squeue, scontrol ... use it
#   sudo slurm/testcluster/stop.sh
#
# The settings below are the ones a cluster needs on a machine without systemd or a cgroup
# filesystem, and the ones that make a requeued job start again in seconds, not minutes.
set -euo pipefail
NODES=${1:-2}
DIR=${MEGALM_SLURM_DIR:-/tmp/megalm-slurm}
if [ "$(id -u)" != 0 ]; then
    echo "testcluster: needs root (installs slurm and munge, runs their daemons)" >&2
    exit 77
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
        || ! command -v munged >/dev/null; then
    echo "testcluster: installing slurm and munge (Debian packages)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge >/dev/null
fi

mkdir -p "$DIR"/{state,spool,log,run}
mkdir -p /run/munge && chown munge:munge /run/munge
if ! pgrep -x munged >/dev/null; then
    runuser -u munge -- /usr/sbin/munged
    touch "$DIR/run/munged-started-here"
fi

for i in $(seq 1 "$NODES"); do
    grep -q "node$i # megalm-testcluster" /etc/hosts || echo "127.0.0.1 node$i # megalm-testcluster" >> /etc/hosts
done

CPUS=$(getconf _NPROCESSORS_ONLN)  # not nproc: it answers OMP_NUM_THREADS when that is set
MEM=$(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo)
cat > "$DIR/slurm.conf" <<CONF
ClusterName=megalm-test
# job ids that no earlier instance of this cluster used: a late message about an old job must not
# reach a new job of the same id
FirstJobId=$(( ($(date +%s) % 600000) * 100 + 1 ))
SlurmctldHost=localhost
SlurmctldPort=6817
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=5
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=1
SlurmdParameters=config_overrides
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
KillWait=30
CONF
for i in $(seq 1 "$NODES"); do
    echo "NodeName=node$i NodeAddr=127.0.0.1 Port=$((17000 + i)) CPUs=$CPUS RealMemory=$MEM State=UNKNOWN" >> "$DIR/slurm.conf"
done
echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP" >> "$DIR/slurm.conf"
# slurmd 22.05 always loads a cgroup plugin; v1 is the one that starts without a cgroup filesystem
echo "CgroupPlugin=cgroup/v1" > "$DIR/cgroup.conf"

export SLURM_CONF=$DIR/slurm.conf
pgrep -x slurmctld >/dev/null || slurmctld -i
for i in $(seq 1 "$NODES"); do
    [ -f "$DIR/run/slurmd-node$i.pid" ] && kill -0 "$(cat "$DIR/run/slurmd-node$i.pid")" 2>/dev/null || slurmd -N "node$i"
done

for _ in $(seq 1 60); do
    states=$(sinfo -h -o %T 2>/dev/null | sort -u | tr '\n' ' ')
    if [ "$states" = "idle " ]; then
        echo "testcluster: $NODES nodes idle; export SLURM_CONF=$SLURM_CONF"
        exit 0
    fi
    sleep 0.5
done
echo "testcluster: nodes did not become idle (sinfo: ${states:-nothing}); logs in $DIR/log" >&2
exit 1
