#!/usr/bin/env bash
# Builds the example plugins in other languages than Rust into components, OUT_DIR/<name>.wasm:
#   examples/c-filter  ->  c-filter.wasm   (clang --target=wasm32-wasi + wasm-tools component new)
#
#   scripts/build-examples.sh [OUT_DIR]       (default OUT_DIR: <repo>/target/examples)
#
# stdout: only the absolute output directory (last line); stderr: progress and errors.
# Installs what it needs with scripts/install-deps.sh. Each build takes about a second, so
# nothing is cached; outputs are written to a temporary file and renamed into place, so
# concurrent runs are safe.
set -euo pipefail

log() { printf 'build-examples: %s\n' "$*" >&2; }
die() { printf 'build-examples: error: %s\n' "$*" >&2; exit 1; }

[ $# -le 1 ] || die "usage: $0 [OUT_DIR]"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${1:-$ROOT/target/examples}"
mkdir -p "$OUT_DIR" || die "cannot create output dir $OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"

deps="$("$ROOT/scripts/install-deps.sh")" || die "scripts/install-deps.sh failed (see above)"
dep() { sed -n "s/^$1=//p" <<<"$deps" | tail -n 1; }
export WASM_TOOLS CC
WASM_TOOLS="$(dep WASM_TOOLS)"
CC="$(dep CLANG)"

tmp="$OUT_DIR/.c-filter.wasm.tmp.$$"
trap 'rm -f "$tmp"' EXIT
"$ROOT/examples/c-filter/build.sh" "$tmp" || die "building examples/c-filter failed"
mv -f "$tmp" "$OUT_DIR/c-filter.wasm"
log "$OUT_DIR/c-filter.wasm ($(wc -c <"$OUT_DIR/c-filter.wasm") bytes)"

echo "$OUT_DIR"
