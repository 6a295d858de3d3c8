#!/usr/bin/env bash
# The HTTP fallbacks' costs in one run (docs/benchmarks.md#http-fallbacks):
#
# 1. `fallbacks`: gateway memory per idle native WebSocket connection, SSE
#    stream and long-poll session (a poll waiting, and between polls), each
#    transport on a gateway of its own;
# 2. `fanout` to WebSocket subscribers, then to SSE subscribers (the
#    gateway's plain EventSource), to bidirectional SSE subscribers (a
#    POSTed subscribe command), then nginx + nchan with EventSource
#    subscribers and with WebSocket ones (compare/nchan.sh), one after the
#    other with the same options;
# 3. a summary of the fan-out result files side by side.
#
#   tools/switchboard-bench/compare/fallbacks.sh [CONNECTIONS [SUBSCRIBERS]]   # 10000 10000
#
# Needs a release build of the gateway and the bench
# (cargo build --release -p switchboard -p switchboard-bench), python3, and
# for the nchan runs nginx with its nchan module (Debian: apt-get install -y
# nginx libnginx-mod-nchan; skipped with a message when missing). Results go
# to $CARGO_TARGET_DIR/bench (target/bench by default). A run that reports a
# problem does not stop the others; the exit status is then 1.
set -uo pipefail
root="$(cd "$(dirname "$0")/../../.." && pwd)"
target="${CARGO_TARGET_DIR:-$root/target}"
bench="${BENCH:-$target/release/switchboard-bench}"
[[ -x "$bench" ]] || { echo "fallbacks.sh: no $bench; cargo build --release -p switchboard -p switchboard-bench" >&2; exit 1; }
n="${1:-10000}"
s="${2:-10000}"
out="$target/bench"
mkdir -p "$out"
status=0
run() { "$@" || { echo "fallbacks.sh: failed or reported problems: $*" >&2; status=1; }; }

run "$bench" fallbacks --connections "$n" --json "$out/fallbacks-$n.json"
run "$bench" fanout --subscribers "$s" --json "$out/fanout-ws-$s.json"
run "$bench" fanout --transport sse --subscribers "$s" --json "$out/fanout-sse-$s.json"
run "$bench" fanout --transport sse-bidirectional --subscribers "$s" \
    --json "$out/fanout-sse-bidirectional-$s.json"
files=("$out/fanout-ws-$s.json" "$out/fanout-sse-$s.json" "$out/fanout-sse-bidirectional-$s.json")
if command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]]; then
    run env BENCH="$bench" "$root/tools/switchboard-bench/compare/nchan.sh" --transport sse \
        --subscribers "$s" --json "$out/fanout-nchan-es-$s.json"
    run env BENCH="$bench" "$root/tools/switchboard-bench/compare/nchan.sh" \
        --subscribers "$s" --json "$out/fanout-nchan-ws-$s.json"
    files+=("$out/fanout-nchan-es-$s.json" "$out/fanout-nchan-ws-$s.json")
else
    echo "fallbacks.sh: nginx is not installed; skipping nchan" >&2
fi

python3 - "${files[@]}" <<'PY'
import json, sys
runs = []
for path in sys.argv[1:]:
    try:
        runs.append(json.load(open(path)))
    except (OSError, ValueError) as e:
        print(f"fallbacks.sh: {path}: {e}", file=sys.stderr)
if not runs:
    sys.exit(0)
def cores(cpu, name):
    return next((c for g, c in cpu if g == name), 0.0)
rows = [
    ("server, subscribers", lambda r: f"{r['server']}, {r['transport']}"),
    ("subscribed", lambda r: f"{r['subscribe']['open']} in {r['subscribe']['seconds']:.2f} s"),
    ("PSS per subscriber", lambda r: f"{r['memory']['pss_per_subscriber']:.0f} B"),
    ("single: delivery p50 / p99 ms", lambda r: f"{r['single']['delivery_latency_ms']['p50']:.0f} / {r['single']['delivery_latency_ms']['p99']:.0f}"),
    ("single: all reached p50 / max ms", lambda r: f"{r['single']['all_reached_ms']['p50']:.0f} / {r['single']['all_reached_ms']['max']:.0f}"),
    ("sustained: published/s", lambda r: f"{r['sustained']['published_per_second']:.1f}"),
    ("sustained: deliveries/s", lambda r: f"{r['sustained']['deliveries_per_second']:.0f}"),
    ("sustained: latency p50 / p99 ms", lambda r: f"{r['sustained']['latency_ms']['p50']:.0f} / {r['sustained']['latency_ms']['p99']:.0f}"),
    ("sustained: lost / late", lambda r: f"{r['sustained']['lost']} / {r['sustained']['late']}"),
    ("sustained: server cores (µs per delivery)", lambda r: f"{cores(r['sustained']['cpu_cores'], 'server'):.2f} ({cores(r['sustained']['cpu_cores'], 'server') / max(r['sustained']['deliveries_per_second'], 1e-9) * 1e6:.2f})"),
    ("sustained: client cores (µs per delivery)", lambda r: f"{cores(r['sustained']['cpu_cores'], 'clients'):.2f} ({cores(r['sustained']['cpu_cores'], 'clients') / max(r['sustained']['deliveries_per_second'], 1e-9) * 1e6:.2f})"),
    ("sustained: others (cores)", lambda r: f"{cores(r['sustained']['cpu_cores'], 'others'):.2f}"),
    ("problems", lambda r: str(len(r['problems']))),
]
print("\nfan-out side by side")
print("--------------------")
w = max(len(k) for k, _ in rows)
for k, f in rows:
    cells = []
    for r in runs:
        try:
            cells.append(f(r))
        except (KeyError, TypeError, ZeroDivisionError):
            cells.append("-")
    print(f"{k:<{w}}  " + "  |  ".join(cells))
PY
exit "$status"
