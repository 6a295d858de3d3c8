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
source "$(dirname "$0")/nginx-common.sh"
nginx_prepare nchan
sub_port="$(free_port)"
pub_port="$(free_port)"
{ nginx_head; cat <<CONF
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
} > "$dir/nginx.conf"
nginx_start "$pub_port"
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
