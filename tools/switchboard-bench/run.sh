#!/usr/bin/env bash
# Reproduces the figures of docs/benchmarks.md: builds the gateway, the echo
# origin and the bench tool, then runs the scenarios (`cross-node` and the
# cluster fan-out only if nats-server is on the PATH; `fanout` measures nginx + nchan beside the
# gateway when both are installed, and says so when they are not: Debian
# `apt-get install -y nginx libnginx-mod-nchan`). Results go to
# target/bench/*.json.
#
#   tools/switchboard-bench/run.sh            # as documented
#   tools/switchboard-bench/run.sh --sysctl   # also raise somaxconn and the port range (root)
#
# Everything runs on loopback. The tool itself needs none of the sysctls: it
# spreads clients over 16 source addresses, so the default port range is plenty.
set -euo pipefail
cd "$(dirname "$0")/../.."

if [[ "${1:-}" == "--sysctl" ]]; then
    sysctl -w net.core.somaxconn=65535
    sysctl -w net.ipv4.ip_local_port_range="1024 65535"
fi

cargo build --release -p switchboard -p switchboard-examples -p switchboard-bench
bench=target/release/switchboard-bench

"$bench" idle --connections 19000 --out target/bench/idle.json
"$bench" idle --connections 19000 --steps 4 --no-tcp-baseline --out target/bench/idle-steps.json
"$bench" echo --clients 100 --size 64 --duration 10s --out target/bench/echo.json
"$bench" echo --clients 100 --size 4096 --duration 10s --out target/bench/echo-4k.json

# Channel fan-out: 19,000 subscribers on one channel, Switchboard and nchan.
"$bench" fanout --subscribers 19000 --out target/bench/fanout.json
# The same over a cluster: 100,000 subscribers on six nodes joined by NATS
# (nats-server with JetStream, started by the tool), nchan with 19,000 beside it.
if command -v nats-server >/dev/null; then
    "$bench" fanout --nodes 6 --subscribers 100000 --out target/bench/fanout-cluster.json
else
    echo "run.sh: nats-server is not on the PATH; skipping the cluster fan-out" >&2
fi

if command -v nats-server >/dev/null; then
    "$bench" cross-node --clients 1000 --duration 10s --out target/bench/cross-node.json
    "$bench" cross-node --clients 1000 --duration 10s --rate 10000 --batch-rate 50 \
        --out target/bench/cross-node-paced.json
else
    echo "run.sh: nats-server is not on the PATH; skipping cross-node" >&2
fi
