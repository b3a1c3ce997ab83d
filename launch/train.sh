#!/usr/bin/env bash
# One node: preflight, then megalm train under torchrun, one process per GPU (or NPROC processes on
# a machine without GPUs, over gloo). SIGUSR1 or SIGTERM to this script make every rank save and stop.
#   launch/train.sh configs/gpt2-125m.yaml train.steps=1000
#   NPROC=2 launch/train.sh configs/quickstart.yaml      # 2 CPU processes
set -euo pipefail
GPUS=$(python3 -c 'import torch; print(torch.cuda.device_count())')
NPROC=${NPROC:-$(( GPUS > 0 ? GPUS : 1 ))}
GPU_FLAG=$([ "$GPUS" -gt 0 ] && echo --gpus || true)
exec python3 -m megalm.cluster.node "$@" --nproc-per-node "$NPROC" $GPU_FLAG
