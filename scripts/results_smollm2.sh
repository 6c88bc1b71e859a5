#!/usr/bin/env bash
# The SmolLM2-135M sweep behind examples/RESULTS.md: perplexity, KL vs the fp32 cache and top-1
# agreement of every KV-cache method on the first CONTEXT tokens of examples/data/genesis.txt
# (one context window), then a KV dump of the fp32 run and kvq-eval on it.
#   bash scripts/results_smollm2.sh OUT_DIR [CONTEXT] [BIN_DIR]
# CONTEXT defaults to 2048; BIN_DIR to build-release/examples (bash scripts/demo.sh builds it).
# Writes OUT_DIR/kl.jsonl (one JSON line per method, as each finishes) and kl.log (progress),
# OUT_DIR/dump_fp32.safetensors (+ dump_fp32.jsonl, .log), OUT_DIR/eval.json (+ eval.log); then
# `python3 scripts/results_table.py OUT_DIR` prints the tables. One process at a time, each
# single-threaded, so it can run in the background of a busy machine (nohup ... &).
# Needs the `bible` program (setup.sh installs bible-kjv) for the WKV calibration passage.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:?usage: results_smollm2.sh OUT_DIR [CONTEXT] [BIN_DIR]}"
CTX="${2:-2048}"
BIN="${3:-$ROOT/build-release/examples}"
mkdir -p "$OUT"
TEXT="$ROOT/examples/data/genesis.txt"
# WKV smoothing is calibrated on a different passage (Genesis 6-8), never on the evaluated text.
CALIB="$OUT/calib_genesis6-8.txt"
bash "$ROOT/scripts/kjv_text.sh" "Gen6:1-Gen8:22" > "$CALIB"

METHODS=(
    fp32 int8 int4 int2 "kivi:bits=2"
    "qjl:m=256,vbits=2" "qjl:m=256,vbits=4"
    "wkv:bits=4" "wkv:bits=4,calib=opt" "wkv:bits=4,poq=off" "wkv:bits=4,calib=opt,poq=off"
    "qjl:m=128,vbits=2" "qjl:m=128,vbits=4" "qjl:m=512,vbits=2" "qjl:m=512,vbits=4"
)
KV=()
for m in "${METHODS[@]}"; do KV+=(--kv "$m"); done

"$BIN/kvq-llama" kl --text "$TEXT" --context "$CTX" --max-tokens "$CTX" --calib-text "$CALIB" --calib-tokens 512 \
    "${KV[@]}" --json --progress > "$OUT/kl.jsonl" 2> "$OUT/kl.log"
# The fp32 run again, recording the post-RoPE q, k, v of every layer (the same tokens as above).
"$BIN/kvq-llama" ppl --text "$TEXT" --context "$CTX" --max-tokens "$CTX" --kv fp32 \
    --dump-kv "$OUT/dump_fp32.safetensors" --json --progress > "$OUT/dump_fp32.jsonl" 2> "$OUT/dump_fp32.log"
# kvq-eval's default method list on the real cache (WKV calibrated on the first half of the dump,
# metrics over the second half).
"$BIN/kvq-eval" --kv "$OUT/dump_fp32.safetensors" --json --progress > "$OUT/eval.json" 2> "$OUT/eval.log"
