# Shared by the reference scripts here; sourced, not run.
#
# `free_port` prints a free loopback port. `start_server PORT CMD...` runs
# CMD in the background, sets $server to its pid, kills it on exit (and
# removes $cleanup_dir if set), and waits (10 s at most) until PORT accepts.

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

start_server() {
    local port="$1"
    shift
    "$@" &
    server=$!
    trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null || true; [[ -n "${cleanup_dir:-}" ]] && rm -rf "$cleanup_dir"' EXIT
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
        sleep 0.1
    done
}
