#!/usr/bin/env bash
# Runs Schemathesis against the control API of a local Switchboard gateway,
# generating requests from the control API's OpenAPI document
# (docs/openapi.json, which the gateway also serves at GET /v1/openapi.json),
# and fails on any 5xx and on any response the document does not describe:
# its status, content type, headers or body.
#
#   bash conformance/schemathesis/run.sh               # CI: ~20 s after the build
#   SKIP_BUILD=1 SCHEMATHESIS_MAX_EXAMPLES=300 SCHEMATHESIS_SEED=7 \
#       bash conformance/schemathesis/run.sh           # a longer run, another seed
#
# Environment:
#   SCHEMATHESIS_MAX_EXAMPLES  test cases per operation and phase [default: 50]
#   SCHEMATHESIS_SEED          Hypothesis seed [default: 20251122]
#   SCHEMATHESIS_CHECKS        checks, comma-separated, or `all` [default:
#                              not_a_server_error, status_code_conformance,
#                              content_type_conformance, response_headers_conformance,
#                              response_schema_conformance]
#   SCHEMATHESIS_SCHEMA        the document to test with [default: docs/openapi.json;
#                              `served`: the gateway's GET /v1/openapi.json, the same
#                              document built in, but Schemathesis then leaves that
#                              route out]
#   SCHEMATHESIS_ARGS          more arguments for `schemathesis run`, e.g.
#                              "--include-operation-id publish --phases fuzzing"
#   SCHEMATHESIS_TIMEOUT       seconds allowed for the schemathesis run [default: 150]
#   SCHEMATHESIS_VENV          virtualenv to install it into
#                              [default: ${CARGO_TARGET_DIR:-target}/schemathesis-venv]
#   SCHEMATHESIS_PYTHON        Python 3 to create the virtualenv with [default: python3]
#   SKIP_BUILD=1               use the existing target/debug/switchboard
#
# Reports go to conformance/schemathesis/reports/ (gitignored): schemathesis.log,
# junit.xml, requests.har (every request and answer), the generated
# schemathesis.toml, gateway.log and clients.log.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
REPORTS="$HERE/reports"
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
MAX_EXAMPLES=${SCHEMATHESIS_MAX_EXAMPLES:-50}
SEED=${SCHEMATHESIS_SEED:-20251122}
RUN_TIMEOUT=${SCHEMATHESIS_TIMEOUT:-150}
VENV=${SCHEMATHESIS_VENV:-$TARGET_DIR/schemathesis-venv}
PY3=${SCHEMATHESIS_PYTHON:-python3}
# The pinned version, from requirements.txt (schemathesis==X.Y.Z).
VERSION=$(sed -n 's/^schemathesis==//p' "$HERE/requirements.txt")
START=$(date +%s)

log() { echo "[schemathesis +$(($(date +%s) - START))s] $*"; }

# --- Schemathesis, in its own virtualenv ----------------------------------------
ST="$VENV/bin/schemathesis"
if ! [ -x "$ST" ] || [ "$("$ST" --version 2>/dev/null)" != "schemathesis, version $VERSION" ]; then
    log "installing schemathesis==$VERSION into $VENV"
    "$PY3" -m venv "$VENV"
    timeout 600 "$VENV/bin/python" -m pip install --disable-pip-version-check -q \
        -r "$HERE/requirements.txt"
fi
"$ST" --version

# --- Build ---------------------------------------------------------------------
cd "$ROOT"
if [ "${SKIP_BUILD:-0}" != 1 ]; then
    log "building the debug binary"
    timeout 1800 cargo build --locked -p switchboard
fi
GATEWAY_BIN="$TARGET_DIR/debug/switchboard"

