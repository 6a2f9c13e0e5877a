#!/usr/bin/env bash
# The quick-start demo: installs what it needs, builds tidegate and the example plugins,
# starts throw-away MongoDB + NATS servers, runs tidegate on examples/quickstart/tidegate.toml
# and shows change events flowing into JetStream. Safe to run repeatedly. With --keep-running it
# stays up afterwards (until Ctrl-C) for the consumer examples of docs/consumers.md.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${TIDEGATE_CACHE:-$HOME/.cache/tidegate}/target}"

"$ROOT/scripts/install-deps.sh" >/dev/null
echo "== building tidegate (release; the first build takes several minutes)"
cargo build --release --locked -p tidegate -p tidegate-testkit --bins
# The demo finds the repository (its scripts, plugins, examples) through CARGO_MANIFEST_DIR
# before the path compiled in: a build cache shared by clones at different paths may hand
# over a binary compiled in another clone, whose compiled-in path is gone.
CARGO_MANIFEST_DIR="$ROOT/testkit" exec "$CARGO_TARGET_DIR/release/tidegate-demo" "$@"
