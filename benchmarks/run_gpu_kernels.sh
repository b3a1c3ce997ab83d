#!/usr/bin/env bash
# The kernels' GPU session in one script, run from the repository root on the lent GPU machine:
#   tests      GPU tests of the kernels (full sizes, every autotune tile, the CUDA LayerNorm)
#   report     sm_90 compile report of every Triton configuration (registers, spills, HGMMA)
#   attention  benchmark sweep of attention   -> kernels-attention.{json,md,png}
#   norms      benchmark sweep of the norms   -> kernels-norms.{json,md,png}
#   all        everything above, the benchmark as one kernels.{json,md,png}  (> 10 min: split it)
# Each stage fits one device call (10 min); compiled kernels, autotune choices and the CUDA
# extension are cached under build/ and survive between calls while the machine stays warm.
# Results and logs go to $OUT/<device-slug>/ (what the device tool brings back); copy them to
# benchmarks/results/<device-slug>/ and commit them. The device's copy of the tree has no .git:
# pass the commit being measured in MEGALM_GIT_COMMIT so the results are stamped with it.
#
#   MEGALM_GIT_COMMIT=<sha> bash benchmarks/run_gpu_kernels.sh tests
#   MEGALM_GIT_COMMIT=<sha> bash benchmarks/run_gpu_kernels.sh attention
set -euo pipefail
cd "$(dirname "$0")/.."
stage=${1:-all}
PY=${PYTHON:-python3}

# kernels/ is the project root of the megalm-kernels distribution: putting it on the path is
# what `pip install -e ./kernels` would do (that machine is offline and may lack the setuptools
# an editable build needs). $PWD makes megalm itself importable the same way. Wheels gathered by
# ../shared/device/wheels.sh are used if carried in .whl/.
site=$(mktemp -d)
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl
fi
export PYTHONPATH="$PWD/kernels:$PWD:$site${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p build
export TRITON_CACHE_DIR=$PWD/build/triton-cache
export TRITON_CACHE_AUTOTUNING=1
export TORCH_EXTENSIONS_DIR=$PWD/build/torch-extensions
export TORCHINDUCTOR_CACHE_DIR=$PWD/build/inductor-cache

slug=$($PY -c "import torch; from megalm_kernels.provenance import device_name, device_slug; \
print(device_slug(device_name(torch.device('cuda'))))")
out=${OUT:-benchmarks/results}/$slug
mkdir -p "$out/logs"
{
    nvidia-smi
    $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    echo "commit ${MEGALM_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
} > "$out/logs/environment.txt" 2>&1

run_tests() {
    $PY -m pytest kernels/tests -q -rs --durations=15 2>&1 | tee "$out/logs/tests.txt"
}

run_report() {
    env -u TRITON_INTERPRET $PY -m megalm_kernels.compile_report 2>&1 \
        | grep -v Warning | tee "$out/logs/compile_report.txt"
}

run_bench() {  # $1: ops, $2: result name
    $PY -m megalm_kernels.bench --ops "$1" --name "$2" --out "$out" 2>&1 \
        | tee "$out/logs/$2.txt"
}

case "$stage" in
    tests) run_tests ;;
    report) run_report ;;
    attention) run_bench attention kernels-attention ;;
    norms) run_bench norms kernels-norms ;;
    all) run_tests; run_report; run_bench attention,norms kernels ;;
    *) echo "unknown stage '$stage' (tests|report|attention|norms|all)" >&2; exit 2 ;;
esac
