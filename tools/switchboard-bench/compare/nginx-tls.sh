#!/usr/bin/env bash
# The TLS handshake reference: Debian's nginx terminating TLS with the same
# certificate as the gateway in `idle --tls` (the server crate's test
# certificate, ECDSA P-256), holding WebSocket connections through the nchan
# module, measured by the same `switchboard-bench idle --tls` clients (TLS
# 1.3, full handshakes, no resumption).
#
#   tools/switchboard-bench/compare/nginx-tls.sh [idle options...]
#   tools/switchboard-bench/compare/nginx-tls.sh --connections 6000 --no-tcp-baseline
#
# Needs nginx and the nchan module (Debian: apt-get install -y nginx
# libnginx-mod-nchan) and a release build of the bench; run from anywhere.
# nginx runs in a temporary folder: as many worker processes as CPUs (the
# gateway's runtime threads), 20,000 connections per worker, no access log,
# TLS 1.2 and 1.3, no session cache or tickets (every handshake full, as the
# bench's clients ask anyway). Memory is read from the worker processes
# (--gateway-pid takes the first; the summary names all of them).
set -euo pipefail
source "$(dirname "$0")/nginx-common.sh"
nginx_prepare nginx-tls
fixtures="$root/crates/switchboard-server/tests/fixtures/tls"
port="$(free_port)"
{ nginx_head; cat <<CONF
    server {
        listen 127.0.0.1:$port ssl backlog=65535;
        ssl_certificate $fixtures/server-a.pem;
        ssl_certificate_key $fixtures/server-a-key.pem;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache off;
        ssl_session_tickets off;
        location / { nchan_subscriber websocket; nchan_channel_id idle; }
    }
}
CONF
} > "$dir/nginx.conf"
nginx_start "$port"
workers=($(pgrep -P "$master"))
echo "nginx-tls.sh: nginx $("$nginx" -v 2>&1 | sed 's/.*\///'), $(openssl version 2>/dev/null || echo OpenSSL), master $master, workers ${workers[*]}" >&2
"$bench" idle --url "wss://127.0.0.1:$port/" --tls --gateway-pid "${workers[0]}" "$@"
