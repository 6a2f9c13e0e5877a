#!/usr/bin/env bash
# Builds every plugin crate under plugins/ into a WebAssembly component, OUT_DIR/<crate>.wasm,
# and the crates built on the SDK once more for contract 0.1, OUT_DIR/v0.1/<crate>.wasm.
#
#   scripts/build-plugins.sh [OUT_DIR]        (default OUT_DIR: <repo>/target/plugins)
#
# stdout: only the absolute output directory (last line). stderr: progress, one line per
# component, errors.
#
# How: Debian's rustc-web compiles the guests for wasm32-unknown-unknown with std built from
# source (-Zbuild-std; rustup cannot add targets on our machines), then `wasm-tools component
# new` wraps each core module into a component. wasm32-unknown-unknown, unlike wasm32-wasip2,
# links no WASI imports, so the components import only tidegate:plugin interfaces.
#
# Environment:
#   TIDEGATE_CACHE             tools and build cache (default ~/.cache/tidegate)
#   TIDEGATE_GUEST_TARGET_DIR  cargo target dir of the guest build (default $TIDEGATE_CACHE/guest-target);
#                              outside the clone so CI can cache it and clones share it
#   TIDEGATE_GUEST_LINKER      wasm linker to use instead of the detected one
#
# Safe to run concurrently: the whole build holds a lock in the guest target dir, and outputs are
# written to a temporary file and renamed into place. A rebuild with nothing changed takes well
# under two seconds and needs no network.
set -euo pipefail

log() { printf 'build-plugins: %s\n' "$*" >&2; }
die() { printf 'build-plugins: error: %s\n' "$*" >&2; exit 1; }

