"""Holds WebSocket connections open on the gateway during the Schemathesis run,
so that the connection routes of the control API also answer 200/202/204 and
presence and history have something to list.

    python3 clients.py HOST:PORT COUNT CHANNEL

Opens COUNT native (`switchboard.v1`) connections, subscribes each to CHANNEL
and publishes one message there, prints their ids on one line, then reads and
discards whatever arrives (answering pings) until every connection is gone or
the process is stopped. Python 3 standard library only.
"""

import base64
import json
import os
import select
import socket
import struct
import sys


def mask(payload: bytes) -> bytes:
    key = os.urandom(4)
    return key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def frame(opcode: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    return head + mask(payload)


class Conn:
    def __init__(self, addr: str):
        host, port = addr.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET /conformance HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: switchboard.v1\r\n\r\n"
            ).encode()
        )
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            self.recv()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        if not head.startswith(b"HTTP/1.1 101"):
            raise RuntimeError(f"handshake refused: {head.decode(errors='replace')}")

    def recv(self) -> bool:
        data = self.sock.recv(65536)
        self.buf += data
        return bool(data)

    def frames(self):
        """Complete frames in the buffer, as (opcode, payload); answers pings."""
        while True:
            if len(self.buf) < 2:
                return
            b0, b1 = self.buf[0], self.buf[1]
            n, at = b1 & 0x7F, 2
            if n == 126:
                if len(self.buf) < 4:
                    return
                n, at = struct.unpack("!H", self.buf[2:4])[0], 4
            elif n == 127:
                if len(self.buf) < 10:
                    return
                n, at = struct.unpack("!Q", self.buf[2:10])[0], 10
            if len(self.buf) < at + n:
                return
            opcode, payload = b0 & 0x0F, self.buf[at : at + n]
            self.buf = self.buf[at + n :]
            if opcode == 0x9:
                self.sock.sendall(frame(0xA, payload))
            yield opcode, payload

    def command(self, cmd: dict):
        self.sock.sendall(frame(0x1, json.dumps(cmd).encode()))

    def wait_for(self, want) -> dict:
        """Reads JSON frames until `want(frame)`; returns that frame."""
        while True:
            for opcode, payload in self.frames():
                if opcode == 0x8:
                    raise RuntimeError("closed by the gateway")
                if opcode == 0x1:
                    msg = json.loads(payload)
                    if want(msg):
                        return msg
            if not self.recv():
                raise RuntimeError("connection lost")


def main() -> None:
    addr, count, channel = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    conns, ids = [], []
    for i in range(count):
        c = Conn(addr)
        ids.append(c.wait_for(lambda m: m.get("push") == "connected")["client"])
        c.command({"id": 1, "cmd": "subscribe", "channel": channel})
        c.wait_for(lambda m: m.get("id") == 1)
        c.command({"id": 2, "cmd": "publish", "channel": channel, "text": f"hello {i}"})
        c.wait_for(lambda m: m.get("id") == 2)
        c.sock.settimeout(None)
        conns.append(c)
    print(" ".join(ids), flush=True)
    while conns:
        readable, _, _ = select.select([c.sock for c in conns], [], [])
        for c in [c for c in conns if c.sock in readable]:
            try:
                alive = c.recv()
                for opcode, _ in c.frames():
                    if opcode == 0x8:
                        alive = False
            except OSError:
                alive = False
            if not alive:
                c.sock.close()
                conns.remove(c)


if __name__ == "__main__":
    main()
