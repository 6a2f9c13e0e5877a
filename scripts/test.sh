#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs the servers and toolchains it needs, then
#   1. format and lint checks (cargo fmt, clippy -D warnings) for the host and the plugins,
#      the layout check (scripts/check-layout.py), and the host's and the SDK's docs built
#      with warnings denied;
#   2. the guest plugins' own unit tests and the SDK's doc examples (native, no wasm needed),
#      and `cargo package` for the SDK (the crate `tidegate plugin new --lang rust` depends on);
#   3. every host unit and integration test, against real mongod + nats-server;
#   4. the quick-start demo, end to end, so the example never rots;
#   5. the deployment files (scripts/check-deploy.sh: run as far as the machine allows, the rest
#      checked, and it says which).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CACHE="${TIDEGATE_CACHE:-$HOME/.cache/tidegate}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
started=$SECONDS
phase() { printf '\n== [%4ss] %s\n' "$((SECONDS - started))" "$*"; }
# Every test runner's output is also kept here, to print one total at the end.
results=$(mktemp)
trap 'rm -f "$results"' EXIT

phase "installing servers and toolchains (skipped when present)"
"$ROOT/scripts/install-deps.sh"

phase "building the guest plugins"
"$ROOT/scripts/build-plugins.sh" >/dev/null

phase "cargo fmt --check"
cargo fmt --all -- --check
(cd plugins && cargo fmt --all -- --check)

phase "cargo clippy -D warnings"
cargo clippy --release --locked --workspace --all-targets -- -D warnings
(cd plugins && CARGO_TARGET_DIR="$CACHE/plugins-native-target" cargo clippy --locked --all-targets -- -D warnings)

phase "layout: no import cycle, files and functions within limits"
python3 "$ROOT/scripts/check-layout.py"

phase "host crate docs build without warnings (links to private items allowed: they guide readers of the source)"
RUSTDOCFLAGS="-D warnings -A rustdoc::private_intra_doc_links" \
  cargo doc --release --locked --no-deps -p tidegate --quiet

phase "plugin SDK docs build without warnings"
(cd plugins && CARGO_TARGET_DIR="$CACHE/plugins-native-target" RUSTDOCFLAGS="-D warnings" \
  cargo doc --locked --no-deps -p tidegate-plugin --quiet)

phase "plugin SDK packages for crates.io (cargo package, verified by building the packaged crate)"
(cd plugins && CARGO_TARGET_DIR="$CACHE/plugins-native-target" \
  cargo package --locked --allow-dirty --quiet -p tidegate-plugin)

phase "plugin unit tests (native)"
(cd plugins && CARGO_TARGET_DIR="$CACHE/plugins-native-target" cargo test --locked) 2>&1 | tee -a "$results"

phase "host unit and integration tests (real mongod and nats-server)"
cargo test --release --locked --workspace 2>&1 | tee -a "$results"

phase "quick-start demo"
cargo build --release --locked -p tidegate -p tidegate-testkit --bins
# This clone's repository, not the one the binary may have been compiled in (scripts/demo.sh).
CARGO_MANIFEST_DIR="$ROOT/testkit" "$CARGO_TARGET_DIR/release/tidegate-demo"

phase "deployment files: Dockerfile, compose, their config (what was run and what only checked)"
CHECK_DEPLOY_INSTALL=1 "$ROOT/scripts/check-deploy.sh"

phase "all passed"
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) s += $i } }
     END { printf "summary: %d passed, %d failed, %d skipped\n", p, f, s }' "$results"
