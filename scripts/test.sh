#!/usr/bin/env bash
# The test command: every unit and end-to-end test of the workspace.
#
#   scripts/test.sh                  # what the README says and CI runs
#   scripts/test.sh -p switchboard   # extra arguments go to cargo test
#
# The cluster tests start their own nats-server, so it must be on PATH. When
# it is missing, this script installs it with apt-get if it can (root on
# Debian/Ubuntu; SWITCHBOARD_NO_INSTALL=1 forbids it), and otherwise stops
# with one line saying how to install it, before compiling anything.
set -euo pipefail
cd "$(dirname "$0")/.."

missing="scripts/test.sh: nats-server is not on PATH (the cluster tests start their own): install it with 'sudo apt-get install nats-server' (Debian/Ubuntu), 'brew install nats-server' (macOS) or from https://github.com/nats-io/nats-server/releases, then run this again."
if ! command -v nats-server >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && [ -z "${SWITCHBOARD_NO_INSTALL:-}" ]; then
        echo "scripts/test.sh: nats-server is missing; installing it with apt-get" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nats-server >/dev/null
    fi
    # Installed now, or installed somewhere PATH does not reach (Debian puts
    # it in /usr/sbin), or not installable here.
    command -v nats-server >/dev/null 2>&1 || { echo "$missing" >&2; exit 1; }
fi

exec cargo test --workspace --locked "$@"
