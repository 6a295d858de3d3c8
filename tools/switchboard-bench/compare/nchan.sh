#!/usr/bin/env bash
# The fan-out reference: nginx with the nchan module, measured by the same
# `switchboard-bench fanout` scenario as the gateway (same clients, same
# phases), so the two result files compare line by line.
#
#   tools/switchboard-bench/compare/nchan.sh [fanout options...]
#   tools/switchboard-bench/compare/nchan.sh --subscribers 19000 --json target/bench/fanout-nchan.json
#   tools/switchboard-bench/compare/nchan.sh --transport sse --subscribers 10000   # EventSource subscribers
#
# Needs nginx and the nchan module (Debian: apt-get install -y nginx
# libnginx-mod-nchan) and a release build of the bench
# (cargo build --release -p switchboard-bench). nginx runs in a temporary
# folder with the configuration below, as many worker processes as CPUs (the
# gateway's runtime threads), 20,000 connections per worker, no access log,
# the gateway's listen backlog; nchan's defaults otherwise. Subscribers
# connect to /sub (WebSocket), or with `--transport sse` to /es
# (`nchan_subscriber eventsource`: GET with Accept: text/event-stream);
# publishes are POST /pub with the data as the body, which nchan sends to
# every subscriber as a plain text frame or as one event's data.
set -euo pipefail
root="$(cd "$(dirname "$0")/../../.." && pwd)"
bench="${BENCH:-${CARGO_TARGET_DIR:-$root/target}/release/switchboard-bench}"
nginx="${NGINX:-$(command -v nginx || echo /usr/sbin/nginx)}"
[[ -x "$bench" ]] || { echo "nchan.sh: no $bench; cargo build --release -p switchboard-bench" >&2; exit 1; }
[[ -x "$nginx" ]] || { echo "nchan.sh: nginx is not installed (apt-get install -y nginx libnginx-mod-nchan)" >&2; exit 1; }
module="${NCHAN_MODULE:-}"
for m in /usr/lib/nginx/modules/ngx_nchan_module.so /usr/lib64/nginx/modules/ngx_nchan_module.so \
         /usr/share/nginx/modules/ngx_nchan_module.so; do
    [[ -z "$module" && -f "$m" ]] && module="$m"
done
[[ -f "$module" ]] || { echo "nchan.sh: the nchan module is not installed (apt-get install -y libnginx-mod-nchan)" >&2; exit 1; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
sub_port="$(free_port)"
pub_port="$(free_port)"
dir="$(mktemp -d /tmp/switchboard-nchan.XXXXXX)"
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
        listen 127.0.0.1:$sub_port backlog=65535;
        location = /sub { nchan_subscriber websocket; nchan_channel_id fanout; }
        location = /es { nchan_subscriber eventsource; nchan_channel_id fanout; }
    }
    server {
        listen 127.0.0.1:$pub_port;
        location = /pub { nchan_publisher; nchan_channel_id fanout; }
    }
}
CONF
"$nginx" -p "$dir" -c "$dir/nginx.conf" &
master=$!
trap 'kill "$master" 2>/dev/null; wait "$master" 2>/dev/null || true; rm -rf "$dir"' EXIT
for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$pub_port") 2>/dev/null && break
    sleep 0.1
done
sleep 0.5 # the workers are forked after the listeners exist
pids=("$master" $(pgrep -P "$master"))
pid_args=()
for p in "${pids[@]}"; do pid_args+=(--server-pid "$p"); done
echo "nchan.sh: nginx $("$nginx" -v 2>&1 | sed 's/.*\///'), nchan module $module, processes ${pids[*]}" >&2
url="ws://127.0.0.1:$sub_port/sub"
prev=""
for a in "$@"; do
    if [[ "$a" == "--transport=sse" || ( "$prev" == "--transport" && "$a" == "sse" ) ]]; then
        url="http://127.0.0.1:$sub_port/es"
    fi
    prev="$a"
done
"$bench" fanout --url "$url" --publish-url "http://127.0.0.1:$pub_port/pub" \
    --server-name "nginx + nchan" "${pid_args[@]}" "$@"
