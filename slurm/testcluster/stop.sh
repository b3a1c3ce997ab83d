#!/usr/bin/env bash
# Stop the cluster slurm/testcluster/start.sh started: cancel its jobs, shut the daemons down, take
# the node names out of /etc/hosts, stop munged if start.sh started it, and wipe its directory.
set -uo pipefail
DIR=${MEGALM_SLURM_DIR:-/tmp/megalm-slurm}
export SLURM_CONF=$DIR/slurm.conf
if [ -f "$SLURM_CONF" ]; then
    scancel --quiet --user=root 2>/dev/null
    scontrol shutdown 2>/dev/null
fi
for pidfile in "$DIR"/run/slurmd-*.pid "$DIR"/run/slurmctld.pid; do
    [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null
done
for _ in $(seq 1 40); do  # the daemons, and the job steps they leave behind
    pgrep -x slurmd >/dev/null || pgrep -x slurmctld >/dev/null || pgrep -f slurmstepd >/dev/null || break
    sleep 0.25
done
if [ -f "$DIR/run/munged-started-here" ]; then
    pkill -x munged
fi
sed -i '/# megalm-testcluster$/d' /etc/hosts
rm -rf "$DIR"
echo "testcluster: stopped"
