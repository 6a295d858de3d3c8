#!/usr/bin/env bash
# Memory a native connection keeps after one command that waited on the
# cluster: one gateway joined to a nats-server (JetStream) of its own, N
# native (`switchboard.v1`) connections from a Python client, each
# publishing once on `bench:x` (in a cluster every publish waits on the
# bus); prints the gateway's RSS with the connections idle before, and
# 5 s after, the publishes, per connection.
#
#   tools/switchboard-bench/compare/cluster-publish-memory.sh GATEWAY_BINARY [N]
#
# Needs nats-server and Python's `websockets` (pip install websockets).
set -euo pipefail
source "$(dirname "$0")/common.sh"
bin="$1"
n="${2:-4000}"
nats_port="$(free_port)"
port="$(free_port)"
control="$(free_port)"
cleanup_dir="$(mktemp -d)"
nats-server -p "$nats_port" -js -sd "$cleanup_dir" > /dev/null 2>&1 &
nats=$!
trap 'kill "$nats" 2>/dev/null || true' EXIT
sleep 1
start_server "$port" "$bin" serve --listen "127.0.0.1:$port" --control-listen "127.0.0.1:$control" \
    --nats "nats://127.0.0.1:$nats_port" --namespace 'bench:publish,subscribe' \
    --max-handshakes-per-ip 0 --client-message-rate 0 > /dev/null 2>&1
trap 'kill "$server" "$nats" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$cleanup_dir"' EXIT
python3 - "ws://127.0.0.1:$port/" "$server" "$n" <<'PY'
import asyncio, sys, websockets

url, pid, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

def rss():
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024

async def main():
    conns, gate = [], asyncio.Semaphore(200)

    async def open_one():
        async with gate:
            ws = await websockets.connect(url, subprotocols=["switchboard.v1"], ping_interval=None)
            await ws.recv()  # the `connected` push
            conns.append(ws)

    async def publish(ws):
        await ws.send('{"id":1,"cmd":"publish","channel":"bench:x","text":"hi"}')
        while '"id":1' not in (reply := await ws.recv()):
            pass
        return '"result"' in reply

    await asyncio.gather(*(open_one() for _ in range(n)))
    await asyncio.sleep(5)
    before = rss()
    answered = sum(await asyncio.gather(*(publish(ws) for ws in conns)))
    await asyncio.sleep(5)
    after = rss()
    print(f"{n} connections, {answered} publishes answered; gateway RSS idle "
          f"{before / 2**20:.1f} MiB, 5 s after one publish each {after / 2**20:.1f} MiB: "
          f"{(after - before) / n:.0f} B more per connection")
    for ws in conns:
        await ws.close()

asyncio.run(main())
PY
