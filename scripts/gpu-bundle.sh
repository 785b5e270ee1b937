#!/bin/bash
# Pack what a GPU machine without a Rust toolchain, MPI or HDF5 needs to run loft and its CUDA
# tests: the release binary (stripped), the test binaries of the GPU checks, and every shared
# library they link that is not part of a base system, into bundle/ (git-ignored).
# NVRTC and libcuda come from the GPU machine's CUDA installation and driver.
#
#   scripts/gpu-bundle.sh            then, there: LD_LIBRARY_PATH=bundle/lib bundle/loft ...
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=bundle
rm -rf "$OUT" && mkdir -p "$OUT/lib" "$OUT/tests"
cargo build --release >&2
# the integration tests that talk to a GPU, built and located without running them
mapfile -t tests < <(cargo test --release --no-run --message-format=json --test kernels 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["executable"])')
strip -o "$OUT/loft" target/release/loft
for t in "${tests[@]}"; do strip -o "$OUT/tests/$(basename "${t%-*}")" "$t"; done
# libraries outside the base system (libc, libm, libstdc++, libgcc, the loader stay behind)
base='^(linux-vdso|libc\.|libm\.|libstdc\+\+|libgcc_s|ld-linux|libpthread|libdl\.|librt\.)'
for bin in "$OUT/loft" "$OUT"/tests/*; do
    ldd "$bin" | awk '$3 ~ /^\// {print $1, $3}'
done | sort -u | while read -r name path; do
    [[ "$name" =~ $base ]] || cp -L "$path" "$OUT/lib/"
done
du -sh "$OUT" >&2
echo "gpu-bundle: $OUT/ ready (run with LD_LIBRARY_PATH=$OUT/lib)" >&2
