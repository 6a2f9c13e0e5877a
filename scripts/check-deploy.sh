#!/usr/bin/env bash
# Exercises deploy/ (Dockerfile, compose.yaml and the tidegate.toml it mounts) as far as this
# machine allows, and says for each part whether it was RUN or only CHECKED:
#
#   1. run:     the Dockerfile's build command (`cargo build --release --locked -p tidegate
#               --bin tidegate`) on this tree, and the example plugins compose mounts
#               (scripts/build-plugins.sh → target/plugins);
#   2. checked: (scripts/check-deploy.py) every COPY source exists; the context the COPY lines
#               lay out (minus .dockerignore) is a complete workspace: it resolves with
#               Cargo.lock and holds every file the sources embed; the entrypoint is the binary
#               the build stage writes; the image runs as distroless's non-root user; the binary
#               needs no library or glibc newer than distroless/cc-debian12 has; compose.yaml
#               parses and its builds, mounts, volumes and dependencies exist; the mounted config
#               names the compose services, replica set and ports, and passes `tidegate check`;
#   3. run, when a container engine works here (docker or podman; never installed by this
#      script — set CHECK_DEPLOY_INSTALL=1 to try `apt-get install podman runc`):
#        - if CHECK_DEPLOY_BUILD=1 and the base images can be pulled: `build -f
#          deploy/Dockerfile` (compiles everything in the container), then the image;
#        - if not (the default; no registry is reachable on the build machines): the runtime stage
#          assembled from this machine instead of distroless — the binary from step 1 at the
#          Dockerfile's path, the libraries it links from this Debian 12 (glibc 2.36, as in
#          distroless/cc-debian12), CA certificates, and distroless's users — with the
#          Dockerfile's USER, ENTRYPOINT and CMD; then, as compose runs it (its mounts,
#          read-only): `--help`, and `check` on the mounted config as the non-root user.
#      The compose quickstart itself (`docker compose up`: the mongo and nats images) is not run
#      by this script (it needs a registry); the summary says so.
#
# Exit status: 0 when everything run or checked passed. Takes ~10 s once the build is done.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CACHE="${TIDEGATE_CACHE:-$HOME/.cache/tidegate}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE/target}"
say() { printf 'check-deploy: %s\n' "$*"; }
ran=() checked_only=() not_run=()

# PyYAML for compose.yaml (pinned wheel into the cache when python3 has none).
if ! python3 -c 'import yaml' 2>/dev/null; then
  PYYAML="$CACHE/pyyaml-6.0.2"
  if [ ! -d "$PYYAML/yaml" ]; then
    req=$(mktemp)
    echo 'PyYAML==6.0.2 --hash=sha256:3ad2a3decf9aaba3d29c8f537ac4b243e36bef957511b4766cb0057d32b0be85' >"$req"
    python3 -m pip install --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
      --require-hashes --target "$PYYAML" -r "$req"
    rm -f "$req"
  fi
  export PYTHONPATH="$PYYAML${PYTHONPATH:+:$PYTHONPATH}"
fi

say "run: the Dockerfile's build command on this tree"
cargo build --release --locked -p tidegate --bin tidegate
BIN="$CARGO_TARGET_DIR/release/tidegate"
ran+=("the build stage's cargo command on this tree ($(stat -c %s "$BIN" | awk '{printf "%.1f", $1 / 1e6}') MB binary)")
say "run: scripts/build-plugins.sh (the plugins compose mounts from target/plugins)"
log=$(mktemp)
"$ROOT/scripts/build-plugins.sh" >/dev/null 2>"$log" || { cat "$log" >&2; rm -f "$log"; exit 1; }
rm -f "$log"

say "checking the Dockerfile, its context, the binary, compose.yaml and its config"
python3 "$ROOT/scripts/check-deploy.py" static "$BIN"
checked_only+=("the Dockerfile's COPY sources and the context they lay out; its entrypoint and user"
  "the binary's libraries and glibc against distroless/cc-debian12"
  "compose.yaml's builds, mounts, volumes, dependencies; its config against its topology, and tidegate check on it")

# ---- container engine -----------------------------------------------------------------------
if [ "${CHECK_DEPLOY_INSTALL:-0}" = 1 ] && ! { command -v podman && command -v runc; } >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    say "installing podman and runc (Debian packages)"
    { apt-get update -qq && apt-get install -y -qq podman runc; } >/dev/null ||
      say "could not install podman and runc; the container part is not run"
  else
    say "need root to apt-get install podman runc; the container part is not run"
  fi
fi
engine=""
for candidate in docker podman; do
  if command -v "$candidate" >/dev/null && timeout 30 "$candidate" info >/dev/null 2>&1; then
    engine=$candidate
    break
  fi
done

# How containers start here: as the engine does by default, or (podman in a container with a
# hybrid cgroup hierarchy and capped rlimits, like the build machines) with runc, cgroupfs and
# limits it may set.
engine_opts=() run_opts=(--network none)
container_runs() {
  timeout 120 "$engine" "${engine_opts[@]}" run --rm "${run_opts[@]}" "$@" >/dev/null 2>&1
}

