#!/usr/bin/env bash
# The GPU checks of this project as ONE call of at most 6 minutes on a GPU machine, prepared and rehearsed on a
# machine without one.
#
#   bash kernels_bench/gpu_session.sh prebuild            # here (no GPU): _C for sm_90a (abi3) into .gpu_build/
#   bash kernels_bench/gpu_session.sh all                 # there: the one call (device: carry .gpu_build)
#   bash kernels_bench/gpu_session.sh all --rehearse      # here: every stage's plumbing on the CPU, about a minute
#   bash kernels_bench/gpu_session.sh bench               # a longer loan: the full paper suite (sweeps, profile)
#   bash kernels_bench/gpu_session.sh tests               # a longer loan: the whole test suite on the GPU
#
# `all` runs these stages in order, each under its own `timeout`, capped by what is left of GPU_SESSION_BUDGET_S
# (default 330 s: a 6-minute call with margin); a stage that would start with under 10 s left is recorded as
# skipped. After every stage its log is appended to $OUT/session.log and $OUT/summary.json is rewritten (stage,
# exit code, seconds, status, key figures), so a call cut off still returns what ran. Files under $OUT: session.log,
# summary.json, bench.json, bench.md (the device tool returns at most 8).
#
#   stage        limit  what                                                              sizing
#   env            30   nvidia-smi, torch / triton / CUDA / driver versions, the commit   seconds
#   import         30   put .gpu_build's _C in place and import it; a timeout retries it    import ~5 s
#                       (60 s); an extension that fails to load prints its error and
#                       `build` (9.0a only, 16 jobs, 180 s) runs, then a second import
#   op-tests       80   -m gpu of the selection tests (test_ops_select, the Triton paths, the
#                       CUDA emulator against the kernels), test_ops_{sparse,encode},
#                       test_opcheck, then test_ops_fuzz (CROSSDIFF_FUZZ_EXAMPLES=0.25:
#                       10 examples per op, no shrinking; the Triton encoder pinned to one
#                       config: no autotuning in tests)
#   scale-tests    50   test_gpu_scale.py: realistic and paper shapes, B*F > 2^32, the      see below
#                       bf16 layer step
#   bench         100   kernels_bench --suite paper --lean (B=4096, M=2, d=2304, F=73728,  see below
#                       k=100, bf16): ceilings, every op per backend beside cuBLAS and
#                       torch.topk, per-kernel times of batch_topk, the training step
#                       beside the dense eager peer, peak memory, the auto table
#   memcheck       50   compute-sanitizer memcheck, PYTORCH_NO_CUDA_MEMORY_CACHING=1, the
#                       small CUDA cases of test_ops_{select,sparse,encode}.py
#   racecheck      30   compute-sanitizer racecheck on the CUDA selection tests            if time remains
#   compile-tests  30   test_compile.py on the GPU backends (torch.compile of the step)     if time remains
#
# Sizing (measured here on the 2-core CPU machine; GPU seconds are estimates until a GPU run replaces them):
# the stages' limits add up to 370 s against the 330 s budget, so the last ones run only if earlier ones finish
# early. Every stage is stopped with SIGINT first (pytest still prints its failures and counts), then killed
# 10 s later: give the device call timeout_s >= 360. The prebuild takes about 2.5 min here and is never paid on the GPU; the fallback build of 9.0a only with 16 jobs is
# estimated at 60-120 s there and then eats into the later stages. The op tests collect 260 GPU cases; their cost
# there is Triton JIT compiles (estimated under 1 s each, a few dozen variants) and the fuzz examples. The bench
# runs about 25 timed cases at do_bench's 0.25 s each plus the Triton encoder's autotuning at the paper shape
# (8 configs). memcheck slows kernels 10-100x: its cases are the smallest shapes, -x, -v (a cut-off run still
# counts what passed).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
OUT=${OUT:-$PWD/gpu_session_out}
WORK=$(mktemp -d)
mkdir -p "$OUT"
# `all` fits a 6-minute call; `bench` and `tests` fill one 10-minute command.
[ "${1:-}" = all ] && DEFAULT_BUDGET_S=330 || DEFAULT_BUDGET_S=570
export GPU_SESSION_BUDGET_S=${GPU_SESSION_BUDGET_S:-$DEFAULT_BUDGET_S}
START=$(date +%s)
DEADLINE=$((START + GPU_SESSION_BUDGET_S))
MIN_STAGE_S=10
FAILED=0
# fuzz last: a failing example makes Hypothesis try more shapes (new Triton compiles); the others run first
OP_TESTS=(python_tests/ops/test_ops_select.py python_tests/triton/test_triton_select_paths.py
    python_tests/ops/test_cuda_emulation.py python_tests/ops/test_ops_sparse.py python_tests/ops/test_ops_encode.py
    python_tests/ops/test_opcheck.py python_tests/ops/test_ops_fuzz.py)
