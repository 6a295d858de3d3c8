#!/usr/bin/env bash
# Runs the Autobahn|Testsuite fuzzing client (the cases spec.json selects)
# against a local Switchboard gateway whose origin is the echo origin, then
# checks that every case passed. Exits non-zero on any failure.
#
#   bash conformance/autobahn/run.sh                 # CI, 433 cases: ~5 min after the build
#   AUTOBAHN_FULL=1 bash conformance/autobahn/run.sh # all 517 cases: ~18 min
#
# spec.json leaves out the slowest compression cases (12.*/13.* sub-cases 10,
# 12 and 14-18: 1000 messages of 32-128 KiB each); see README.md.
#
# Environment:
#   AUTOBAHN_FULL=1   run every case, ignoring spec.json's "exclude-cases"
#   AUTOBAHN_CASES    comma-separated case patterns replacing spec.json's cases
#                     and exclusions, e.g. "9.*,12.2.10" (for local iteration)
#   AUTOBAHN_PYTHON   Python 2.7 to install/run autobahntestsuite with
#                     [default: /root/.pyenv/versions/2.7.18/bin/python, else python2.7]
#   AUTOBAHN_TIMEOUT  seconds allowed for the wstest run [default: 900, 2400 when full]
#   SKIP_BUILD=1      use the existing target/release binaries
#
# Reports go to conformance/autobahn/reports/ (gitignored): servers/index.html
# is the human-readable one; gateway.log and origin.log are kept beside it.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
REPORTS="$HERE/reports"
AUTOBAHN_VERSION=25.10.1
if [ "${AUTOBAHN_FULL:-0}" = 1 ]; then
    WSTEST_TIMEOUT=${AUTOBAHN_TIMEOUT:-2400}
else
    WSTEST_TIMEOUT=${AUTOBAHN_TIMEOUT:-900}
fi
START=$(date +%s)

log() { echo "[autobahn +$(($(date +%s) - START))s] $*"; }

# --- Python 2 and wstest ------------------------------------------------------
PY2=${AUTOBAHN_PYTHON:-}
if [ -z "$PY2" ]; then
    if [ -x /root/.pyenv/versions/2.7.18/bin/python ]; then
        PY2=/root/.pyenv/versions/2.7.18/bin/python
    elif command -v python2.7 >/dev/null 2>&1; then
        PY2=$(command -v python2.7)
    else
        echo "error: no Python 2.7 found; set AUTOBAHN_PYTHON" >&2
        exit 1
    fi
fi
WSTEST="$(dirname "$PY2")/wstest"
if ! "$PY2" -c 'import autobahntestsuite' >/dev/null 2>&1 || [ ! -x "$WSTEST" ]; then
    log "installing autobahntestsuite==$AUTOBAHN_VERSION into $PY2"
    timeout 600 "$PY2" -m pip install --disable-pip-version-check -q "autobahntestsuite==$AUTOBAHN_VERSION"
fi
[ -x "$WSTEST" ] || { echo "error: $WSTEST missing after install" >&2; exit 1; }

# --- Build ---------------------------------------------------------------------
cd "$ROOT"
if [ "${SKIP_BUILD:-0}" != 1 ]; then
    log "building release binaries"
    timeout 1800 cargo build --release -p switchboard -p switchboard-examples
fi
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
GATEWAY_BIN="$TARGET_DIR/release/switchboard"
ORIGIN_BIN="$TARGET_DIR/release/echo-origin"

# --- Free ports (bound to port 0 by the OS, then released) ---------------------
read -r ORIGIN_PORT WS_PORT CONTROL_PORT < <("$PY2" -c '
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
')

rm -rf "$REPORTS"
mkdir -p "$REPORTS"

# shellcheck source=../lib.sh
source "$HERE/../lib.sh"

# --- Origin and gateway --------------------------------------------------------
log "echo origin on 127.0.0.1:$ORIGIN_PORT, gateway on 127.0.0.1:$WS_PORT (control $CONTROL_PORT)"
"$ORIGIN_BIN" --listen "127.0.0.1:$ORIGIN_PORT" >"$REPORTS/origin.log" 2>&1 &
PIDS+=($!)
wait_port "$ORIGIN_PORT" origin "${PIDS[-1]}"

# 16 MiB messages (case 9.*) travel to the origin as base64 inside JSON and come
# back the same way: message and queue limits are sized for that, not for
# production. The suite sends thousands of messages per connection as fast as
# it can, so client rate limits are off.
"$GATEWAY_BIN" serve \
    --listen "127.0.0.1:$WS_PORT" \
    --control-listen "127.0.0.1:$CONTROL_PORT" \
    --origin "http://127.0.0.1:$ORIGIN_PORT/events" \
    --origin-timeout 60s \
    --max-message-size 20000000 \
    --client-message-rate 0 \
    --client-byte-rate 0 \
    --max-handshakes-per-ip 0 \
    --max-outbound-bytes 268435456 \
    --permessage-deflate \
    --log-level warn \
    --log-format text \
    >"$REPORTS/gateway.log" 2>&1 &
PIDS+=($!)
wait_port "$WS_PORT" gateway "${PIDS[-1]}"

# --- wstest ----------------------------------------------------------------------
RUN_SPEC="$REPORTS/spec.run.json"
"$PY2" - "$HERE/spec.json" "$RUN_SPEC" "ws://127.0.0.1:$WS_PORT/autobahn" "$REPORTS/servers" \
    "${AUTOBAHN_CASES:-}" "${AUTOBAHN_FULL:-0}" <<'EOF'
import json, sys
src, dst, url, outdir, cases, full = sys.argv[1:7]
spec = json.load(open(src))
spec["outdir"] = outdir
for s in spec["servers"]:
    s["url"] = url
if cases:
    spec["cases"] = [c.strip() for c in cases.split(",") if c.strip()]
if cases or full == "1":
    spec["exclude-cases"] = []
json.dump(spec, open(dst, "w"), indent=2)
EOF

log "running wstest -m fuzzingclient (timeout ${WSTEST_TIMEOUT}s)"
WS_START=$(date +%s)
set +e
(cd "$REPORTS" && timeout "$WSTEST_TIMEOUT" "$WSTEST" -m fuzzingclient -s "$RUN_SPEC") >"$REPORTS/wstest.log" 2>&1
WSTEST_RC=$?
set -e
log "wstest exited with $WSTEST_RC after $(($(date +%s) - WS_START))s (log: $REPORTS/wstest.log)"
if [ "$WSTEST_RC" -ne 0 ]; then
    tail -n 20 "$REPORTS/wstest.log" >&2
fi
for i in "${!PIDS[@]}"; do
    if ! kill -0 "${PIDS[$i]}" 2>/dev/null; then
        echo "error: a server process died during the run; see $REPORTS/*.log" >&2
        WSTEST_RC=1
    fi
done

set +e
"$PY2" "$HERE/check_report.py" "$REPORTS/servers" "$RUN_SPEC"
CHECK_RC=$?
set -e
log "done in $(($(date +%s) - START))s; report: $REPORTS/servers/index.html"
if [ "$WSTEST_RC" -ne 0 ] || [ "$CHECK_RC" -ne 0 ]; then
    exit 1
fi