if [ -z "$engine" ]; then
  not_run+=("any container: no working docker or podman here (CHECK_DEPLOY_INSTALL=1 tries podman)")
else
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  eval "$(python3 "$ROOT/scripts/check-deploy.py" final)"
  image=localhost/tidegate-check-deploy:latest
  registries_reachable() {
    local url
    for url in https://registry-1.docker.io/v2/ https://gcr.io/v2/; do
      curl -s -o /dev/null --max-time 10 "$url" || return 1
    done
  }
  # Building the real image compiles wasmtime inside the container (20+ minutes on two cores):
  # only on request, never inside the test suite's time budget.
  if [ "${CHECK_DEPLOY_BUILD:-0}" = 1 ] && registries_reachable; then
    say "run: $engine build -f deploy/Dockerfile (base images reachable)"
    "$engine" build -f deploy/Dockerfile -t "$image" .
    ran+=("$engine build -f deploy/Dockerfile: the real image")
    what="the image built from deploy/Dockerfile"
  else
    say "base images cannot be pulled here: assembling the runtime stage from this machine"
    rootfs="$work/rootfs"
    install -D -m 0755 "$BIN" "$rootfs$FINAL_BINARY"
    for lib in $(ldd "$BIN" | grep -o '/[^ ]*'); do
      install -D -m 0755 "$(readlink -f "$lib")" "$rootfs$lib"
    done
    install -D -m 0644 /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
    # distroless's users and folders (base/nonroot): root, nobody, nonroot (65532).
    printf '%s\n' 'root:x:0:0:root:/root:/sbin/nologin' \
      'nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin' \
      'nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin' >"$work/passwd"
    printf '%s\n' 'root:x:0:' 'nobody:x:65534:' 'nonroot:x:65532:' >"$work/group"
    install -D -m 0644 "$work/passwd" "$rootfs/etc/passwd"
    install -D -m 0644 "$work/group" "$rootfs/etc/group"
    install -d -m 0700 -o 65532 -g 65532 "$rootfs/home/nonroot"
    install -d -m 1777 "$rootfs/tmp"
    tar -C "$rootfs" -cf "$work/rootfs.tar" .
    "$engine" import --change "USER $FINAL_USER" --change "ENTRYPOINT $FINAL_ENTRYPOINT" \
      --change "CMD $FINAL_CMD" --change "WORKDIR /home/nonroot" "$work/rootfs.tar" "$image" \
      >"$work/import.log" 2>&1 || { cat "$work/import.log" >&2; exit 1; }
    what="the runtime stage assembled from this machine (in place of $FINAL_BASE)"
    not_run+=("the build stage in a container, and the image on the real distroless base ($FINAL_BASE and rust:1-bookworm cannot be pulled here)")
  fi
  if ! container_runs "$image" --help; then
    engine_opts=(--cgroup-manager=cgroupfs)
    command -v runc >/dev/null && engine_opts+=(--runtime runc)
    run_opts+=(--ulimit nofile=1024:1024 --ulimit nproc=1024:1024)
    if ! container_runs "$image" --help; then
      # The engine installed but cannot start containers in this sandbox: a fact about the
      # machine, not about the image, so it is reported rather than failed.
      say "$engine cannot start containers here:"
      "$engine" "${engine_opts[@]}" run --rm "${run_opts[@]}" "$image" --help 2>&1 | tail -3 || true
      not_run+=("any container: $engine is installed but cannot start one on this machine")
      engine=""
    fi
  fi
fi

if [ -n "$engine" ]; then
  user=$("$engine" image inspect --format '{{.Config.User}}' "$image")
  [ "$user" = "$FINAL_USER" ] || { say "FAIL: the image runs as '$user', not '$FINAL_USER'"; exit 1; }
  say "run: $what, as compose runs it (its mounts, read-only), as $user"
  out=$("$engine" "${engine_opts[@]}" run --rm "${run_opts[@]}" "${FINAL_MOUNTS[@]}" \
    "$image" check --config "$FINAL_CONFIG" 2>&1) || { say "FAIL: check in the container: $out"; exit 1; }
  say "  $out"
  # Read the whole output before matching: `| grep -q` would close the pipe at the first match,
  # and the engine then fails writing the rest (broken pipe), failing the check under pipefail.
  help=$("$engine" "${engine_opts[@]}" run --rm "${run_opts[@]}" "$image" --help 2>&1) ||
    { say "FAIL: --help in the container: $help"; exit 1; }
  grep -q '^Usage: tidegate' <<<"$help" || { say "FAIL: --help in the container printed: $help"; exit 1; }
  ran+=("$what: --help, and check on compose's mounted config as user $user ($engine)")
  not_run+=("the compose quickstart itself (compose up with the mongo and nats images)")
  "$engine" "${engine_opts[@]}" rmi -f "$image" >/dev/null 2>&1 || true
fi

say "summary"
for line in "${ran[@]}"; do say "  ran:          $line"; done
for line in "${checked_only[@]}"; do say "  checked only: $line"; done
for line in "${not_run[@]}"; do say "  not run:      $line"; done
