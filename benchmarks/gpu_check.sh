#!/usr/bin/env bash
# Every GPU figure in one call, for the few minutes a GPU is lent: on one H100/H200, about 8 minutes,
# each stage's results written as it ends, to $OUT/<device-slug>/ (what the device tool brings back;
# copy it to benchmarks/results/<device-slug>/ and commit it):
#   1 environment   nvidia-smi, torch and triton versions, the commit measured   environment.txt
#   2 kernel tests  kernels/tests at full size (every tile, the CUDA LayerNorm)  logs/tests.txt
#   3 kernels       attention against torch SDPA's best backend (causal or not, head_dim 64/128, seq
#                   1k-16k, forward and forward+backward), the norms against the same run's copy
#                   bandwidth, linears in bf16 against FP8 (both recipes, the casts included, the
#                   shapes of GPT-2 124M to a 7B Llama)                           kernels.{json,md,png}
#   4 train         megalm bench train in bf16, eager and compiled, and compiled with FP8 linears where
#                   this GPU's timing finds them faster (train.fp8.layers=auto; target: gpt-1.3b at
#                   >= 1.25x compiled bf16): GPT-2 124M at seq 1024 and gpt-1.3b at seq 2048 (one GPU:
#                   pp=1, and tp=1, where sequence parallelism is moot)         train-<model>/train.{json,md,png}
# Each stage has a time budget; one that overruns is stopped, says so in its log, and the next runs.
#
#   MEGALM_GIT_COMMIT=<sha> bash benchmarks/gpu_check.sh       # on the GPU machine (its tree has no .git)
#   bash benchmarks/gpu_check.sh --dry-run                     # every stage at its smallest, on a CPU
#
# The dry run is the rehearsal CI makes (tests/test_gpu_check.py): the same commands, tiny sizes,
# so the GPU call cannot fail on a typo.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
dry=0
[ "${1:-}" = "--dry-run" ] && dry=1

# On the GPU machine megalm is not installed: kernels/ and the tree go on the path, with the wheels
# gathered by ../shared/device/wheels.sh if carried in .whl/ (see benchmarks/run_gpu_kernels.sh).
if ls .whl/*.whl >/dev/null 2>&1; then
    site=$(mktemp -d)
    $PY -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/kernels:$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p build
export TRITON_CACHE_DIR=$PWD/build/triton-cache TORCHINDUCTOR_CACHE_DIR=$PWD/build/inductor-cache
export TORCH_EXTENSIONS_DIR=$PWD/build/torch-extensions

if [ "$dry" = 1 ]; then
    slug=dry-run
    budget() { echo 300; }
    # the compiled variant runs as on the GPU but without inductor's minutes of compiling on a CPU
    # (tests/test_train.py trains compiled blocks for real)
    export TORCH_COMPILE_DISABLE=1
    echo "gpu_check: dry run: torch.compile disabled (TORCH_COMPILE_DISABLE=1)"
else
    slug=$($PY -c "import torch; from megalm_kernels.provenance import device_name, device_slug; \
print(device_slug(device_name(torch.device('cuda'))))") || { echo "gpu_check: no CUDA device" >&2; exit 2; }
    budget() { case $1 in tests) echo 80 ;; kernels) echo 150 ;; train) echo 125 ;; esac; }  # estimates: never run on a GPU yet
fi
out=${OUT:-benchmarks/results}/$slug
mkdir -p "$out/logs"
commit=${MEGALM_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
export MEGALM_GIT_COMMIT=$commit
started=$(date +%s)

stage() {  # NAME COMMAND...: run it within its budget, log it, say how it ended
    local name=$1 log="$out/logs/$1.txt" limit
    limit=$(budget "${name%%-*}")
    shift
    echo "gpu_check: $name (budget ${limit} s; $(( $(date +%s) - started )) s in)"
    timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$log" 2>&1
    local rc=$?
    case $rc in
        0) echo "gpu_check: $name done" ;;
        124|137) echo "gpu_check: $name stopped at its budget of $limit s (see $log)" | tee -a "$log" ;;
        *) echo "gpu_check: $name failed (exit code $rc; see $log)"; tail -n 5 "$log" ;;
    esac
    return 0
}

{
    nvidia-smi 2>&1 || echo "no nvidia-smi: a CPU rehearsal"
    $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    echo "commit $commit"
} > "$out/environment.txt" 2>&1

if [ "$dry" = 1 ]; then  # the kernel tests already run in CI (under the Triton interpreter)
    stage tests $PY -m pytest kernels/tests -q --collect-only
    stage kernels $PY -m megalm_kernels.bench --quick --no-compile --out "$out"
else
    stage tests $PY -m pytest kernels/tests -q -rs --durations=10
    stage kernels $PY -m megalm_kernels.bench --out "$out"
fi

# name, config and overrides of each training benchmark
if [ "$dry" = 1 ]; then
    # (MEGALM_DRY_SOURCE and MEGALM_DRY_DATA: a small corpus and where it is or will be prepared)
    # (one line: `read` below takes a run's first line only)
    tiny="model.n_layers=1 model.d_model=32 model.n_heads=2 data.seq_len=32 data.vocab_size=512 \
data.shard_tokens=4000 data.eval_sequences=16 data.source=${MEGALM_DRY_SOURCE:-python-stdlib} \
data.dir=${MEGALM_DRY_DATA:-$out/data} train.global_batch=2 train.micro_batch_size=2 train.device=cpu"
    runs=("tiny|quickstart|$tiny")
    steps=(--steps 3 --warmup 1)
    fp8=train.fp8.layers=auto,train.fp8.emulate=true  # (FP8 emulated on a CPU, where it never pays: none converted)
else
    runs=("gpt2-124m|gpt2-125m|train.global_batch=64 train.micro_batch_size=16"
          "gpt-1.3b|gpt2-125m|model=gpt-1.3b data.seq_len=2048 train.global_batch=16 train.micro_batch_size=8")
    steps=(--steps 24 --warmup 8)
    fp8=train.fp8.layers=auto
fi
for run in "${runs[@]}"; do
    IFS='|' read -r name config overrides <<< "$run"
    # shellcheck disable=SC2086  # the overrides are words
    stage "train-$name" $PY -m megalm.cli bench train "$config" $overrides train.precision=bf16 "${steps[@]}" \
        --variant eager: --variant compiled:train.compile=true --variant "fp8:train.compile=true,$fp8" \
        --out "$out/train-$name"
done
echo "gpu_check: all stages in $(( $(date +%s) - started )) s; results in $out"
