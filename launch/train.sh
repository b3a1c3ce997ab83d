#!/usr/bin/env bash
# One node: megalm train under torchrun, one process per GPU (or NPROC processes on CPU).
#   launch/train.sh configs/gpt2-125m.yaml train.steps=1000
#   NPROC=2 launch/train.sh configs/quickstart.yaml      # 2 CPU processes over gloo
set -euo pipefail
if [ -z "${NPROC:-}" ]; then
    NPROC=$(python3 -c 'import torch; print(max(1, torch.cuda.device_count()))')
fi
exec python3 -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m megalm.cli train "$@"
