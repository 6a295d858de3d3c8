#!/usr/bin/env bash
# The benchmark curves: runs three small sweeps of switchboard-bench, one
# JSON file per run, then draws them with scripts/charts.py into
# docs/charts (memory.svg, fanout.svg, handshakes.svg).
#
#   scripts/curves.sh [OUT_DIR]        # JSON under OUT_DIR (default target/bench/curves)
#   SIZES="1000 5000" SUBSCRIBERS="1000 5000" scripts/curves.sh   # a quicker sweep
#
# 1. memory:     idle --connections N, for N in $SIZES (default 1000 5000 17500;
#                17,500 is what one gateway takes under a 20,000-file limit)
# 2. fanout:     fanout --floor --single-only --subscribers N, for N in
#                $SUBSCRIBERS (default 1000 2500 5000 10000 17500), $MESSAGES
#                single messages each (default 20), the gateway and the floor
#                server in the same run
# 3. handshakes: idle --concurrency C --connections $HANDSHAKE_CONNECTIONS
#                (default 5000) --hold 1s, for C in $CONCURRENCY (default
#                10 100 1000 4000; above 4096 needs a larger somaxconn)
#
# Every run is bounded by the bench itself (connect phase, single-message
# timeout, hold). A run that reports problems keeps its JSON (charts.py
# leaves it out) and the sweep goes on; the exit status is then 1.
# Needs a release build: cargo build --release -p switchboard -p switchboard-bench
set -euo pipefail
cd "$(dirname "$0")/.."

target="${CARGO_TARGET_DIR:-target}"
bench="${BENCH:-$target/release/switchboard-bench}"
out="${1:-$target/bench/curves}"
charts="${CHARTS:-docs/charts}"
sizes="${SIZES:-1000 5000 17500}"
subscribers="${SUBSCRIBERS:-1000 2500 5000 10000 17500}"
messages="${MESSAGES:-20}"
concurrency="${CONCURRENCY:-10 100 1000 4000}"
handshake_connections="${HANDSHAKE_CONNECTIONS:-5000}"
if [[ ! -x "$bench" ]]; then
    echo "curves.sh: no $bench; cargo build --release -p switchboard -p switchboard-bench" >&2
    exit 66
fi
mkdir -p "$out/memory" "$out/fanout" "$out/handshakes"

status=0
run() {
    echo "curves.sh: $*" >&2
    "$bench" "$@" || { status=1; echo "curves.sh: the run above reported problems" >&2; }
}

for n in $sizes; do
    run idle --connections "$n" --json "$out/memory/idle-$n.json"
done
for n in $subscribers; do
    run fanout --floor --single-only --subscribers "$n" --messages "$messages" \
        --json "$out/fanout/fanout-$n.json"
done
for c in $concurrency; do
    run idle --connections "$handshake_connections" --concurrency "$c" --hold 1s \
        --json "$out/handshakes/idle-c$c.json"
done

python3 scripts/charts.py --in "$out" --out "$charts"
exit "$status"
