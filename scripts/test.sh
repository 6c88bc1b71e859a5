#!/usr/bin/env bash
# Sets up and runs kvq's test suite:
#   1. build-test/:  Release build of tests, benchmarks, examples (+ CUDA code when nvcc exists),
#                    then ctest without the GPU-only tests (-LE gpu);
#   2. build-asan/:  the CPU tests again under AddressSanitizer + UndefinedBehaviorSanitizer;
#   3. packaging:    cmake --install into a temporary prefix, then tests/consumer built against it
#                    (find_package) and through add_subdirectory, and run.
# On a machine with a GPU (nvidia-smi lists one) the GPU tests run too; KVQ_GPU_TESTS=0/1 forces.
# Environment: JOBS (build parallelism, default nproc), CTEST_JOBS (default 2).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

log() { echo; echo "=== [test] $* ==="; }

bash scripts/setup.sh

JOBS="${JOBS:-$(nproc)}"
CTEST_JOBS="${CTEST_JOBS:-2}"
GEN=()
if command -v ninja >/dev/null 2>&1; then
    GEN=(-G Ninja)
fi

# CUDA when nvcc exists (on PATH, $CUDACXX, or the default toolkit location).
NVCC=""
if [[ -n "${CUDACXX:-}" && -x "${CUDACXX}" ]]; then
    NVCC="$CUDACXX"
elif command -v nvcc >/dev/null 2>&1; then
    NVCC="$(command -v nvcc)"
elif [[ -x /usr/local/cuda/bin/nvcc ]]; then
    NVCC=/usr/local/cuda/bin/nvcc
fi
CUDA_ARGS=(-DKVQ_ENABLE_CUDA=OFF)
if [[ -n "$NVCC" ]]; then
    CUDA_ARGS=(-DKVQ_ENABLE_CUDA=ON "-DCMAKE_CUDA_COMPILER=$NVCC")
fi

# Reuse a build folder only if it was made with the same generator.
fresh_if_generator_changed() {
    local dir="$1" want="Unix Makefiles"
    ((${#GEN[@]})) && want="${GEN[1]}"
    if [[ -f "$dir/CMakeCache.txt" ]] && ! grep -qx "CMAKE_GENERATOR:INTERNAL=$want" "$dir/CMakeCache.txt"; then
        echo "[test] $dir was configured with another generator; removing it"
        rm -rf "$dir"
    fi
}

# ---- 1. Release build + CPU tests ----------------------------------------------------------
log "configure build-test (CUDA: ${NVCC:-none})"
fresh_if_generator_changed build-test
cmake -S . -B build-test "${GEN[@]}" \
    -DCMAKE_BUILD_TYPE=Release \
    -DKVQ_BUILD_TESTS=ON -DKVQ_BUILD_BENCH=ON -DKVQ_BUILD_EXAMPLES=ON \
    -DKVQ_SANITIZE=OFF "${CUDA_ARGS[@]}"
log "build build-test"
cmake --build build-test -j "$JOBS"
log "ctest build-test (-LE gpu)"
ctest --test-dir build-test -LE gpu --output-on-failure -j "$CTEST_JOBS" --no-tests=error

RUN_GPU="${KVQ_GPU_TESTS:-auto}"
if [[ "$RUN_GPU" == auto ]]; then
    RUN_GPU=0
    if [[ -n "$NVCC" ]] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
        RUN_GPU=1
    fi
fi
if [[ "$RUN_GPU" == 1 ]]; then
    log "ctest build-test (-L gpu)"
    ctest --test-dir build-test -L gpu --output-on-failure --no-tests=ignore
fi

# ---- 2. ASan + UBSan ------------------------------------------------------------------------
log "configure build-asan (KVQ_SANITIZE=ON)"
fresh_if_generator_changed build-asan
cmake -S . -B build-asan "${GEN[@]}" \
    -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DKVQ_BUILD_TESTS=ON -DKVQ_BUILD_BENCH=OFF -DKVQ_BUILD_EXAMPLES=OFF \
    -DKVQ_ENABLE_CUDA=OFF -DKVQ_SANITIZE=ON
log "build build-asan (kvq_tests)"
cmake --build build-asan -j "$JOBS" --target kvq_tests
log "ctest build-asan (-LE gpu)"
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:strict_string_checks=1:detect_stack_use_after_return=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
ctest --test-dir build-asan -LE gpu --output-on-failure -j "$CTEST_JOBS" --no-tests=error

# ---- 3. Packaging: install + consumer project -----------------------------------------------
PKG_TMP="$(mktemp -d)"
trap 'rm -rf "$PKG_TMP"' EXIT
log "install build-test into $PKG_TMP/prefix"
cmake --install build-test --prefix "$PKG_TMP/prefix"

log "consumer via find_package(kvq)"
cmake -S tests/consumer -B "$PKG_TMP/consumer-installed" "${GEN[@]}" \
    -DCMAKE_BUILD_TYPE=Release "-DCMAKE_PREFIX_PATH=$PKG_TMP/prefix"
cmake --build "$PKG_TMP/consumer-installed" -j "$JOBS"
"$PKG_TMP/consumer-installed/kvq_consumer"

if [[ -n "$NVCC" ]]; then
    log "consumer via find_package(kvq COMPONENTS cuda)"
    cmake -S tests/consumer -B "$PKG_TMP/consumer-cuda" "${GEN[@]}" \
        -DCMAKE_BUILD_TYPE=Release "-DCMAKE_PREFIX_PATH=$PKG_TMP/prefix" -DKVQ_CONSUMER_CUDA=ON
    cmake --build "$PKG_TMP/consumer-cuda" -j "$JOBS"
    "$PKG_TMP/consumer-cuda/kvq_consumer_cuda"
fi

log "consumer via add_subdirectory(kvq)"
cmake -S tests/consumer -B "$PKG_TMP/consumer-subdir" "${GEN[@]}" \
    -DCMAKE_BUILD_TYPE=Release "-DKVQ_CONSUMER_SOURCE_DIR=$ROOT"
cmake --build "$PKG_TMP/consumer-subdir" -j "$JOBS"
"$PKG_TMP/consumer-subdir/kvq_consumer"

log "all passed"