# --- Free ports (bound to port 0 by the OS, then released) ---------------------
read -r WS_PORT CONTROL_PORT < <("$VENV/bin/python" -c '
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
')
API_KEY="conformance-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"

rm -rf "$REPORTS"
mkdir -p "$REPORTS"

# shellcheck source=../lib.sh
source "$HERE/../lib.sh"

# --- Gateway and connections ----------------------------------------------------
# Dev mode (no origin): every connection is accepted. `room:` has every channel
# feature; `plain:` none, so history and presence also answer
# `history_disabled` and `presence_disabled`.
log "gateway on 127.0.0.1:$WS_PORT (control $CONTROL_PORT)"
"$GATEWAY_BIN" serve \
    --listen "127.0.0.1:$WS_PORT" \
    --control-listen "127.0.0.1:$CONTROL_PORT" \
    --api-key "$API_KEY" \
    --namespace 'room:history-size=100,presence,join-leave,publish,subscribe' \
    --namespace 'plain' \
    --log-level warn \
    --log-format text \
    >"$REPORTS/gateway.log" 2>&1 &
GATEWAY_PID=$!
PIDS+=("$GATEWAY_PID")
wait_port "$CONTROL_PORT" gateway "$GATEWAY_PID"

# Live connections, each subscribed to room:lobby with one message published
# there, so that the connection routes also answer 200/202/204 and presence
# and history list something. Only the first few are given to the close route
# (which closes them); the others stay open for the other routes.
CLIENTS=12
CLOSABLE=4
"$VENV/bin/python" "$HERE/clients.py" "127.0.0.1:$WS_PORT" "$CLIENTS" room:lobby \
    >"$REPORTS/clients.out" 2>"$REPORTS/clients.log" &
PIDS+=($!)
for i in $(seq 100); do
    [ -s "$REPORTS/clients.out" ] && break
    kill -0 "${PIDS[-1]}" 2>/dev/null || { echo "error: clients.py exited; see $REPORTS/clients.log" >&2; exit 1; }
    [ "$i" -lt 100 ] || { echo "error: clients.py did not connect within 10s" >&2; exit 1; }
    sleep 0.1
done
read -r -a IDS <"$REPORTS/clients.out"
log "${#IDS[@]} connections open"

# Values Schemathesis mixes into what it generates (half of the time): live
# connection ids, and channels of every kind (both namespaces, an unknown one,
# invalid names).
toml_list() { local v out=""; for v in "$@"; do out+="\"$v\", "; done; echo "[${out%, }]"; }
CONFIG="$REPORTS/schemathesis.toml"
cat >"$CONFIG" <<EOF
[cache]
enabled = false

[dictionaries.closable]
values = $(toml_list "${IDS[@]:0:$CLOSABLE}")

[dictionaries.connections]
values = $(toml_list "${IDS[@]:$CLOSABLE}")

[dictionaries.channels]
values = ["room:lobby", "room:a/b", "room:caf\u00e9", "plain:lobby", "nope:lobby", "lobby", "room:"]

[parameters]
"path.channel" = { dictionary = "channels", probability = 0.5 }

[[operations]]
include-operation-id = "closeConnection"
parameters = { "path.id" = { dictionary = "closable", probability = 0.5 } }

[[operations]]
exclude-operation-id = "closeConnection"
parameters = { "path.id" = { dictionary = "connections", probability = 0.5 }, "body.messages[*].connection_ids[*]" = { dictionary = "connections", probability = 0.5 } }
EOF

# --- schemathesis run ------------------------------------------------------------
SCHEMA=${SCHEMATHESIS_SCHEMA:-$ROOT/docs/openapi.json}
if [ "$SCHEMA" = served ]; then
    SCHEMA="http://127.0.0.1:$CONTROL_PORT/v1/openapi.json"
fi
CHECKS=not_a_server_error,status_code_conformance,content_type_conformance
CHECKS=${SCHEMATHESIS_CHECKS:-$CHECKS,response_headers_conformance,response_schema_conformance}
# One worker: with two, Hypothesis's lambda descriptions (ast.parse in
# threads) crashed on Python 3.11.7 ("AST constructor recursion depth
# mismatch"), reported as a runtime error of the run.
log "schemathesis run: $MAX_EXAMPLES examples per operation, seed $SEED (timeout ${RUN_TIMEOUT}s)"
RUN_START=$(date +%s)
set +e
(cd "$REPORTS" && timeout "$RUN_TIMEOUT" "$ST" --config-file "$CONFIG" run \
    "$SCHEMA" \
    --url "http://127.0.0.1:$CONTROL_PORT" \
    --header "Authorization: Bearer $API_KEY" \
    --checks "$CHECKS" \
    --max-examples "$MAX_EXAMPLES" \
    --seed "$SEED" \
    --workers 1 \
    --request-timeout 10 \
    --generation-database none \
    --no-color \
    --report junit,har \
    --report-har-path "$REPORTS/requests.har" \
    --report-junit-path "$REPORTS/junit.xml" \
    ${SCHEMATHESIS_ARGS:-}) 2>&1 | tee "$REPORTS/schemathesis.log"
RC=${PIPESTATUS[0]}
set -e
log "schemathesis exited with $RC after $(($(date +%s) - RUN_START))s"
if [ "$RC" -eq 124 ]; then
    echo "error: schemathesis did not finish within ${RUN_TIMEOUT}s" >&2
fi
if ! kill -0 "$GATEWAY_PID" 2>/dev/null; then
    echo "error: the gateway died during the run; see $REPORTS/gateway.log" >&2
    RC=1
fi
log "done in $(($(date +%s) - START))s; logs in $REPORTS"
exit "$RC"
