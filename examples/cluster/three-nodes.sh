#!/usr/bin/env bash
# Three Switchboard nodes on one machine, joined by NATS, with the echo origin
# (which greets each client with its connection id). See docs/cluster.md.
#
#   bash examples/cluster/three-nodes.sh        # Ctrl-C stops everything
#
# Ports come from the environment (defaults in brackets):
#   BASE_PORT [8080]    node a: ws BASE_PORT, control BASE_PORT+1;
#                       node b: BASE_PORT+10, +11; node c: BASE_PORT+20, +21
#   ORIGIN_PORT [3000]  the echo origin
#   NATS_PORT [4222]    the nats-server started here, unless NATS_URL names one
# PROFILE=debug uses debug builds. Binaries are taken from where cargo puts
# them (CARGO_TARGET_DIR and .cargo/config.toml are honoured).
set -euo pipefail
cd "$(dirname "$0")/../.."
base=${BASE_PORT:-8080}
origin_port=${ORIGIN_PORT:-3000}
nats_port=${NATS_PORT:-4222}
profile=${PROFILE:-release}
die() { echo "three-nodes.sh: $*" >&2; exit 1; }

command -v cargo >/dev/null || die "cargo is not installed (https://rustup.rs)"
command -v curl >/dev/null || die "curl is not installed (apt-get install curl)"
if [ -z "${NATS_URL:-}" ]; then
    command -v nats-server >/dev/null ||
        die "nats-server is not installed: apt-get install nats-server (or set NATS_URL to a running one)"
fi

flag=()
[ "$profile" = release ] && flag=(--release)
echo "== building switchboard and the echo origin ($profile; the first build takes a few minutes)"
cargo build "${flag[@]}" -p switchboard -p switchboard-examples
target_dir=$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
bin=$target_dir/$profile
for b in switchboard echo-origin; do
    [ -x "$bin/$b" ] || die "$bin/$b was not built"
done

logs=$(mktemp -d)
pids=()
cleanup() {
    [ ${#pids[@]} -gt 0 ] && kill "${pids[@]}" 2>/dev/null || true
    wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# `started NAME PID URL`: waits up to 10 s for URL to answer; if the process
# exits or never answers, prints its log and stops everything.
started() {
    local name=$1 pid=$2 url=$3
    for _ in $(seq 100); do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "--- $logs/$name.log" >&2
            tail -n 20 "$logs/$name.log" >&2
            die "$name exited at startup (port taken? see its log above)"
        fi
        curl -sf -o /dev/null "$url" && return 0
        sleep 0.1
    done
    tail -n 20 "$logs/$name.log" >&2
    die "$name did not answer $url within 10 s"
}

if [ -z "${NATS_URL:-}" ]; then
    nats-server -a 127.0.0.1 -p "$nats_port" -m "$((nats_port + 4000))" -js -sd "$logs/nats" >"$logs/nats.log" 2>&1 &
    pids+=($!)
    started nats "$!" "http://127.0.0.1:$((nats_port + 4000))/healthz"
    NATS_URL=nats://127.0.0.1:$nats_port
fi
echo "== NATS: $NATS_URL"

"$bin/echo-origin" --listen "127.0.0.1:$origin_port" --greet >"$logs/origin.log" 2>&1 &
pids+=($!)
origin_pid=$!
for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$origin_port") 2>/dev/null && break
    kill -0 "$origin_pid" 2>/dev/null || { cat "$logs/origin.log" >&2; die "the echo origin exited (port $origin_port taken? set ORIGIN_PORT)"; }
    sleep 0.1
done
echo "== echo origin: http://127.0.0.1:$origin_port/events"

port=$base
for node in a b c; do
    "$bin/switchboard" serve --nats "$NATS_URL" --node-id "$node" \
        --origin "http://127.0.0.1:$origin_port/events" \
        --listen "127.0.0.1:$port" --control-listen "127.0.0.1:$((port + 1))" \
        --log-format text >"$logs/node-$node.log" 2>&1 &
    pids+=($!)
    started "node-$node" "$!" "http://127.0.0.1:$((port + 1))/readyz"
    echo "== node $node: ws://127.0.0.1:$port, control http://127.0.0.1:$((port + 1))"
    port=$((port + 10))
done

nodes=
for _ in $(seq 50); do
    nodes=$(curl -sf "127.0.0.1:$((base + 1))/v1/nodes" || true)
    case "$nodes" in *'"node":"a"'*'"node":"b"'*'"node":"c"'*) break ;; esac
    sleep 0.2
done
case "$nodes" in
    *'"node":"a"'*'"node":"b"'*'"node":"c"'*) ;;
    *) die "the nodes did not see each other within 10 s; GET /v1/nodes said: ${nodes:-nothing} (logs in $logs)" ;;
esac
echo
echo "GET /v1/nodes on node a: $nodes"
echo "Logs: $logs"
echo
echo "Connect a client to any node; the origin greets it with its connection id."
echo "In a browser console:"
echo "  ws = new WebSocket('ws://127.0.0.1:$((base + 10))/'); ws.onmessage = (e) => console.log(e.data)"
echo "or with Python (pip install websockets):"
echo "  python3 -m websockets ws://127.0.0.1:$((base + 10))/"
echo "then send to it through another node:"
echo "  curl -X POST 127.0.0.1:$((base + 1))/v1/connections/<id>/messages -d '{\"text\":\"hi\"}'"
wait
