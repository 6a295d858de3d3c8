#!/usr/bin/env bash
# The test command: every unit and end-to-end test of the workspace.
#
#   scripts/test.sh                  # what the README says and CI runs
#   scripts/test.sh -p switchboard   # extra arguments go to cargo test
#
# The cluster tests start their own nats-server and redis-server, so both
# must be on PATH. When one is missing, this script installs it with apt-get
# if it can (root on Debian/Ubuntu; SWITCHBOARD_NO_INSTALL=1 forbids it), and
# otherwise stops with one line saying how to install it, before compiling
# anything.
set -euo pipefail
cd "$(dirname "$0")/.."

# require BINARY DEBIAN-PACKAGE HOW-ELSE: installs the package when the
# binary is missing and this may (root, apt-get, not forbidden); else stops.
require() {
    local bin=$1 package=$2 elsewhere=$3
    command -v "$bin" >/dev/null 2>&1 && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && [ -z "${SWITCHBOARD_NO_INSTALL:-}" ]; then
        echo "scripts/test.sh: $bin is missing; installing $package with apt-get" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$package" >/dev/null
    fi
    # Installed now, or installed somewhere PATH does not reach (Debian puts
    # nats-server in /usr/sbin), or not installable here.
    command -v "$bin" >/dev/null 2>&1 && return 0
    echo "scripts/test.sh: $bin is not on PATH (the cluster tests start their own): install it with 'sudo apt-get install $package' (Debian/Ubuntu), $elsewhere, then run this again." >&2
    exit 1
}
require nats-server nats-server "'brew install nats-server' (macOS) or from https://github.com/nats-io/nats-server/releases"
require redis-server redis-server "'brew install redis' (macOS) or from https://redis.io/downloads"

exec cargo test --workspace --locked "$@"
