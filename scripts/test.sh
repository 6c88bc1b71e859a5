#!/usr/bin/env bash
# Sets up and runs kvq's test suite:
#   1. build-test/:  Release build of tests, benchmarks, examples (+ CUDA code when nvcc exists),
#                    then ctest without the GPU-only tests (-LE gpu);
#   2. build-asan/:  the CPU tests again under AddressSanitizer + UndefinedBehaviorSanitizer;
#   3. packaging:    cmake --install into a temporary prefix, then tests/consumer built against it
#                    (find_package, pkg-config) and through add_subdirectory, and run;
#   4. build-tsan/:  the concurrency tests (tests/test_concurrency.cpp) under ThreadSanitizer;
#   5. build-fuzz/:  with clang++: the libFuzzer targets (fuzz/*.cpp), each run FUZZ_SECONDS on a
#                    copy of its seed corpus; any crash, leak or sanitizer report fails.
#   0. lint:         clang-format (the tree must be formatted) and clang-tidy (.clang-tidy) on a
#                    translation unit that includes every library header; KVQ_LINT=0 skips.
# On a machine with a GPU (nvidia-smi lists one) the GPU tests run too; KVQ_GPU_TESTS=0/1 forces.
# Environment: JOBS (build parallelism, default nproc), CTEST_JOBS (default 2), KVQ_TSAN=0 skips
# stage 4, KVQ_FUZZ=0 skips stage 5, FUZZ_SECONDS (per target, default 30), FUZZ_JOBS (targets
# fuzzed at once, default 2).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

log() { echo; echo "=== [test] $* ==="; }
STAGE_T0=$SECONDS
stage_time() { echo "[test] stage '$1' took $((SECONDS - STAGE_T0)) s"; STAGE_T0=$SECONDS; }

bash scripts/setup.sh

JOBS="${JOBS:-$(nproc)}"

