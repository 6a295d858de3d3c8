#!/usr/bin/env bash
# Two builds of the gateway in one run: idle connections (memory per
# connection, handshake rate beside raw TCP accepts) and channel fan-out
# (one message to every subscriber, then a sustained rate), alternating
# between the builds round after round so both see the same machine.
#
#   tools/switchboard-bench/compare/builds.sh BEFORE_BIN AFTER_BIN [ROUNDS] [CONNECTIONS]
#
# BEFORE_BIN and AFTER_BIN are `switchboard` binaries (build the older one
# from a git worktree with its own CARGO_TARGET_DIR). ROUNDS defaults to 2,
# CONNECTIONS (clients, and subscribers) to 17500 (what one gateway takes
# under a 20,000-file limit). The bench itself is
# $BENCH, or target/release/switchboard-bench. JSON results go to
# $OUT (default $CARGO_TARGET_DIR/bench/builds, or target/bench/builds); a
# table of medians is printed at the end.
set -euo pipefail
cd "$(dirname "$0")/../../.."

if [[ $# -lt 2 ]]; then
    sed -n '2,14p' "$0" >&2
    exit 64
fi
before=$1
after=$2
rounds=${3:-2}
n=${4:-17500}
target="${CARGO_TARGET_DIR:-target}"
bench="${BENCH:-$target/release/switchboard-bench}"
out="${OUT:-$target/bench/builds}"
for bin in "$before" "$after" "$bench"; do
    if [[ ! -x "$bin" ]]; then
        echo "builds.sh: $bin is not an executable" >&2
        exit 66
    fi
done
mkdir -p "$out"

for round in $(seq 1 "$rounds"); do
    for which in before after; do
        bin=$before
        [[ $which == after ]] && bin=$after
        echo "=== round $round: $which ($bin)" >&2
        "$bench" idle --connections "$n" --gateway-bin "$bin" \
            --json "$out/idle-$which-$round.json"
        "$bench" fanout --subscribers "$n" --gateway-bin "$bin" \
            --json "$out/fanout-$which-$round.json"
    done
done

python3 - "$out" "$rounds" <<'EOF'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def load(kind, which):
    return [json.load(open(f"{out}/{kind}-{which}-{r}.json")) for r in range(1, rounds + 1)]
rows = [
    ("idle RSS per connection (B)", "idle", lambda j: j["rss_per_connection"]),
    ("handshakes per second", "idle", lambda j: j["handshakes"]["rate"]),
    ("raw TCP accepts per second (same clients)", "idle",
     lambda j: (j.get("tcp_baseline") or {}).get("rate", float("nan"))),
    ("fan-out, one message: p99 delivery (ms)", "fanout",
     lambda j: j["single"]["delivery_latency_ms"]["p99"]),
    ("fan-out sustained deliveries per second", "fanout",
     lambda j: j["sustained"]["deliveries_per_second"]),
]
print(f"| What (median of {rounds}) | before | after | each run (before; after) |")
print("|---|---|---|---|")
for name, kind, get in rows:
    b = [get(j) for j in load(kind, "before")]
    a = [get(j) for j in load(kind, "after")]
    fmt = lambda xs: ", ".join(f"{x:,.0f}" for x in xs)
    print(f"| {name} | {statistics.median(b):,.0f} | {statistics.median(a):,.0f} "
          f"| {fmt(b)}; {fmt(a)} |")
problems = [
    (f, p) for kind in ("idle", "fanout") for which in ("before", "after")
    for r, j in enumerate(load(kind, which), 1) for p in j.get("problems", [])
    for f in [f"{kind}-{which}-{r}"]
]
for f, p in problems:
    print(f"problem in {f}: {p}")
EOF
