# Shared by the nginx references (nchan.sh, nginx-tls.sh); sourced, not run.
#
# After `nginx_prepare NAME`: $root, $bench, $nginx, $module (the nchan
# module) are set and checked, and $dir is a new temporary folder.
# `free_port` comes from common.sh.
# `nginx_head` prints the start of nginx.conf up to and including `http {`
# (as many workers as CPUs, 20,000 connections each, no access log, temp
# paths in $dir); the caller adds its servers and the closing brace.
# `nginx_start PORT` starts nginx on $dir/nginx.conf, removes everything on
# exit, waits until PORT accepts and the workers are forked, and sets
# $master.

nginx_prepare() {
    local name="$1"
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
    bench="${BENCH:-${CARGO_TARGET_DIR:-$root/target}/release/switchboard-bench}"
    nginx="${NGINX:-$(command -v nginx || echo /usr/sbin/nginx)}"
    [[ -x "$bench" ]] || { echo "$name: no $bench; cargo build --release -p switchboard-bench" >&2; exit 1; }
    [[ -x "$nginx" ]] || { echo "$name: nginx is not installed (apt-get install -y nginx libnginx-mod-nchan)" >&2; exit 1; }
    module="${NCHAN_MODULE:-}"
    local m
    for m in /usr/lib/nginx/modules/ngx_nchan_module.so /usr/lib64/nginx/modules/ngx_nchan_module.so \
             /usr/share/nginx/modules/ngx_nchan_module.so; do
        [[ -z "$module" && -f "$m" ]] && module="$m"
    done
    [[ -f "$module" ]] || { echo "$name: the nchan module is not installed (apt-get install -y libnginx-mod-nchan)" >&2; exit 1; }
    dir="$(mktemp -d "/tmp/switchboard-$name.XXXXXX")"
}

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

nginx_head() {
    cat <<CONF
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
CONF
}

nginx_start() {
    cleanup_dir="$dir"
    start_server "$1" "$nginx" -p "$dir" -c "$dir/nginx.conf"
    master=$server
    sleep 0.5 # the workers are forked after the listeners exist
}
