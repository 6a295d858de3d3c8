#!/usr/bin/env bash
# Reproduces the figures of docs/benchmarks.md: builds the gateway, the echo
# origin and the bench, then runs every scenario at the documented scale.
# Results go to $CARGO_TARGET_DIR/bench/*.json (target/bench by default).
#
#   tools/switchboard-bench/run.sh            # as documented
#   tools/switchboard-bench/run.sh --sysctl   # also raise somaxconn and the port range (root)
#
# The cluster scenarios need nats-server on the PATH (with JetStream for the
# cluster fan-out); the nchan comparison needs nginx and its nchan module
# (Debian: apt-get install -y nginx libnginx-mod-nchan). Each is skipped with
# a message when missing. One gateway process takes 17,500 clients: under
# this machine's 20,000-file limit it keeps the rest of its descriptors for
# itself and for refusals (docs/operations.md#open-files). Everything runs on loopback; the clients spread over
# 16 source addresses, so the default ephemeral port range is plenty.
set -euo pipefail
cd "$(dirname "$0")/../.."

if [[ "${1:-}" == "--sysctl" ]]; then
    sysctl -w net.core.somaxconn=65535
    sysctl -w net.ipv4.ip_local_port_range="1024 65535"
fi

cargo build --release -p switchboard -p switchboard-examples -p switchboard-bench
target="${CARGO_TARGET_DIR:-target}"
bench="$target/release/switchboard-bench"
out="$target/bench"

"$bench" idle --connections 17500 --json "$out/idle.json"
"$bench" idle --connections 6000 --no-tcp-baseline --json "$out/idle-6k.json"
"$bench" idle --connections 6000 --no-tcp-baseline --tls --json "$out/idle-tls-6k.json"
"$bench" echo --clients 100 --size 64 --duration 10s --json "$out/echo.json"
"$bench" echo --clients 100 --size 4096 --duration 10s --json "$out/echo-4k.json"
"$bench" fanout --subscribers 17500 --json "$out/fanout.json"
"$bench" graphql --subscribers 17500 --inputs 10 --json "$out/graphql.json"

if command -v nginx >/dev/null; then
    BENCH="$bench" tools/switchboard-bench/compare/nchan.sh --subscribers 19000 \
        --json "$out/fanout-nchan.json"
else
    echo "run.sh: nginx is not installed; skipping the nchan comparison" >&2
fi

# HTTP fallbacks: idle memory per transport, fan-out to SSE subscribers
# (and nchan's EventSource ones when nginx is installed).
BENCH="$bench" tools/switchboard-bench/compare/fallbacks.sh 10000 10000

if command -v nats-server >/dev/null; then
    "$bench" fanout --nodes 6 --subscribers 100000 --json "$out/fanout-cluster.json"
    "$bench" cross-node --clients 1000 --duration 10s --json "$out/cross-node.json"
    "$bench" cross-node --clients 1000 --duration 10s --rate 10000 --batch-rate 50 \
        --json "$out/cross-node-paced.json"
else
    echo "run.sh: nats-server is not on the PATH; skipping the cluster scenarios" >&2
fi
