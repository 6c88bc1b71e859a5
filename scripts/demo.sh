#!/usr/bin/env bash
# The main job: sets up, builds the examples in Release (build-release/) and shows what kvq does.
#   bash scripts/demo.sh            real model first (kvq-llama compare: perplexity, KL and top-1
#                                   agreement of every cache method against the fp32 cache), then
#                                   kvq-eval's synthetic workload (score/attention error, bits/element)
#   bash scripts/demo.sh eval ARGS  only kvq-eval, with ARGS
#   bash scripts/demo.sh llama ARGS only kvq-llama, with ARGS (e.g. generate --prompt "Once upon")
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
cmake --build build-release -j "${JOBS:-$(nproc)}" --target kvq-eval kvq-llama >&2

case "${1:-}" in
    eval) shift; exec build-release/examples/kvq-eval "$@" ;;
    llama) shift; exec build-release/examples/kvq-llama "$@" ;;
    "") ;;
    *) echo "usage: bash scripts/demo.sh [eval ARGS | llama ARGS]" >&2; exit 2 ;;
esac

STORIES="$ROOT/../shared/models/stories260K.bin"
if [[ -f "$STORIES" ]]; then
    echo "[demo] 1/3 real model stories260K: kvq-llama compare (every cache method vs the fp32 cache)" >&2
    build-release/examples/kvq-llama compare --model "$STORIES"
fi
echo >&2
echo "[demo] 2/3 real model (SmolLM2-135M when installed by setup.sh, else stories260K): KL vs the fp32 cache" >&2
for kv in int4 "qjl:m=256" "wkv:bits=4"; do
    build-release/examples/kvq-llama kl --text examples/data/tinystory.txt --context 512 --kv "$kv"
done
echo >&2
echo "[demo] 3/3 synthetic LLM-like KV workload: kvq-eval" >&2
build-release/examples/kvq-eval
