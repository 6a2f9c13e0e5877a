#!/usr/bin/env bash
# Builds the example plugins in other languages than Rust into components, OUT_DIR/<name>.wasm:
#   examples/c-filter       ->  c-filter.wasm       (clang --target=wasm32-wasi + wasm-tools)
#   examples/python-filter  ->  python-filter.wasm  (componentize-py; 18 MB, ~15 s)
#   examples/js-transform   ->  js-transform.wasm   (componentize-js; 12 MB, ~13 s)
#
#   scripts/build-examples.sh [OUT_DIR]       (default OUT_DIR: <repo>/target/examples)
#
# stdout: only the absolute output directory (last line); stderr: progress and errors.
# Installs what it needs with scripts/install-deps.sh. The C build takes about a second and is
# redone every time; the Python and JavaScript components are cached in $TIDEGATE_CACHE/examples under the
# hash of its inputs (sources, WIT, componentize-py version) and rebuilt only when they change.
# Outputs are written to a temporary file and renamed into place, so concurrent runs are safe.
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

COMPONENTIZE_PY="$(dep COMPONENTIZE_PY)"
export PYTHONPATH="$(dep COMPONENTIZE_PY_PATH)${PYTHONPATH:+:$PYTHONPATH}"
CACHE="${TIDEGATE_CACHE:-$HOME/.cache/tidegate}/examples"
mkdir -p "$CACHE"

TMP_FILES=()
trap 'rm -f "${TMP_FILES[@]}"' EXIT

# publish NAME FILE: moves FILE into OUT_DIR/NAME.wasm atomically.
publish() {
  local tmp="$OUT_DIR/.$1.wasm.tmp.$$"
  TMP_FILES+=("$tmp")
  cp "$2" "$tmp"
  mv -f "$tmp" "$OUT_DIR/$1.wasm"
  log "$OUT_DIR/$1.wasm ($(wc -c <"$OUT_DIR/$1.wasm") bytes, $3)"
}

# --- C ---------------------------------------------------------------------------------------
tmp="$CACHE/.c-filter.wasm.tmp.$$"
TMP_FILES+=("$tmp")
"$ROOT/examples/c-filter/build.sh" "$tmp" || die "building examples/c-filter failed"
publish c-filter "$tmp" built

# --- Python and JavaScript (cached by input hash) ---------------------------------------------
COMPONENTIZE_JS="$(dep COMPONENTIZE_JS)"
export COMPONENTIZE_PY COMPONENTIZE_JS

# cached_build NAME "INPUT FILES" "TOOL VERSION" BUILD_COMMAND...: runs BUILD_COMMAND OUT only
# when the inputs changed since the cached component was built.
cached_build() {
  local name=$1 inputs=$2 version=$3 key cached tmp state
  shift 3
  key="$( (cd "$ROOT/examples/$name" && cat $inputs; cat "$ROOT"/wit/plugin-0.1/*.wit; echo "$version") \
    | sha256sum | cut -c1-16)"
  cached="$CACHE/$name-$key.wasm"
  if [ -f "$cached" ]; then
    state=cached
  else
    tmp="$cached.tmp.$$"
    TMP_FILES+=("$tmp")
    "$@" "$tmp" >&2 || die "building examples/$name failed"
    mv -f "$tmp" "$cached"
    find "$CACHE" -name "$name-*.wasm" ! -name "$(basename "$cached")" -delete
    state=built
  fi
  publish "$name" "$cached" "$state"
}

cached_build python-filter "app.py build.sh" "$("$COMPONENTIZE_PY" --version)" \
  "$ROOT/examples/python-filter/build.sh"
cached_build js-transform "plugin.js build.mjs" "$COMPONENTIZE_JS" \
  node "$ROOT/examples/js-transform/build.mjs"

echo "$OUT_DIR"
