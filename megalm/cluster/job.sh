# The body of megalm's Slurm batch job. `megalm slurm submit` writes the #SBATCH lines and the run's
# arguments above it (RUN_DIR/slurm/job.sbatch); slurm/train.sbatch runs it with its own arguments.
#
# Prepare the data once on the first node; one srun task per node starts the node launcher
# (preflight, then torchrun with c10d rendezvous on the first node, port from the job id). A node or
# rank that dies, or a watchdog verdict, ends the step (after the watchdog has named the rank that
# failed first); the step starts again in the same allocation, in a fresh rendezvous, up to
# slurm.max_restarts times, a node the watchdog named (or whose launcher vanished) replaced by a
# spare when the job has one (megalm slurm submit --spare-nodes K; megalm/cluster/restart.py). USR1
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
ALLOCATION=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | paste -sd, -)
NODES=$((SLURM_NNODES - ${MEGALM_SPARE_NODES:-0}))  # the training nodes; the rest are spares
STEP_NODES=$(echo "$ALLOCATION" | tr , '\n' | head -n "$NODES" | paste -sd, -)
LEFT_OUT=-
PORT=$((20000 + SLURM_JOB_ID % 2000 * 10))  # two jobs sharing a node must not share a port; +0..9 per restart
echo "megalm job $SLURM_JOB_ID (requeue ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST: $NODES nodes x $GPUS processes" \
    "(spare nodes: ${MEGALM_SPARE_NODES:-0}); $(date -Is)"

$ONE_TASK python3 -m megalm.cli prepare "$@" || exit $?

step=
signalled=0
cancelled=0
trap 'echo "megalm job: USR1 (time limit near, or preemption): every rank saves and stops"; signalled=1; kill -USR1 $step' USR1
trap 'echo "megalm job: TERM (cancelled): every rank saves and stops"; cancelled=1; kill -TERM $step' TERM
restarts=0
while true; do
    # each try is a fresh rendezvous (c10d closes one after a failure) on the first of its nodes
    export MEGALM_STEP="$SLURM_JOB_ID.$restarts"
    MASTER=${STEP_NODES%%,*}
    echo "megalm job: step $MEGALM_STEP on $STEP_NODES; rendezvous $MASTER:$((PORT + restarts % 10))"
    srun --nodes="$NODES" --ntasks="$NODES" --nodelist="$STEP_NODES" --ntasks-per-node=1 --kill-on-bad-exit=1 $CONTAINER \
        python3 -m megalm.cluster.node "$@" --nnodes "$NODES" --nproc-per-node "$GPUS" \
        --rdzv "$MASTER:$((PORT + restarts % 10))" --rdzv-id "$MEGALM_STEP" $GPU_FLAG &
    step=$!
    while true; do
        wait "$step"
        rc=$?
        kill -0 "$step" 2>/dev/null || break  # else wait returned early for a trapped signal: the step runs on
    done
    echo "megalm job: training ended with exit code $rc; $(date -Is)"
    if [ "$rc" = 0 ] || [ "$cancelled" = 1 ] || [ "$signalled" = 1 ]; then break; fi
    # a node or rank died, or the watchdog ended the run: start again in this allocation
    read -r decision next left_out < <($ONE_TASK python3 -m megalm.cluster.restart "$@" --step "$MEGALM_STEP" \
        --exit-code "$rc" --restarts "$restarts" --nodes "$STEP_NODES" --allocation "$ALLOCATION" \
        --left-out "$LEFT_OUT" | tail -n1)
    if [ "$decision" != restart ]; then break; fi
    STEP_NODES=$next
    LEFT_OUT=$left_out
    restarts=$((restarts + 1))
done
if [ "$cancelled" = 1 ]; then exit "$rc"; fi
decision=$($ONE_TASK python3 -m megalm.cluster.requeue "$@" --exit-code "$rc" --job-id "$SLURM_JOB_ID" | tail -n1)
if [ "$decision" = requeue ]; then
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$rc"
