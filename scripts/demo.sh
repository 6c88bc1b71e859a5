#!/usr/bin/env bash
# The main job: sets up, builds the examples in Release (build-release/) and shows what kvq does.
#   bash scripts/demo.sh            real model first: SmolLM2-135M (or stories260K when SmolLM2 is not
#                                   installed) with fp32, int4, QJL and WKV KV caches on the embedded
#                                   story and on a public-domain text (Genesis, KJV), one table each
#                                   (bits/element, KV MB, perplexity, KL vs the fp32 cache, tokens/s);
#                                   then stories260K over every method and kvq-eval's synthetic workload
#                                   Takes about 5 minutes on 2 cores; DEMO_CONTEXT (default 512) sets the
#                                   tokens of the Genesis run (examples/RESULTS.md has 2048).
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

LLAMA=build-release/examples/kvq-llama
DEMO_CONTEXT="${DEMO_CONTEXT:-512}"
# The demo's four methods: the fp32 reference cache, 4-bit integers, QJL sign sketches (m = 256,
# 2-bit values) and WKVQuant 2-D 4-bit (smoothing calibrated with statistics).
DEMO_KV=(--kv fp32 --kv int4 --kv "qjl:m=256" --kv "wkv:bits=4")
# --progress only when stderr is a terminal (kvq-llama's default), so logs stay clean.
echo "[demo] 1/4 real model (SmolLM2-135M when setup.sh installed it, else stories260K): the embedded story" >&2
echo "[demo]     examples/data/tinystory.txt; WKV calibrated on the Genesis text (never on the evaluated one)" >&2
"$LLAMA" compare --text examples/data/tinystory.txt --calib-text examples/data/genesis.txt "${DEMO_KV[@]}"
echo
echo "[demo] 2/4 the same on a public-domain text: the first $DEMO_CONTEXT tokens of Genesis (KJV, examples/data/genesis.txt);" >&2
echo "[demo]     WKV calibrated on the embedded story" >&2
"$LLAMA" compare --text examples/data/genesis.txt --context "$DEMO_CONTEXT" --max-tokens "$DEMO_CONTEXT" \
    --calib-text examples/data/tinystory.txt "${DEMO_KV[@]}"
echo

STORIES="$ROOT/../shared/models/stories260K.bin"
if [[ -f "$STORIES" ]]; then
    echo "[demo] 3/4 stories260K (llama2.c): kvq-llama compare over the built-in list of methods" >&2
    "$LLAMA" compare --model "$STORIES"
fi
echo >&2
echo "[demo] 4/4 synthetic LLM-like KV workload: kvq-eval" >&2
build-release/examples/kvq-eval
