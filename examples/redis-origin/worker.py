"""An origin for Switchboard over Redis Streams (`--origin redis`), in Python
with redis-py: it accepts connections (refusing paths under /forbidden),
and answers every client message with an echo sent through the control
stream. Run several: they share the work through the consumer group, and
one that crashes leaves its entries to the others (claimed after 30 s).

    pip install 'redis>=5'
    REDIS_URL=redis://127.0.0.1:6379/0 python3 worker.py

Environment: REDIS_URL, PREFIX (--redis-prefix, default switchboard),
PARTITIONS (--redis-event-partitions, default 1), WORKER (this consumer's
name, default host-pid). See docs/origin.md, "The origin over Redis Streams".
"""

import json
import os
import socket
import time

import redis

PREFIX = os.environ.get("PREFIX", "switchboard")
PARTITIONS = int(os.environ.get("PARTITIONS", "1"))
WORKER = os.environ.get("WORKER", f"{socket.gethostname()}-{os.getpid()}")
GROUP = "origin"
CLAIM_AFTER_MS = 30_000

r = redis.Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
decisions = f"{PREFIX}:decisions"
events = [f"{PREFIX}:events:{k}" for k in range(PARTITIONS)]
for stream in [decisions, *events]:
    try:
        r.xgroup_create(stream, GROUP, id="0", mkstream=True)
    except redis.ResponseError as e:
        if "BUSYGROUP" not in str(e):
            raise


def decide(fields):
    """Answers one `connect` (or `publish`, `subscribe`) on its reply channel."""
    event = json.loads(fields[b"batch"])["events"][0]
    if int(fields[b"deadline_ms"]) < time.time() * 1000:
        return  # the client was refused already: do nothing with it
    if event["type"] == "connect" and event["path"].startswith("/forbidden"):
        answer = {"id": event["id"], "status": 403, "reason": "not here"}
    elif event["type"] == "connect":
        answer = {"id": event["id"], "status": 200, "answer": {"user_id": "py-user"}}
    else:
        answer = {"id": event["id"], "status": 200}
    r.publish(fields[b"reply"], json.dumps(answer))


def handle(fields):
    """Handles one batch of events, in order."""
    for event in json.loads(fields[b"batch"])["events"]:
        if event["type"] == "message" and "text" in event:
            command = {
                "op": "send",
                "connection_id": event["connection_id"],
                "text": f"echo: {event['text']}",
            }
            r.xadd(f"{PREFIX}:control", {"command": json.dumps(command)})
        elif event["type"] == "disconnect":
            print(f"{event['connection_id']} left", flush=True)


def process(stream, entry_id, fields):
    if stream == decisions:
        decide(fields)
    else:
        handle(fields)
    r.xack(stream, GROUP, entry_id)


print(f"worker {WORKER} reading {decisions} and {', '.join(events)}", flush=True)
while True:
    # What a crashed worker read and never acknowledged.
    for stream in [decisions, *events]:
        claimed = r.xautoclaim(stream, GROUP, WORKER, CLAIM_AFTER_MS, "0-0", count=100)[1]
        for entry_id, fields in claimed:
            process(stream, entry_id, fields)
    found = r.xreadgroup(
        GROUP, WORKER, {s: ">" for s in [decisions, *events]}, count=100, block=1000
    )
    for stream, entries in found or []:
        for entry_id, fields in entries:
            process(stream.decode(), entry_id, fields)
