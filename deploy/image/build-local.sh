#!/usr/bin/env bash
# Builds the Dockerfile's runtime stage with podman, without any registry:
# the binary is built on this host (cargo build --release) and the base image
# is made here, FROM scratch plus the shared libraries `ldd` finds, CA
# certificates and a passwd entry for the unprivileged user. Then it reports
# the image size and tries `podman run` (a container runtime inside a sandbox
# may refuse; the exact error is printed, then the run is retried with the
# host's rlimits and runc). Without systemd, podman logs errors about
# healthcheck timers: harmless, `podman healthcheck run` still works.
#
#   bash deploy/image/build-local.sh               # builds switchboard:local
#   SKIP_BUILD=1 BIN=/path/to/switchboard bash deploy/image/build-local.sh
#
# Environment: CARGO_TARGET_DIR (where cargo puts the binary; default
# ./target), BIN (use this binary instead), SKIP_BUILD=1 (do not run cargo),
# IMAGE (default switchboard:local), PORT (host port for the run, default
# 18080), CONTROL_PORT (default 18081).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
image=${IMAGE:-switchboard:local}
port=${PORT:-18080}
control_port=${CONTROL_PORT:-18081}
die() { echo "build-local.sh: $*" >&2; exit 1; }

command -v podman >/dev/null || die "podman is not installed (Debian: apt-get install podman)"
command -v ldd >/dev/null || die "ldd is not installed (Debian: apt-get install libc-bin)"

target_dir=${CARGO_TARGET_DIR:-$root/target}
bin=${BIN:-$target_dir/release/switchboard}
if [ -z "${SKIP_BUILD:-}" ] && [ -z "${BIN:-}" ]; then
    echo "== cargo build --release -p switchboard (target dir: $target_dir)"
    cargo build --release --locked -p switchboard
fi
[ -x "$bin" ] || die "no binary at $bin (build it, or set BIN)"
echo "== binary: $bin ($(stat -c %s "$bin") bytes)"

work=$root/deploy/image/.build
rm -rf "$work"
mkdir -p "$work/base/etc/ssl/certs" "$work/base/tmp" "$work/binary/out"
trap 'rm -rf "$work"' EXIT

# The base: every shared object the binary needs, at the path the loader
# looks for it (symlinks resolved), the loader itself, CA roots for NATS TLS
# and JWKS fetches, and the user the image runs as.
echo "== base: FROM scratch + the libraries ldd lists"
libs=$(ldd "$bin" | awk '/=> \// { print $3 } /^[ \t]*\/[^ ]+ \(/ { print $1 }' | sort -u)
[ -n "$libs" ] || die "ldd listed no libraries for $bin (a static binary needs no base: use FROM scratch directly)"
for lib in $libs; do
    mkdir -p "$work/base$(dirname "$lib")"
    cp -L "$lib" "$work/base$lib"
    echo "   $lib"
done
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    cp /etc/ssl/certs/ca-certificates.crt "$work/base/etc/ssl/certs/"
else
    echo "   (no /etc/ssl/certs/ca-certificates.crt on this host: the image has no CA roots)"
fi
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$work/base/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' >"$work/base/etc/group"
chmod 1777 "$work/base/tmp"
printf 'FROM scratch\nCOPY . /\n' >"$work/base/Containerfile"
podman build -q -t localhost/switchboard-base:local -f "$work/base/Containerfile" "$work/base" >/dev/null

# The binary as an image holding /out/switchboard, the path the Dockerfile's
# `binary` stage provides.
cp "$bin" "$work/binary/out/switchboard"
printf 'FROM scratch\nCOPY out/switchboard /out/switchboard\n' >"$work/binary/Containerfile"
podman build -q -t localhost/switchboard-binary:local -f "$work/binary/Containerfile" "$work/binary" >/dev/null

# The Dockerfile's own runtime stage, on these two.
echo "== podman build --target runtime (the Dockerfile's runtime stage)"
podman build --format docker -t "$image" --target runtime \
    --build-arg BINARY_SOURCE=localhost/switchboard-binary:local \
    --build-arg RUNTIME_BASE=localhost/switchboard-base:local \
    -f Dockerfile "$work/base"
