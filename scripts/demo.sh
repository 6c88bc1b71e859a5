#!/usr/bin/env bash
# Sets up, builds the examples in Release (build-release/) and runs the evaluation tool,
# build-release/examples/kvq-eval, passing all arguments through: bash scripts/demo.sh [args...]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup.sh >&2

GEN=()
if command -v ninja >/dev/null 2>&1; then
    GEN=(-G Ninja)
    if [[ -f build-release/CMakeCache.txt ]] && ! grep -qx 'CMAKE_GENERATOR:INTERNAL=Ninja' build-release/CMakeCache.txt; then
        rm -rf build-release
    fi
fi

echo "[demo] building build-release/ (Release, examples)" >&2
cmake -S . -B build-release "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release \
    -DKVQ_BUILD_TESTS=OFF -DKVQ_BUILD_BENCH=OFF -DKVQ_BUILD_EXAMPLES=ON -DKVQ_ENABLE_CUDA=OFF >&2
cmake --build build-release -j "${JOBS:-$(nproc)}" --target kvq-eval >&2

echo "[demo] running build-release/examples/kvq-eval $*" >&2
exec build-release/examples/kvq-eval "$@"
