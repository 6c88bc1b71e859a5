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