# ---- 0. formatting and static checks --------------------------------------------------------
if [[ "${KVQ_LINT:-1}" != 0 ]]; then
    log "clang-format check and clang-tidy"
    # .clang-format is written for clang-format 14 (Debian 12); other versions format differently.
    if command -v clang-format >/dev/null && [[ "$(clang-format --version)" =~ version\ 14\. ]]; then
        mapfile -t FORMAT_FILES < <(git ls-files '*.hpp' '*.cpp' '*.cuh' '*.cu' 2>/dev/null || true)
        if ((${#FORMAT_FILES[@]})); then
            clang-format --dry-run --Werror "${FORMAT_FILES[@]}" \
                || { echo "[test] files above are not clang-formatted: run clang-format -i on them" >&2; exit 1; }
            echo "[test] clang-format: ${#FORMAT_FILES[@]} files formatted"
        fi
    else
        echo "[test] clang-format 14 not found: format check skipped"
    fi
    if command -v clang-tidy >/dev/null; then
        TIDY_TU="$(mktemp --suffix=.cpp)"
        for h in $(cd include && find kvq -name '*.hpp' | sort); do echo "#include \"$h\""; done >"$TIDY_TU"
        clang-tidy --quiet "--config-file=$ROOT/.clang-tidy" "-header-filter=$ROOT/include/kvq/.*" "$TIDY_TU" -- \
            -std=c++20 -I"$ROOT/include" -I/usr/include/eigen3 \
            || { rm -f "$TIDY_TU"; echo "[test] clang-tidy findings above" >&2; exit 1; }
        rm -f "$TIDY_TU"
        echo "[test] clang-tidy: every header under include/kvq clean"
    fi
    stage_time lint
fi
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
stage_time release

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
# -O1 -g1 (line tables: symbolised ASan/UBSan stacks) instead of RelWithDebInfo's -O2 -g: the
# sanitized build compiles ~2.4x faster (87 s -> 37 s for test_method_spec.cpp on the 2-core VM),
# which keeps CI well under its 30-minute budget.
log "configure build-asan (KVQ_SANITIZE=ON)"
fresh_if_generator_changed build-asan
cmake -S . -B build-asan "${GEN[@]}" \
    -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O1 -g1 -DNDEBUG" \
    -DKVQ_BUILD_TESTS=ON -DKVQ_BUILD_BENCH=OFF -DKVQ_BUILD_EXAMPLES=OFF \
    -DKVQ_ENABLE_CUDA=OFF -DKVQ_SANITIZE=ON
log "build build-asan (kvq_tests)"
cmake --build build-asan -j "$JOBS" --target kvq_tests
log "ctest build-asan (-LE gpu)"
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:strict_string_checks=1:detect_stack_use_after_return=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
ctest --test-dir build-asan -LE gpu --output-on-failure -j "$CTEST_JOBS" --no-tests=error
stage_time asan

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

PC_FILE="$PKG_TMP/prefix/share/pkgconfig/kvq.pc"
[[ -f "$PC_FILE" ]] || { echo "[test] $PC_FILE was not installed" >&2; exit 1; }
if command -v pkg-config >/dev/null 2>&1; then
    log "consumer via pkg-config"
    PCP="$PKG_TMP/prefix/share/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
    PC_VERSION="$(PKG_CONFIG_PATH="$PCP" pkg-config --modversion kvq)"
    grep -q "KVQ_VERSION_MAJOR ${PC_VERSION%%.*}\b" include/kvq/version.hpp \
        || { echo "[test] kvq.pc version $PC_VERSION does not match include/kvq/version.hpp" >&2; exit 1; }
    # shellcheck disable=SC2046
    c++ -std=c++20 $(PKG_CONFIG_PATH="$PCP" pkg-config --cflags kvq) tests/consumer/main.cpp \
        $(PKG_CONFIG_PATH="$PCP" pkg-config --libs kvq) -o "$PKG_TMP/kvq_consumer_pc"
    "$PKG_TMP/kvq_consumer_pc"
else
    echo "[test] pkg-config not found; only checked that kvq.pc is installed"
fi
stage_time packaging

# ---- 4. ThreadSanitizer: the concurrency contract (docs/CONCURRENCY.md) ---------------------
if [[ "${KVQ_TSAN:-1}" != 0 ]]; then
    log "configure build-tsan (-fsanitize=thread)"
    fresh_if_generator_changed build-tsan
    cmake -S . -B build-tsan "${GEN[@]}" \
        -DCMAKE_BUILD_TYPE=RelWithDebInfo \
        -DKVQ_BUILD_TESTS=ON -DKVQ_BUILD_BENCH=OFF -DKVQ_BUILD_EXAMPLES=OFF \
        -DKVQ_ENABLE_CUDA=OFF -DKVQ_SANITIZE=OFF \
        "-DCMAKE_CXX_FLAGS=-fsanitize=thread -fno-omit-frame-pointer" \
        "-DCMAKE_EXE_LINKER_FLAGS=-fsanitize=thread"
    log "build build-tsan (kvq_concurrency_tests)"
    cmake --build build-tsan -j "$JOBS" --target kvq_concurrency_tests
    log "kvq_concurrency_tests under TSan"
    TSAN_OPTIONS="${TSAN_OPTIONS:-halt_on_error=1:second_deadlock_stack=1}" \
        build-tsan/tests/kvq_concurrency_tests
    stage_time tsan
fi

# ---- 5. libFuzzer targets, each for a bounded time ------------------------------------------
# -max_len per reader: the largest input worth mutating (seeds longer than this are still read).
fuzz_max_len() {
    case "$1" in
        method_spec) echo 256 ;;
        tokenizer|safetensors|kv_params) echo 4096 ;;
        *) echo 16384 ;;
    esac
}
CLANGXX="$(command -v clang++ || true)"
if [[ "${KVQ_FUZZ:-1}" != 0 && -z "$CLANGXX" ]]; then
    echo "[test] clang++ not found: fuzz stage skipped (scripts/setup.sh installs clang)"
