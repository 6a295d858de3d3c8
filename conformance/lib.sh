# Shared by the conformance runs (sourced, not run): the processes they start
# and stop, and waiting for a port. Expects $REPORTS to be set.

# Every background process started; all are stopped on exit (TERM, then
# KILL after 5 s).
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# wait_port PORT NAME PID: waits up to 10 s for 127.0.0.1:PORT to accept
# connections; fails if process PID (logging to $REPORTS/NAME.log) exits.
wait_port() {
    local port=$1 name=$2 pid=$3
    for _ in $(seq 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            return 0
        fi
        kill -0 "$pid" 2>/dev/null || { echo "error: $name exited; see $REPORTS/$name.log" >&2; exit 1; }
        sleep 0.1
    done
    echo "error: $name did not listen on 127.0.0.1:$port within 10s" >&2
    exit 1
}
