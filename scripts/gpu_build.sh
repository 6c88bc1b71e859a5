# Sourced by the gpu_*.sh scripts: build NAME SOURCE [LIBS...] [-DMACRO...] -> build-dev/NAME with nvcc,
# log in $OUT/build_NAME.log, unless KVQ_PREBUILT=1 and build-dev/NAME exists and finds its libraries.
# libstdc++/libgcc are linked statically so that a binary built on another Linux (glibc <= the
# device's) runs there.
FLAGS=(-std=c++20 -arch=sm_90 -O3 -Iinclude -Icuda -I/usr/include/eigen3 -diag-suppress 20012,20013,20014,20015
    -Xcompiler -static-libstdc++,-static-libgcc)
build() {
    local name=$1 src=$2
    shift 2
    if [[ "${KVQ_PREBUILT:-0}" == 1 && -x build-dev/$name ]] && ! ldd "build-dev/$name" | grep -q "not found"; then
        echo "prebuilt: $name"
        return 0
    fi
    nvcc "${FLAGS[@]}" "$src" "$@" -o "build-dev/$name" >"$OUT/build_$name.log" 2>&1 || {
        echo "BUILD FAILED: $name ($*)"
        tail -n 5 "$OUT/build_$name.log"
    }
}
