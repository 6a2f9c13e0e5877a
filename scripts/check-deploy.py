#!/usr/bin/env python3
"""The static half of scripts/check-deploy.sh: what can be checked about deploy/ without a
container engine that can pull images.

    check-deploy.py stage DIR            lay out the Dockerfile's build context in DIR
    check-deploy.py final                the runtime stage as shell assignments (FINAL_BASE,
                                         _USER, _ENTRYPOINT and _CMD as JSON, _BINARY: where it
                                         is copied, _CONFIG: the CMD's config) and the compose
                                         service's bind mounts (FINAL_MOUNTS, `-v` arguments)
    check-deploy.py static BINARY        Dockerfile, staged context, the built binary, compose
                                         and the config it mounts (`BINARY check` on it)

Every line it prints starts with `checked:` (verified here) or `FAIL:`; it exits 1 on any
failure. The shell script says what was *run*.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"

# What gcr.io/distroless/cc-debian12 provides: glibc 2.36 and libgcc (plus libstdc++,
# libgomp and OpenSSL 3). A binary needing anything else would not start in the image.
DISTROLESS_CC_LIBS = {
    "libc.so.6", "libm.so.6", "libgcc_s.so.1", "libpthread.so.0", "libdl.so.2",
    "librt.so.1", "ld-linux-x86-64.so.2", "libstdc++.so.6", "libgomp.so.1",
    "libssl.so.3", "libcrypto.so.3",
}
DISTROLESS_GLIBC = (2, 36)
NONROOT_UID = 65532

failures = []


def checked(message):
    print(f"checked: {message}")


def fail(message):
    failures.append(message)
    print(f"FAIL: {message}")


# ---------------------------------------------------------------------------------------------
# Dockerfile


def instructions(path):
    """(instruction, arguments) pairs, continuations joined and comments dropped."""
    out, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def stages(path):
    """The Dockerfile's stages: dicts with base, name, workdir, copies, runs, user, entrypoint,
    cmd, expose."""
    result = []
    for word, args in instructions(path):
        if word == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            result.append({"base": parts[0], "name": name, "workdir": "/", "copies": [],
                           "runs": [], "user": None, "entrypoint": None, "cmd": None,
                           "expose": []})
            continue
        stage = result[-1]
        if word == "WORKDIR":
            stage["workdir"] = args
        elif word == "COPY":
            parts = args.split()
            flags = [p for p in parts if p.startswith("--")]
            paths = [p for p in parts if not p.startswith("--")]
            source_stage = next((f.split("=", 1)[1] for f in flags if f.startswith("--from=")),
                                None)
            stage["copies"].append({"from": source_stage, "sources": paths[:-1],
                                    "dest": paths[-1]})
        elif word == "RUN":
            stage["runs"].append(args)
        elif word == "USER":
            stage["user"] = args
        elif word in ("ENTRYPOINT", "CMD"):
            stage[word.lower()] = json.loads(args)
        elif word == "EXPOSE":
            stage["expose"] += args.split()
    return result


def ignore_patterns():
    path = ROOT / ".dockerignore"
    if not path.is_file():
        return []
    lines = [l.strip() for l in path.read_text().splitlines()]
    return [l for l in lines if l and not l.startswith("#")]


def pattern_regex(pattern):
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + "$")


def ignored(relative, patterns):
    """Whether .dockerignore leaves `relative` (or a folder above it) out of the context."""
    parts = relative.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = pattern_regex(pattern.lstrip("!").strip("/"))
        if any(regex.match(p) for p in prefixes):
            excluded = not negate
    return excluded


def build_stage(all_stages):
    return next(s for s in all_stages if s["runs"])


def stage_context(into):
    """Copies what the build stage's COPY lines take from the context into `into`, at their
    destinations under WORKDIR, leaving out what .dockerignore excludes."""
    patterns = ignore_patterns()
    stage = build_stage(stages(DOCKERFILE))
    for copy in stage["copies"]:
        if copy["from"]:
            continue
        for source in copy["sources"]:
            src = ROOT / source
            if not src.exists():
                fail(f"Dockerfile: COPY {source}: no such file or folder in the context")
                continue
            dest = Path(into) / os.path.relpath(
                os.path.join(stage["workdir"], copy["dest"]), stage["workdir"])
            if src.is_dir():
                for path in sorted(src.rglob("*")):
                    relative = path.relative_to(ROOT).as_posix()
                    if ignored(relative, patterns) or path.is_dir() and not path.is_symlink():
                        continue
                    target = dest / path.relative_to(src)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    if path.is_symlink():
                        target.symlink_to(os.readlink(path))
                    else:
                        shutil.copy2(path, target)
            else:
                target = dest / src.name if copy["dest"].endswith("/") else dest
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, target)
    return stage


def check_dockerfile(binary):
    all_stages = stages(DOCKERFILE)
    build = build_stage(all_stages)
    final = all_stages[-1]
    checked(f"Dockerfile: {len(all_stages)} stages, build on {build['base']}, "
            f"run on {final['base']}")
    for copy in build["copies"]:
        for source in copy["sources"]:
            if (ROOT / source).exists():
                checked(f"Dockerfile: COPY {source} exists in the context")
    run = " ".join(build["runs"])
    if "cargo build --release --locked -p tidegate --bin tidegate" not in run:
        fail(f"Dockerfile: the build stage's command changed; update check-deploy: {run}")
    # The final stage: a binary copied from the build stage, run by the entrypoint, as non-root.
    copied = [c for c in final["copies"] if c["from"] == build["name"]]
    destinations = {c["dest"] for c in copied}
    entry = (final["entrypoint"] or [""])[0]
    if entry in destinations:
        checked(f"Dockerfile: ENTRYPOINT {entry} is the binary copied from the build stage")
    else:
        fail(f"Dockerfile: ENTRYPOINT {entry} is not what the build stage's COPY writes "
             f"({sorted(destinations)})")
    built = {c["sources"][0] for c in copied}
    if not any(out in run for out in built):
        fail(f"Dockerfile: the build stage does not write {sorted(built)}")
    user = (final["user"] or "root").split(":")[0]
    if user in ("root", "0"):
        fail("Dockerfile: the image runs as root")
    elif final["base"].endswith(":nonroot") and user in ("nonroot", str(NONROOT_UID)):
        checked(f"Dockerfile: runs as {final['user']} (uid {NONROOT_UID} in distroless "
                f":nonroot), not root")
    else:
        fail(f"Dockerfile: USER {final['user']} is not distroless's nonroot user")
    check_binary(binary)
    return final


def check_binary(binary):
    size = binary.stat().st_size
    checked(f"binary {binary}: {size / 1e6:.1f} MB")
    dynamic = subprocess.run(["readelf", "-d", "--wide", str(binary)], capture_output=True,
                             text=True, check=True).stdout
    needed = set(re.findall(r"\(NEEDED\).*\[(.+)\]", dynamic))
    if needed - DISTROLESS_CC_LIBS:
        fail(f"binary needs libraries distroless/cc lacks: {sorted(needed - DISTROLESS_CC_LIBS)}")
    else:
        checked(f"binary needs only libraries distroless/cc-debian12 has: {sorted(needed)}")
    versions = subprocess.run(["readelf", "-V", "--wide", str(binary)], capture_output=True,
                              text=True, check=True).stdout
    glibc = sorted({tuple(int(n) for n in v.split("."))
                    for v in re.findall(r"GLIBC_([0-9.]+[0-9])", versions)})
    if glibc and glibc[-1] > DISTROLESS_GLIBC:
        fail(f"binary needs glibc {glibc[-1]}, distroless/cc-debian12 has 2.36")
    elif glibc:
        checked(f"binary needs glibc {'.'.join(map(str, glibc[-1]))} at most "
                f"(distroless/cc-debian12: 2.36)")


def check_staged(into):
    """The staged context is a complete workspace: its manifests resolve with the lock file
    and every file the sources embed (include_bytes!/include_str!) is in it."""
    host = subprocess.run(["rustc", "--print", "host-tuple"], capture_output=True, text=True,
                          check=True).stdout.strip()
    meta = subprocess.run(["cargo", "metadata", "--format-version", "1", "--locked",
                           "--offline", "--filter-platform", host], cwd=into,
                          capture_output=True, text=True)
    if meta.returncode != 0:
        fail(f"staged context: cargo metadata fails: {meta.stderr.strip()[-600:]}")
        return
    members = [p["name"] for p in json.loads(meta.stdout)["packages"]
               if p["source"] is None]
    checked(f"staged context: the workspace resolves with Cargo.lock (--locked), "
            f"members {sorted(members)}")
    embedded = 0
    for source in Path(into).rglob("*.rs"):
        for path in re.findall(r'include_(?:bytes|str)!\(\s*"([^"]+)"', source.read_text()):
            embedded += 1
            if not (source.parent / path).is_file():
                fail(f"staged context: {source.relative_to(into)} embeds {path}, "
                     "which the Dockerfile does not copy")
    checked(f"staged context: all {embedded} files the sources embed are copied")


# ---------------------------------------------------------------------------------------------
# compose.yaml and the config it mounts


def check_compose(final, tidegate):
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    checked(f"compose.yaml parses: services {sorted(services)}, "
            f"volumes {sorted(compose.get('volumes') or {})}")
    named = set(compose.get("volumes") or {})
    mounts = {}
    for name, service in services.items():
        for dep in service.get("depends_on") or []:
            if dep not in services:
                fail(f"compose: {name} depends on unknown service {dep}")
        build = service.get("build")
        if build:
            context = (DEPLOY / build["context"]).resolve()
            dockerfile = context / build["dockerfile"]
            if context != ROOT or dockerfile.resolve() != DOCKERFILE:
                fail(f"compose: {name} builds {dockerfile}, not {DOCKERFILE} in {ROOT}")
            else:
                checked(f"compose: {name} builds deploy/Dockerfile from the repository root")
        for volume in service.get("volumes") or []:
            source, target = volume.split(":")[:2]
            if source.startswith((".", "/")):
                host = (DEPLOY / source).resolve()
                if not host.exists():
                    fail(f"compose: {name} mounts {source}, which does not exist")
                else:
                    checked(f"compose: {name} mounts {source} ({host}) at {target}")
                mounts[target] = host
            elif source not in named:
                fail(f"compose: {name} uses volume {source}, not declared")
    tidegate_service = next(s for s in services.values() if s.get("build"))
    config_path = next(a for a in final["cmd"] if a.endswith(".toml"))
    if config_path not in mounts:
        fail(f"compose: nothing is mounted at {config_path}, where the image's CMD reads its config")
        return
    config = tomllib.loads(mounts[config_path].read_text())
    checked(f"compose: the image's CMD reads {config_path}, which compose mounts")
    plugins = mounts.get(config.get("plugin_dir"))
    if plugins is None:
        fail(f"config: plugin_dir {config.get('plugin_dir')} is not a folder compose mounts")
        return
    checked(f"config: plugin_dir {config['plugin_dir']} is the compose mount of {plugins}")
    check_topology(config, services, tidegate_service)
    check_config(mounts[config_path], plugins, tidegate)


def host_of(address):
    return address.split("@")[-1].split("/")[0].rsplit(":", 1)


def check_topology(config, services, tidegate_service):
    """The config names the compose services, ports and replica set."""
    host, port = host_of(config["nats"]["url"].split("://", 1)[1])
    nats = services.get(host)
    if nats is None:
        fail(f"config: nats.url names {host}, not a compose service")
    else:
        checked(f"config: nats.url {host}:{port} is the compose service {host}, "
                f"JetStream on: {'-js' in nats.get('command', [])}")
    for pipeline in config["pipeline"]:
        uri = pipeline["mongodb_uri"]
        seeds = uri.split("://", 1)[1].split("/")[0].split(",")
        replica_set = re.search(r"replicaSet=([^&]+)", uri)
        for seed in seeds:
            name, seed_port = seed.rsplit(":", 1)
            service = services.get(name)
            if service is None or seed_port != "27017":
                fail(f"config: pipeline {pipeline['id']}: {seed} is not a compose mongod")
                continue
            command = service.get("command", [])
            if replica_set and replica_set.group(1) not in command:
                fail(f"config: {name} does not run replica set {replica_set.group(1)}")
        init = json.dumps(services.get("mongo-init", {}))
        if not all(f"{s}" in init for s in seeds):
            fail(f"compose: mongo-init does not initiate every seed of {pipeline['id']}")
        checked(f"config: pipeline {pipeline['id']}'s seeds {seeds} are the compose mongods "
                f"of replica set {replica_set.group(1) if replica_set else '?'}, "
                "initiated by mongo-init")
    http = config.get("http", {}).get("address", "")
    exposed = [str(p) for p in tidegate_service.get("expose", [])]
    if http and http.rsplit(":", 1)[1] not in exposed:
        fail(f"config: http.address {http} is not exposed by compose ({exposed})")
    elif http:
        checked(f"config: http.address {http} is exposed by compose")


def check_config(path, plugins, tidegate):
    """`tidegate check` on the mounted config, with plugin_dir pointing at the folder compose
    mounts there (the one rewrite: the container path does not exist on this machine)."""
    text = path.read_text()
    rewritten = re.sub(r'^plugin_dir = ".*"$', f'plugin_dir = "{plugins.resolve()}"', text,
                       count=1, flags=re.M)
    with tempfile.NamedTemporaryFile("w", suffix=".toml") as copy:
        copy.write(rewritten)
        copy.flush()
        out = subprocess.run([str(tidegate), "check", "--config", copy.name],
                             capture_output=True, text=True)
    if out.returncode != 0:
        fail(f"tidegate check {path.name}: {(out.stdout + out.stderr).strip()}")
    else:
        checked(f"tidegate check {path.relative_to(ROOT)} (plugin_dir -> {plugins}): "
                f"{out.stdout.strip()}")


def main(argv):
    if len(argv) == 3 and argv[1] == "stage":
        stage_context(argv[2])
    elif len(argv) == 2 and argv[1] == "final":
        all_stages = stages(DOCKERFILE)
        final, build = all_stages[-1], build_stage(all_stages)
        binary = next(c["dest"] for c in final["copies"] if c["from"] == build["name"])
        for key, value in [("BASE", final["base"]), ("USER", final["user"] or "root"),
                           ("ENTRYPOINT", json.dumps(final["entrypoint"])),
                           ("CMD", json.dumps(final["cmd"])), ("BINARY", binary),
                           ("CONFIG", next(a for a in final["cmd"] if a.endswith(".toml")))]:
            print(f"FINAL_{key}={shlex.quote(value)}")
        # The tidegate service's bind mounts, as `run -v` arguments.
        compose = yaml.safe_load(COMPOSE.read_text())
        service = next(s for s in compose["services"].values() if s.get("build"))
        mounts = []
        for volume in service.get("volumes") or []:
            source, rest = volume.split(":", 1)
            if source.startswith((".", "/")):
                mounts += ["-v", f"{(DEPLOY / source).resolve()}:{rest}"]
        print(f"FINAL_MOUNTS=({' '.join(shlex.quote(m) for m in mounts)})")
    elif len(argv) == 3 and argv[1] == "static":
        binary = Path(argv[2])
        final = check_dockerfile(binary)
        with tempfile.TemporaryDirectory() as staged:
            stage_context(staged)
            check_staged(staged)
        check_compose(final, binary)
    else:
        sys.exit(__doc__)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
