#!/usr/bin/env bash
# Three Switchboard nodes on one machine, joined by NATS, with the echo origin
# (which greets each client with its connection id). See docs/cluster.md.
#
#   bash examples/cluster/three-nodes.sh        # Ctrl-C stops everything
#
# Node a: ws://127.0.0.1:8080, control http://127.0.0.1:8081
# Node b: ws://127.0.0.1:8090, control http://127.0.0.1:8091
# Node c: ws://127.0.0.1:8100, control http://127.0.0.1:8101
# NATS:   $NATS_URL, or a nats-server -js started here on port 4222.
# PROFILE=debug uses debug builds.
set -euo pipefail
cd "$(dirname "$0")/../.."
profile=${PROFILE:-release}
flag=$([ "$profile" = release ] && echo --release || true)
cargo build $flag -q -p switchboard -p switchboard-examples
bin=target/$profile
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

if [ -z "${NATS_URL:-}" ]; then
    store=$(mktemp -d)
    nats-server -a 127.0.0.1 -p 4222 -js -sd "$store" >"$store/nats.log" 2>&1 &
    pids+=($!)
    NATS_URL=nats://127.0.0.1:4222
    for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/4222) 2>/dev/null && break; sleep 0.1; done
fi

"$bin/echo-origin" --listen 127.0.0.1:3000 --greet &
pids+=($!)

port=8080
for node in a b c; do
    "$bin/switchboard" serve --nats "$NATS_URL" --node-id "$node" \
        --origin http://127.0.0.1:3000/events \
        --listen "127.0.0.1:$port" --control-listen "127.0.0.1:$((port + 1))" \
        --log-format text &
    pids+=($!)
    port=$((port + 10))
done

for _ in $(seq 50); do
    nodes=$(curl -sf 127.0.0.1:8081/v1/nodes || true)
    case "$nodes" in *'"node":"c"'*) break ;; esac
    sleep 0.2
done
echo
echo "GET /v1/nodes on node a: $nodes"
echo "Connect a client to any node (it is told its id), then send to it through another, e.g.:"
echo "  curl -X POST 127.0.0.1:8081/v1/connections/<id>/messages -d '{\"text\":\"hi\"}'"
wait