size=$(podman image inspect "$image" --format '{{.Size}}')
echo "== image $image: $size bytes ($(( size / 1024 / 1024 )) MiB)"
podman image inspect "$image" --format 'user={{.Config.User}} stopsignal={{.Config.StopSignal}} entrypoint={{.Config.Entrypoint}} cmd={{.Config.Cmd}}'
podman history --format '{{.Size}}\t{{.CreatedBy}}' "$image" | awk '!/^0 B/ { print "   layer " $0 }'

# Run it: --version, then a node, its health check from inside, and a drain.
# Some sandboxes refuse podman's defaults: rlimits above the host's hard
# limits (podman asks for 1048576 open files), or crun with hybrid cgroups.
# Then the exact error is printed and the run retried with the host's limits
# and runc, when installed (apt-get install runc).
run_opts=()
echo "== podman run --rm $image --version"
if ! out=$(podman run --rm "$image" --version 2>&1); then
    echo "podman run with its defaults is refused here; the exact error:"
    echo "$out"
    run_opts=(--ulimit "nofile=$(ulimit -Hn):$(ulimit -Hn)" --ulimit "nproc=4096:4096")
    if command -v runc >/dev/null 2>&1; then run_opts+=(--runtime runc); fi
    echo "== retrying: podman run --rm ${run_opts[*]} $image --version"
    if ! out=$(podman run --rm "${run_opts[@]}" "$image" --version 2>&1); then
        echo "$out"
        echo "RESULT: image built ($size bytes); podman run refused (see above)"
        exit 2
    fi
fi
echo "$out"
echo "== podman run -d (ports $port and $control_port on the host)"
name=switchboard-local-$$
if ! cid=$(podman run "${run_opts[@]}" -d --name "$name" -p "127.0.0.1:$port:8080" -p "127.0.0.1:$control_port:8081" \
    -e SWITCHBOARD_CONTROL_LISTEN=0.0.0.0:8081 -e SWITCHBOARD_API_KEY=local-test-key-0123456789 \
    -e SWITCHBOARD_CONTROL_ALLOW_PLAINTEXT=true "$image" 2>&1); then
    echo "podman run -d failed:"
    echo "$cid"
    echo "RESULT: image built ($size bytes); --version ran; a detached node failed (see above)"
    exit 2
fi
trap 'podman rm -f "$name" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
healthy=
for _ in $(seq 50); do
    if curl -sf "http://127.0.0.1:$control_port/healthz" >/dev/null 2>&1; then healthy=1; break; fi
    sleep 0.2
done
[ -n "$healthy" ] || { podman logs "$name" 2>&1 | tail -20; die "the node did not answer /healthz on 127.0.0.1:$control_port"; }
echo "   /healthz from the host: $(curl -s "http://127.0.0.1:$control_port/healthz")"
echo "   switchboard healthcheck inside the container: $(podman exec "$name" /usr/local/bin/switchboard healthcheck 2>&1)"
if podman healthcheck run "$name" >/dev/null 2>&1; then
    echo "   the image's HEALTHCHECK (podman healthcheck run): healthy"
else
    echo "   the image's HEALTHCHECK (podman healthcheck run): $(podman healthcheck run "$name" 2>&1 || true)"
fi
echo "   whoami: uid $(podman top "$name" user huser 2>/dev/null | tail -n 1)"
started=$(date +%s%N)
podman stop -t 30 "$name" >/dev/null
elapsed=$(( ($(date +%s%N) - started) / 1000000 ))
status=$(podman inspect "$name" --format '{{.State.ExitCode}}')
echo "   podman stop: exit status $status after $elapsed ms; last log line:"
podman logs "$name" 2>&1 | tail -n 1 | cut -c1-300
[ "$status" = 0 ] || die "the node did not drain cleanly (exit $status)"
how="with podman's defaults"
[ ${#run_opts[@]} -gt 0 ] && how="with ${run_opts[*]} (the defaults were refused, see above)"
echo "RESULT: image built ($size bytes); podman run works $how; health check and SIGTERM drain OK"