[ $# -le 1 ] || die "usage: $0 [OUT_DIR]"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PLUGINS="$ROOT/plugins"
[ -f "$PLUGINS/Cargo.toml" ] || die "no plugin workspace at $PLUGINS"

CACHE="${TIDEGATE_CACHE:-$HOME/.cache/tidegate}"
GUEST_TARGET="${TIDEGATE_GUEST_TARGET_DIR:-$CACHE/guest-target}"
mkdir -p "$GUEST_TARGET" || die "cannot create guest target dir $GUEST_TARGET"
GUEST_TARGET="$(cd "$GUEST_TARGET" && pwd)"

OUT_DIR="${1:-$ROOT/target/plugins}"
mkdir -p "$OUT_DIR" || die "cannot create output dir $OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"

# One build at a time per guest target dir (cargo would serialise anyway, but the componentize
# and copy steps must not interleave either). Taken before install-deps.sh so that concurrent
# first runs on a fresh machine do not install the same tools twice at once.
command -v flock >/dev/null || die "flock not found (util-linux)"
exec 9>"$GUEST_TARGET/.build-plugins.lock"
if ! flock -n 9; then
  log "waiting for another build-plugins.sh using $GUEST_TARGET"
  flock 9
fi

TMP_FILES=()
cleanup() { [ ${#TMP_FILES[@]} -eq 0 ] || rm -f "${TMP_FILES[@]}"; }
trap cleanup EXIT

# --- tools ----------------------------------------------------------------------------------
deps="$("$ROOT/scripts/install-deps.sh")" || die "scripts/install-deps.sh failed (see above)"
dep() { sed -n "s/^$1=//p" <<<"$deps" | tail -n 1; }
WASM_TOOLS="$(dep WASM_TOOLS)"
GUEST_RUSTC="$(dep GUEST_RUSTC)"
GUEST_CARGO="$(dep GUEST_CARGO)"
: "${GUEST_RUSTC:=/usr/bin/rustc}" "${GUEST_CARGO:=/usr/bin/cargo}"
[ -x "$WASM_TOOLS" ] || die "install-deps.sh did not provide wasm-tools (WASM_TOOLS=$WASM_TOOLS)"
[ -x "$GUEST_RUSTC" ] || die "guest rustc $GUEST_RUSTC not found"
[ -x "$GUEST_CARGO" ] || die "guest cargo $GUEST_CARGO not found"

# Drop settings an enclosing cargo, CI or shell may have exported: they would change what is
# built, or force full rebuilds by changing cargo's fingerprints between runs.
unset RUSTFLAGS RUSTDOCFLAGS CARGO_ENCODED_RUSTFLAGS CARGO_BUILD_RUSTFLAGS RUSTC_WRAPPER \
  RUSTC_WORKSPACE_WRAPPER CARGO_BUILD_TARGET CARGO_BUILD_TARGET_DIR CARGO_TARGET_DIR RUSTUP_TOOLCHAIN \
  CARGO_MAKEFLAGS MAKEFLAGS MFLAGS CARGO_BUILD_JOBS RUSTC_LINKER
for v in $(compgen -e); do
  case "$v" in CARGO_PROFILE_* | CARGO_TARGET_*) unset "$v" ;; esac
done

# The wasm linker. rustc-web links wasm with `rust-lld`, which Debian ships as a symlink to
# `lld-NN` from the separate lld-NN package; rust-web-llvm does not depend on it, so the link
# can dangle. Then fall back to a wasm-ld on PATH, or to rustup's bundled rust-lld.
find_linker() {
  local c
  if [ -n "${TIDEGATE_GUEST_LINKER:-}" ]; then
    c="$(command -v "$TIDEGATE_GUEST_LINKER")" || die "TIDEGATE_GUEST_LINKER=$TIDEGATE_GUEST_LINKER not found"
    case "$c" in /*) echo "$c" ;; *) echo "$PWD/$c" ;; esac
    return
  fi
  if [ -x /usr/bin/rust-lld ]; then
    echo /usr/bin/rust-lld; return
  fi
  for c in wasm-ld $(compgen -c wasm-ld- 2>/dev/null | sort -Vr); do
    if command -v "$c" >/dev/null; then command -v "$c"; return; fi
  done
  local rustc sysroot host
  if command -v rustup >/dev/null && rustc="$(cd / && rustup which rustc 2>/dev/null)"; then
    sysroot="$("$rustc" --print sysroot 2>/dev/null || true)"
    host="$("$rustc" -vV 2>/dev/null | sed -n 's/^host: //p' || true)"
    c="$sysroot/lib/rustlib/$host/bin/rust-lld"
    if [ -n "$sysroot" ] && [ -x "$c" ]; then echo "$c"; return; fi
  fi
  return 1
}
LINKER="$(find_linker)" || die "no wasm linker: /usr/bin/rust-lld -> $(readlink /usr/bin/rust-lld 2>/dev/null || echo '?') \
is missing; install it (apt-get install $(readlink /usr/bin/rust-lld 2>/dev/null || echo lld)), \
put wasm-ld on PATH, or set TIDEGATE_GUEST_LINKER"

# --- build ----------------------------------------------------------------------------------
[ "$LINKER" = /usr/bin/rust-lld ] || log "using wasm linker $LINKER"
# Cargo fingerprints the linker's path: a change would rebuild everything, std included. So cargo
# always sees the same path, a symlink (named rust-lld, which tells rustc to pass `-flavor wasm`).
LINKER_LINK="$GUEST_TARGET/bin/rust-lld"
if [ "$(readlink "$LINKER_LINK" 2>/dev/null || true)" != "$LINKER" ]; then
  mkdir -p "$GUEST_TARGET/bin"
  TMP_FILES+=("$LINKER_LINK.tmp.$$")
  ln -sfn "$LINKER" "$LINKER_LINK.tmp.$$"
  mv -fT "$LINKER_LINK.tmp.$$" "$LINKER_LINK"
fi

export RUSTC="$GUEST_RUSTC" RUSTC_BOOTSTRAP=1 CARGO_TARGET_DIR="$GUEST_TARGET"
export CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_LINKER="$LINKER_LINK"
TARGET=wasm32-unknown-unknown

# --locked: the build uses plugins/Cargo.lock as committed and never touches the index, so it works
# offline once the crates are in ~/.cargo/registry.
"$GUEST_CARGO" build --manifest-path "$PLUGINS/Cargo.toml" --workspace --release --locked \
  -Zbuild-std=std,panic_abort --target "$TARGET" >&2 \
  || die "cargo build of the plugins failed (see above)"

# Workspace members with a cdylib, as "<package> <lib target>" lines.
members="$("$GUEST_CARGO" metadata --manifest-path "$PLUGINS/Cargo.toml" --no-deps --offline \
  --format-version 1 | python3 -c '
import json, sys
for p in json.load(sys.stdin)["packages"]:
    for t in p["targets"]:
        if "cdylib" in t["kind"]:
            print(p["name"], t["name"].replace("-", "_"))
')" || die "cannot list the plugin crates"
[ -n "$members" ] || die "no cdylib crates in $PLUGINS"

# --- componentize ---------------------------------------------------------------------------
# componentize PKG CORE COMPONENTS_DIR OUT_DIR: wraps one core module into OUT_DIR/PKG.wasm.
componentize() {
  local pkg="$1" core="$2" components="$3" out_dir="$4"
  local comp="$components/$pkg.wasm" tmp imports bad out state
  [ -f "$core" ] || die "cargo produced no $core"
  mkdir -p "$components" "$out_dir"
  # Cached per guest target dir: redone only when the core module (or wasm-tools) changed.
  if [ ! -f "$comp" ] || [ "$core" -nt "$comp" ] || [ "$WASM_TOOLS" -nt "$comp" ]; then
    tmp="$comp.tmp.$$"
    TMP_FILES+=("$tmp")
    "$WASM_TOOLS" component new "$core" -o "$tmp" || die "wasm-tools component new failed for $pkg"
    # tidegate offers its own interfaces and WASI 0.2; anything else would fail at load time.
    imports="$("$WASM_TOOLS" component wit "$tmp" | sed -n 's/^ *import \([^;]*\);.*/\1/p')" \
      || die "wasm-tools component wit failed for $pkg"
    bad="$(grep -v -e '^tidegate:plugin/' -e '^wasi:[a-z-]*/[a-z-]*@0\.2\.' <<<"$imports" || true)"
    [ -z "$bad" ] || die "$pkg imports interfaces tidegate does not offer: $(tr '\n' ' ' <<<"$bad")"
    mv -f "$tmp" "$comp"
  fi
  out="$out_dir/$pkg.wasm"
  if cmp -s "$comp" "$out"; then
    state=unchanged
  else
    tmp="$out_dir/.$pkg.wasm.tmp.$$"
    TMP_FILES+=("$tmp")
    cp "$comp" "$tmp"
    mv -f "$tmp" "$out"
    state=written
  fi
  log "$out ($(wc -c <"$out") bytes, $state)"
}

while read -r pkg lib; do
  componentize "$pkg" "$GUEST_TARGET/$TARGET/release/$lib.wasm" "$GUEST_TARGET/components" "$OUT_DIR"
done <<<"$members"

# --- the SDK's plugins again, for contract 0.1 ------------------------------------------------
# The SDK builds contract 0.2 components by default; with its `contract-0-1` feature the same
# plugin code becomes a 0.1 component. OUT_DIR/v0.1/<crate>.wasm are these builds: the bench
# compares each plugin's call under both contracts, and tests run 0.1 and 0.2 in one chain.
# Their own target dir keeps the two builds' outputs apart (same names).
sdk_members="$("$GUEST_CARGO" metadata --manifest-path "$PLUGINS/Cargo.toml" --no-deps --offline \
  --format-version 1 | python3 -c '
import json, sys
for p in json.load(sys.stdin)["packages"]:
    if any(d["name"] == "tidegate-plugin" for d in p["dependencies"]):
        for t in p["targets"]:
            if "cdylib" in t["kind"]:
                print(p["name"], t["name"].replace("-", "_"))
')" || die "cannot list the SDK plugin crates"
V01_TARGET="$GUEST_TARGET/contract-0-1"
packages=()
while read -r pkg _; do packages+=(-p "$pkg"); done <<<"$sdk_members"
CARGO_TARGET_DIR="$V01_TARGET" "$GUEST_CARGO" build --manifest-path "$PLUGINS/Cargo.toml" \
  --release --locked -Zbuild-std=std,panic_abort --target "$TARGET" \
  --features tidegate-plugin/contract-0-1 "${packages[@]}" >&2 \
  || die "cargo build of the plugins for contract 0.1 failed (see above)"
while read -r pkg lib; do
  componentize "$pkg" "$V01_TARGET/$TARGET/release/$lib.wasm" "$V01_TARGET/components" "$OUT_DIR/v0.1"
done <<<"$sdk_members"

echo "$OUT_DIR"
