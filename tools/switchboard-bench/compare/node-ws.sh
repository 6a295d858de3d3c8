#!/usr/bin/env bash
# The idle-connection reference: a Node.js server on the `ws` package that
# accepts WebSocket connections and holds them (pinging every 5 s, as the
# gateway does in the bench), measured by the same `switchboard-bench idle`
# scenario: handshake rate and RSS per connection of the node process.
#
#   tools/switchboard-bench/compare/node-ws.sh [idle options...]
#   tools/switchboard-bench/compare/node-ws.sh --connections 19000 --json target/bench/idle-node-ws.json
#
# Needs node and npm (`ws` is installed into a cache folder on first use:
# $WS_DIR, default target/bench/node-ws) and a release build of the bench.
set -euo pipefail
root="$(cd "$(dirname "$0")/../../.." && pwd)"
target="${CARGO_TARGET_DIR:-$root/target}"
bench="${BENCH:-$target/release/switchboard-bench}"
dir="${WS_DIR:-$target/bench/node-ws}"
[[ -x "$bench" ]] || { echo "node-ws.sh: no $bench; cargo build --release -p switchboard-bench" >&2; exit 1; }
command -v node >/dev/null || { echo "node-ws.sh: node is not installed" >&2; exit 1; }
if [[ ! -d "$dir/node_modules/ws" ]]; then
    mkdir -p "$dir"
    npm install --silent --no-audit --no-fund --prefix "$dir" ws@8 >&2
fi
source "$(dirname "$0")/common.sh"
port="$(free_port)"
cat > "$dir/server.js" <<'JS'
// Holds every connection; pings each every 5 s (the client answers).
const { WebSocketServer } = require("ws");
const wss = new WebSocketServer({ host: "127.0.0.1", port: Number(process.argv[2]), backlog: 65535 });
setInterval(() => wss.clients.forEach((c) => c.ping()), 5000);
wss.on("listening", () => console.error("node-ws: listening"));
JS
export NODE_PATH="$dir/node_modules"
start_server "$port" node "$dir/server.js" "$port"
echo "node-ws.sh: node $(node --version), ws $(node -p "require('$dir/node_modules/ws/package.json').version"), pid $server" >&2
"$bench" idle --url "ws://127.0.0.1:$port/" --gateway-pid "$server" "$@"
