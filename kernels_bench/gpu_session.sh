#!/usr/bin/env bash
# The GPU checks of this project, in stages that each fit a 10-minute command on a GPU machine. Where the tree is a
# copy without .git, prefix the call with CROSSDIFF_COMMIT=$(git rev-parse HEAD) (run in a checkout) so the results
# name their commit.
#
#   bash kernels_bench/gpu_session.sh check      # build, GPU tests (-m gpu), compute-sanitizer memcheck
#   bash kernels_bench/gpu_session.sh sanitize   # build if stale, memcheck and racecheck on the CUDA op tests
#   bash kernels_bench/gpu_session.sh bench      # build if stale, the paper suite (sweeps within a budget),
#                                                # then the per-op auto table it implies (printed, not written)
#   bash kernels_bench/gpu_session.sh tests      # build if stale, the whole test suite on the GPU machine
#
# Each stage runs under `timeout`, logs to $OUT/<stage>.log (a folder the caller collects afterwards; the stages
# keep to a few files) and appends "<stage> rc=<exit> <seconds>s" to $OUT/summary.txt; a failing stage
# does not stop the next. The build is kept between calls while the machine stays warm, and is redone only
# when crossdiff_ext reports it stale or without CUDA kernels. Afterwards, in a checkout: copy the suite's result files
# into kernels_bench/results/, run `python -m kernels_bench auto_table kernels_bench/results/<device>.json
# --write`, and commit both.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_session_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
SUITE_BUDGET_MIN=${SUITE_BUDGET_MIN:-6}
FAILED=0
CUDA_TESTS=(python_tests/test_ops_select.py python_tests/test_ops_sparse.py python_tests/test_ops_encode.py)

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log, record
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/$name.log"
    timeout --kill-after=15 "$limit" "$@" >>"$OUT/$name.log" 2>&1
    rc=$?
    echo "$name rc=$rc $(($(date +%s) - start))s" | tee -a "$OUT/summary.txt"
    [ $rc = 0 ] || FAILED=1
    tail -n 15 "$OUT/$name.log"
    return $rc
}

built() {
    "$PY" -c "import sys, crossdiff_ext as cx; sys.exit(0 if 'cuda' in cx.available_backends() else 1)" 2>/dev/null
}

build() {
    built && { echo "build: up to date" | tee -a "$OUT/summary.txt"; return 0; }
    stage env 60 bash -c "nvidia-smi; $PY -c 'import torch, triton; print(torch.__version__, torch.version.cuda, \
triton.__version__, torch.cuda.get_device_name())'; nvcc --version | tail -n 2; compute-sanitizer --version | tail -n 1"
    export MAX_JOBS=${MAX_JOBS:-16}
    stage build 420 "$PY" setup.py build_ext --inplace || return 1
    built || { echo "build: crossdiff_ext has no cuda backend after the build" | tee -a "$OUT/summary.txt"; return 1; }
}

sanitizer() {  # sanitizer TOOL SECONDS
    stage "sanitizer-$1" "$2" compute-sanitizer --tool "$1" --error-exitcode 99 --print-limit 20 \
        "$PY" -m pytest -q -x -p no:cacheprovider -k cuda "${CUDA_TESTS[@]}"
}

case "${1:-}" in
    check)
        build || exit 1
        stage gpu-tests 240 "$PY" -m pytest -q -p no:cacheprovider -m gpu -ra
        sanitizer memcheck 150
        ;;
    sanitize)
        build || exit 1
        sanitizer memcheck 240
        sanitizer racecheck 300
        ;;
    bench)
        build || exit 1
        stage suite $((SUITE_BUDGET_MIN * 60 + 180)) "$PY" -m kernels_bench --suite paper --out "$OUT/suite" \
            --budget-min "$SUITE_BUDGET_MIN"
        [ -f "$OUT/suite.json" ] && stage auto-table 60 "$PY" -m kernels_bench auto_table "$OUT/suite.json"
        ;;
    tests)
        build || exit 1
        stage tests 540 "$PY" -m pytest -q -p no:cacheprovider -ra
        ;;
    *)
        echo "usage: bash kernels_bench/gpu_session.sh check|sanitize|bench|tests" >&2
        exit 2
        ;;
esac
cat "$OUT/summary.txt"
exit $FAILED
