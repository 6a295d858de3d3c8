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
root="$(cd "$(dirname "$0")/../../.." && pwd)"
bench="${BENCH:-${CARGO_TARGET_DIR:-$root/target}/release/switchboard-bench}"
nginx="${NGINX:-$(command -v nginx || echo /usr/sbin/nginx)}"
fixtures="$root/crates/switchboard-server/tests/fixtures/tls"
[[ -x "$bench" ]] || { echo "nginx-tls.sh: no $bench; cargo build --release -p switchboard-bench" >&2; exit 1; }
[[ -x "$nginx" ]] || { echo "nginx-tls.sh: nginx is not installed (apt-get install -y nginx libnginx-mod-nchan)" >&2; exit 1; }
module=""
for m in /usr/lib/nginx/modules/ngx_nchan_module.so /usr/share/nginx/modules/ngx_nchan_module.so; do
    [[ -z "$module" && -f "$m" ]] && module="$m"
done
[[ -f "$module" ]] || { echo "nginx-tls.sh: the nchan module is not installed (apt-get install -y libnginx-mod-nchan)" >&2; exit 1; }

port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
dir="$(mktemp -d /tmp/switchboard-nginx-tls.XXXXXX)"
cat > "$dir/nginx.conf" <<CONF
load_module $module;
daemon off;
master_process on;
worker_processes $(nproc);
worker_rlimit_nofile 20000;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 20000; }
http {
    access_log off;
    client_body_temp_path $dir/body;
    proxy_temp_path $dir/proxy;
    fastcgi_temp_path $dir/fastcgi;
    uwsgi_temp_path $dir/uwsgi;
    scgi_temp_path $dir/scgi;
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
"$nginx" -p "$dir" -c "$dir/nginx.conf" &
master=$!
trap 'kill "$master" 2>/dev/null; wait "$master" 2>/dev/null || true; rm -rf "$dir"' EXIT
for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.1
done
sleep 0.5 # the workers are forked after the listener exists
workers=($(pgrep -P "$master"))
echo "nginx-tls.sh: nginx $("$nginx" -v 2>&1 | sed 's/.*\///'), $(openssl version 2>/dev/null || echo OpenSSL), master $master, workers ${workers[*]}" >&2
"$bench" idle --url "wss://127.0.0.1:$port/" --tls --gateway-pid "${workers[0]}" "$@"