# memcheck's cases: one of each CUDA kernel family at small shapes (the sanitizer slows kernels 10-100x and its
# start, torch's CUDA init under it, takes tens of seconds)
MEMCHECK_SELECT="cuda and (matches_reference or ties_at_the_boundary or rows_keep_zero_or_many or keeps_nan)"
SANITIZER=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)

record() {  # record STAGE STATUS RC SECONDS LIMIT [NOTE]
    printf '{"stage": "%s", "status": "%s", "rc": %s, "seconds": %s, "limit_s": %s, "note": "%s"}\n' \
        "$1" "$2" "$3" "$4" "$5" "${6:-}" >>"$WORK/stages.jsonl"
    "$PY" -m kernels_bench.gpu_session summary "$OUT" "$WORK"
}

stage() {  # stage NAME LIMIT COMMAND...: run under the smaller of LIMIT and the time left; log; summarise
    local name=$1 limit=$2 start rc secs status left
    shift 2
    left=$((DEADLINE - $(date +%s)))
    if [ "$left" -lt "$MIN_STAGE_S" ]; then
        echo "== $name: skipped, ${left}s of the budget left" | tee -a "$OUT/session.log"
        record "$name" skipped null 0 "$limit" "no time left in the budget"
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    start=$(date +%s)
    echo "== $name (limit ${limit}s): $*" >"$WORK/$name.log"
    # SIGINT first: pytest then still prints its failures and closing counts line
    timeout -s INT --kill-after=10 "$limit" "$@" >>"$WORK/$name.log" 2>&1
    rc=$?
    secs=$(($(date +%s) - start))
    case $rc in 0) status=ok ;; 124 | 137) status=timeout ;; *) status=failed ;; esac
    [ "$rc" = 0 ] || FAILED=1
    { cat "$WORK/$name.log"; echo "== $name: $status rc=$rc ${secs}s"; echo; } >>"$OUT/session.log"
    record "$name" "$status" "$rc" "$secs" "$limit"
    tail -n 6 "$WORK/$name.log"
    echo "== $name: $status rc=$rc ${secs}s"
    return $rc
}

gpu_only() {  # gpu_only NAME WHY: a rehearsal stage only a GPU can answer, said in one line
    echo "== $1: needs a GPU: $2" | tee -a "$OUT/session.log"
    record "$1" gpu-only null 0 0 "needs a GPU: $2"
}

import_or_build() {
    local mode=--need-gpu
    [ -n "$REHEARSE" ] && mode=--rehearse
    stage import 30 "$PY" -m kernels_bench.gpu_session install --prebuilt .gpu_build $mode && return 0
    # A cold first import can outlast its limit: retry it. Build only when the extension itself failed to load
    # (no GPU visible, or a CUDA init error, is not something a build fixes).
    if tail -n 1 "$WORK/stages.jsonl" | grep -q '"status": "timeout"'; then
        stage import-retry 60 "$PY" -m kernels_bench.gpu_session install $mode && return 0
    fi
    grep -q "import error: crossdiff_ext._C\|import error: the build has no CUDA kernels" "$WORK"/import*.log || return 1
    if [ -n "$REHEARSE" ]; then
        gpu_only build "the fallback build (TORCH_CUDA_ARCH_LIST=9.0a, MAX_JOBS=16) runs only where the import failed"
        return 1
    fi
    stage build 180 env TORCH_CUDA_ARCH_LIST=9.0a CROSSDIFF_CUDA=1 MAX_JOBS=16 "$PY" setup.py build_ext --inplace \
        && stage import-after-build 30 "$PY" -m kernels_bench.gpu_session install --need-gpu
}

sanitizer() {  # sanitizer TOOL STAGE LIMIT PYTEST_ARGS...
    local tool=$1 name=$2 limit=$3
    shift 3
    if [ -n "$REHEARSE" ] || [ ! -x "$SANITIZER" ]; then
        gpu_only "$name" "compute-sanitizer --tool $tool over the CUDA op tests (PYTORCH_NO_CUDA_MEMORY_CACHING=1)"
        return 0
    fi
    stage "$name" "$limit" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$tool" \
        --error-exitcode 99 --print-limit 20 "$PY" -m pytest -v -x -p no:cacheprovider "$@"
}