elif [[ "${KVQ_FUZZ:-1}" != 0 ]]; then
    FUZZ_SECONDS="${FUZZ_SECONDS:-30}"
    FUZZ_JOBS="${FUZZ_JOBS:-2}"
    log "configure build-fuzz ($CLANGXX, -fsanitize=fuzzer,address,undefined)"
    fresh_if_generator_changed build-fuzz
    cmake -S . -B build-fuzz "${GEN[@]}" \
        -DCMAKE_BUILD_TYPE=RelWithDebInfo "-DCMAKE_CXX_COMPILER=$CLANGXX" \
        -DKVQ_BUILD_FUZZ=ON -DKVQ_BUILD_TESTS=OFF -DKVQ_BUILD_BENCH=OFF -DKVQ_BUILD_EXAMPLES=OFF \
        -DKVQ_ENABLE_CUDA=OFF -DKVQ_SANITIZE=OFF
    log "build build-fuzz"
    cmake --build build-fuzz -j "$JOBS" --target fuzz
    FUZZ_TMP="$(mktemp -d)"
    trap 'rm -rf "$PKG_TMP" "$FUZZ_TMP"' EXIT
    run_fuzzer() {  # name: runs build-fuzz/fuzz/fuzz-<name>; output in $FUZZ_TMP/<name>.log
        local name="$1" dir="$FUZZ_TMP/$1"
        mkdir -p "$dir/corpus" "$dir/artifacts"
        if [[ -d "fuzz/corpus/$name" ]]; then cp -r "fuzz/corpus/$name/." "$dir/corpus/"; fi
        ASAN_OPTIONS="detect_leaks=1" UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
            "build-fuzz/fuzz/fuzz-$name" -max_total_time="$FUZZ_SECONDS" -max_len="$(fuzz_max_len "$name")" \
            -timeout=25 -rss_limit_mb=2560 -print_final_stats=1 -artifact_prefix="$dir/artifacts/" \
            "$dir/corpus" >"$FUZZ_TMP/$name.log" 2>&1
    }
    names=()
    for bin in build-fuzz/fuzz/fuzz-*; do
        [[ -x "$bin" && -f "$bin" ]] && names+=("${bin##*/fuzz-}")
    done
    ((${#names[@]})) || { echo "[test] no fuzz targets were built" >&2; exit 1; }
    log "fuzzing ${names[*]} for ${FUZZ_SECONDS}s each, $FUZZ_JOBS at a time"
    for name in "${names[@]}"; do
        while (($(jobs -rp | wc -l) >= FUZZ_JOBS)); do wait -n || true; done
        # The exit status goes to a file (wait -n may already have collected it).
        { if run_fuzzer "$name"; then echo 0; else echo $?; fi >"$FUZZ_TMP/$name.rc"; } &
    done
    wait
    fuzz_failed=()
    for name in "${names[@]}"; do
        [[ "$(cat "$FUZZ_TMP/$name.rc" 2>/dev/null)" == 0 ]] || fuzz_failed+=("$name")
        execs="$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$FUZZ_TMP/$name.log" | grep -o '[0-9]*$' || echo '?')"
        corpus="$(find "$FUZZ_TMP/$name/corpus" -type f | wc -l)"
        echo "[fuzz] $name: $execs executions, corpus $corpus inputs"
    done
    if ((${#fuzz_failed[@]})); then
        for name in "${fuzz_failed[@]}"; do
            echo "[fuzz] $name FAILED; last lines of its log:" >&2
            tail -n 60 "$FUZZ_TMP/$name.log" >&2
            mkdir -p build-fuzz/artifacts
            cp -r "$FUZZ_TMP/$name/artifacts/." build-fuzz/artifacts/ 2>/dev/null || true
        done
        echo "[test] fuzzing found problems in: ${fuzz_failed[*]} (reproducers in build-fuzz/artifacts/)" >&2
        exit 1
    fi
    stage_time fuzz
fi

log "all passed"
