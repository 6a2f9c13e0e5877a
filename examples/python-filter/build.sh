#!/usr/bin/env bash
# Builds app.py into a tidegate component:  ./build.sh OUT.wasm
# Needs componentize-py (pip install componentize-py==0.25.1) and tidegate's WIT contract in
# ./wit (or TIDEGATE_WIT). The component imports WASI (componentize-py's runtime needs it);
# tidegate links WASI with no capabilities granted unless the config grants them.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="${1:?usage: build.sh OUT.wasm}"
case "$OUT" in /*) ;; *) OUT="$PWD/$OUT" ;; esac
WIT="${TIDEGATE_WIT:-$HERE/wit}"
COMPONENTIZE_PY="${COMPONENTIZE_PY:-componentize-py}"
cd "$HERE"
"$COMPONENTIZE_PY" -d "$WIT" -w filter componentize app -o "$OUT"