all() {
    stage env 30 "$PY" -m kernels_bench.gpu_session env  # a cold torch + CUDA start; warms the import
    if ! import_or_build; then
        [ -z "$REHEARSE" ] && { echo "no importable build with CUDA kernels: the GPU stages cannot run"; return 1; }
    fi
    if [ -n "$REHEARSE" ]; then
        # the same files on the CPU backend (Triton's interpreter is the CPU suite's business)
        stage op-tests 80 env CROSSDIFF_FUZZ_EXAMPLES=0.25 CROSSDIFF_FUZZ_NO_SHRINK=1 "$PY" -m pytest -v \
            --tb=short -p no:cacheprovider -ra -m "not gpu" -k "cpu and not reference" "${OP_TESTS[@]}"
        stage scale-tests 30 "$PY" -m pytest -q -p no:cacheprovider --collect-only python_tests/ops/test_gpu_scale.py
        gpu_only scale-run "test_gpu_scale.py's cases need CUDA tensors (collected above, not run)"
        stage bench 60 "$PY" -m kernels_bench --suite quick --lean --backends cpu --reps 2 --out "$OUT/bench"
        sanitizer memcheck memcheck 50
        sanitizer racecheck racecheck 30
        gpu_only compile-tests "test_compile.py's GPU cases compile for CUDA tensors"
        return 0
    fi
    stage op-tests 80 env CROSSDIFF_FUZZ_EXAMPLES=0.25 CROSSDIFF_FUZZ_NO_SHRINK=1 "$PY" -m pytest -v --tb=short \
        -p no:cacheprovider -ra -m gpu "${OP_TESTS[@]}"
    stage scale-tests 50 "$PY" -m pytest -v --tb=short -p no:cacheprovider -ra -m gpu python_tests/ops/test_gpu_scale.py
    stage bench 100 "$PY" -m kernels_bench --suite paper --lean --out "$OUT/bench"
    sanitizer memcheck memcheck 50 -k "$MEMCHECK_SELECT" python_tests/ops/test_ops_select.py \
        python_tests/ops/test_ops_sparse.py python_tests/ops/test_ops_encode.py
    sanitizer racecheck racecheck 30 -k "cuda and matches_reference" python_tests/ops/test_ops_select.py
    stage compile-tests 30 "$PY" -m pytest -v --tb=short -p no:cacheprovider -ra -m gpu python_tests/training/test_compile.py
}

prebuild() {
    # Built here, where nvcc and the same torch exist, for the GPU machine's Hopper (sm_90a) only; abi3, so the
    # Python there (3.12) loads what this Python (3.11) built. Object files stay out of the carried folder.
    rm -rf .gpu_build
    TORCH_CUDA_ARCH_LIST=9.0a CROSSDIFF_CUDA=1 MAX_JOBS=${MAX_JOBS:-2} "$PY" setup.py -q build_ext \
        --build-lib .gpu_build/lib --build-temp "$WORK/tmp" || return 1
    "$PY" -m kernels_bench.gpu_session abi3 .gpu_build/lib/crossdiff_ext/_C.abi3.so || return 1
    { git rev-parse HEAD 2>/dev/null || echo unknown; } | tr -d '\n' >.gpu_build/commit.txt
    [ -n "$(git status --porcelain -- csrc setup.py 2>/dev/null)" ] && echo -n " (+ uncommitted changes to csrc or setup.py)" >>.gpu_build/commit.txt
    du -sh .gpu_build
    echo "carry .gpu_build in the device call, then: bash kernels_bench/gpu_session.sh all"
}

REHEARSE=
[ "${2:-}" = "--rehearse" ] && REHEARSE=1
export GPU_SESSION_REHEARSE=${REHEARSE:-0}
case "${1:-}" in
    all)
        rm -f "$OUT/session.log" "$OUT/summary.json"
        all
        echo "== total $(($(date +%s) - START))s of a ${GPU_SESSION_BUDGET_S}s budget"
        ;;
    prebuild) prebuild || FAILED=1 ;;
    bench)
        import_or_build || exit 1
        SUITE_BUDGET_MIN=${SUITE_BUDGET_MIN:-6}
        stage suite $((SUITE_BUDGET_MIN * 60 + 180)) "$PY" -m kernels_bench --suite paper --out "$OUT/suite" \
            --budget-min "$SUITE_BUDGET_MIN"
        ;;
    tests)
        import_or_build || exit 1
        stage tests 540 "$PY" -m pytest -q -p no:cacheprovider -ra
        ;;
    *)
        echo "usage: bash kernels_bench/gpu_session.sh all [--rehearse] | prebuild | bench | tests" >&2
        exit 2
        ;;
esac
rm -rf "$WORK"
exit $FAILED
