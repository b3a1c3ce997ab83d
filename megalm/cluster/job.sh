# The body of megalm's Slurm batch job. `megalm slurm submit` writes the #SBATCH lines and the run's
# arguments above it (RUN_DIR/slurm/job.sbatch); slurm/train.sbatch runs it with its own arguments.
#
# Prepare the data once on the first node; one srun task per node starts the node launcher
# (preflight, then torchrun with c10d rendezvous on the first node, port from the job id); a node
# that fails ends the job (after the watchdog has named the rank that failed first). USR1
# (sent by Slurm `--signal=B:USR1@lead` before the time limit, or by a preemption) is passed to every
# rank, which saves and stops (exit code 75); then the job requeues itself unless the run is
# finished, failed with a config error (2), or keeps failing at the same step. TERM (scancel) also
# makes every rank save, but does not requeue. A rank's error ends the job within seconds (every
# rank and node names it; exit code 1), a watchdog verdict within its timeout (3).
set -uo pipefail
GPUS=${MEGALM_GPUS_PER_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}
GPU_FLAG=--gpus
if [ "${GPUS:-0}" -eq 0 ]; then GPUS=${MEGALM_PROCS_PER_NODE:-1}; GPU_FLAG=; fi
CONTAINER=${MEGALM_CONTAINER_FLAGS:-}
ONE_TASK="srun --nodes=1 --ntasks=1 $CONTAINER"
MASTER=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
PORT=$((20000 + SLURM_JOB_ID % 20000))  # two jobs sharing a node must not share a port
echo "megalm job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST: $SLURM_NNODES nodes x $GPUS processes; rendezvous $MASTER:$PORT; $(date -Is)"

$ONE_TASK python3 -m megalm.cli prepare "$@" || exit $?

srun --ntasks-per-node=1 --kill-on-bad-exit=1 $CONTAINER python3 -m megalm.cluster.node "$@" \
    --nnodes "$SLURM_NNODES" --nproc-per-node "$GPUS" --rdzv "$MASTER:$PORT" --rdzv-id "$SLURM_JOB_ID" $GPU_FLAG &
step=$!
cancelled=0
trap 'echo "megalm job: USR1 (time limit near, or preemption): every rank saves and stops"; kill -USR1 $step' USR1
trap 'echo "megalm job: TERM (cancelled): every rank saves and stops"; cancelled=1; kill -TERM $step' TERM
while true; do
    wait "$step"
    rc=$?
    kill -0 "$step" 2>/dev/null || break  # else wait returned early for a trapped signal: the step runs on
done
echo "megalm job: training ended with exit code $rc; $(date -Is)"
if [ "$cancelled" = 1 ]; then exit "$rc"; fi
decision=$($ONE_TASK python3 -m megalm.cluster.requeue "$@" --exit-code "$rc" --job-id "$SLURM_JOB_ID" | tail -n1)
if [ "$decision" = requeue ]; then
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$rc"
