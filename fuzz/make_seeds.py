#!/usr/bin/env python3
"""Writes the seed corpus under fuzz/corpus/<target>/ (committed; rerun after
changing it: `python3 fuzz/make_seeds.py`). Each seed is a small, meaningful
input; the fuzzer mutates from there."""

import os
import struct
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))

# ws_frames input: byte 0 = decoder config, byte 1 = read-size seed, rest = stream.
# config bits 0-1: max message size 1 / 125 / 1000 / 70000;
# bits 2-3: 0 no deflate, 1 deflate (client_no_context_takeover), 2 deflate with context.
MAX_125, MAX_1000, MAX_70000 = 1, 2, 3
DEFLATE_NCT, DEFLATE_CTX = 1 << 2, 2 << 2

MASK = b"\x37\xfa\x21\x3d"
ZERO = b"\x00\x00\x00\x00"


def frame(opcode, payload=b"", fin=True, rsv1=False, mask=MASK, length_as=None):
    """A client frame; `mask=None` sends it unmasked (a protocol error)."""
    b0 = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
    n = len(payload)
    m = 0x80 if mask is not None else 0
    kind = length_as or (7 if n < 126 else 16 if n <= 0xFFFF else 64)
    if kind == 7:
        head = bytes([b0, m | n])
    elif kind == 16:
        head = bytes([b0, m | 126]) + struct.pack(">H", n)
    else:
        head = bytes([b0, m | 127]) + struct.pack(">Q", n)
    if mask is None:
        return head + payload
    body = bytes(c ^ mask[i % 4] for i, c in enumerate(payload))
    return head + mask + body


def deflate(messages, context):
    """permessage-deflate payloads: raw deflate, sync flush, tail removed."""
    out, c = [], None
    for msg in messages:
        if c is None or not context:
            c = zlib.compressobj(6, zlib.DEFLATED, -15)
        z = c.compress(msg) + c.flush(zlib.Z_SYNC_FLUSH)
        assert z.endswith(b"\x00\x00\xff\xff")
        out.append(z[:-4])
    return out


def ws_seeds():
    z1, = deflate([b"compress me " * 20], context=False)
    zc1, zc2 = deflate([b"hello hello hello", b"hello hello hello again"], context=True)
    half = len(z1) // 2
    e_acute = "é".encode()
    return {
        "text": [MAX_1000, 0x03, frame(1, b"hello")],
        "text-zero-mask": [MAX_1000, 0x00, frame(1, b"hello", mask=ZERO)],
        "binary": [MAX_1000, 0x02, frame(2, bytes(range(16)))],
        "ping-pong": [MAX_125, 0x01, frame(9, b"p") + frame(10, b"")],
        "close-1000-reason": [MAX_1000, 0x03, frame(8, b"\x03\xe8bye")],
        "close-empty": [MAX_1000, 0x00, frame(8)],
        "close-4001": [MAX_125, 0x01, frame(8, b"\x0f\xa1", mask=ZERO)],
        "fragmented-text-with-ping": [
            MAX_1000,
            0x01,
            frame(1, b"frag", fin=False) + frame(9, b"x") + frame(0, b"mented", fin=False) + frame(0, b"!"),
        ],
        "fragmented-binary": [
            MAX_1000,
            0x02,
            frame(2, b"\x00\x01", fin=False) + frame(0, b"", fin=False) + frame(0, b"\x02", mask=ZERO),
        ],
        "utf8-split-across-fragments": [
            MAX_1000,
            0x00,
            frame(1, e_acute[:1], fin=False) + frame(0, e_acute[1:]),
        ],
        "len16": [MAX_70000, 0x02, frame(2, b"a" * 200, mask=ZERO)],
        "len64-too-big": [MAX_1000, 0x03, frame(2, b"", length_as=64)[:2] + struct.pack(">Q", 1 << 40) + MASK],
        "messages-after-each-other": [
            MAX_125,
            0x03,
            frame(1, b"one") + frame(2, b"two") + frame(1, b"three", mask=ZERO),
        ],
        "deflate-text": [DEFLATE_NCT | MAX_1000, 0x03, frame(1, z1, rsv1=True)],
        "deflate-fragmented": [
            DEFLATE_NCT | MAX_1000,
            0x02,
            frame(1, z1[:half], fin=False, rsv1=True, mask=ZERO) + frame(0, z1[half:], mask=ZERO),
        ],
        "deflate-context-takeover": [
            DEFLATE_CTX | MAX_1000,
            0x01,
            frame(1, zc1, rsv1=True) + frame(2, zc2, rsv1=True) + frame(1, b"plain"),
        ],
        "deflate-too-big": [DEFLATE_NCT | MAX_125, 0x03, frame(2, deflate([b"a" * 1000], False)[0], rsv1=True)],
        "err-unmasked": [MAX_1000, 0x03, frame(1, b"hi", mask=None)],
        "err-reserved-opcode": [MAX_1000, 0x03, frame(3)],
        "err-rsv1-without-deflate": [MAX_1000, 0x03, frame(1, b"a", rsv1=True)],
        "err-fragmented-control": [MAX_1000, 0x03, frame(9, fin=False)],
        "err-invalid-utf8": [MAX_1000, 0x03, frame(1, b"a\xc0\x80")],
        "err-close-code-1005": [MAX_1000, 0x03, frame(8, b"\x03\xed")],
        "err-continuation-first": [MAX_1000, 0x03, frame(0, b"a")],
    }


RFC_KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def request(
    target="/chat",
    method="GET",
    version="1.1",
    upgrade="websocket",
    connection="Upgrade",
    key=RFC_KEY,
    ws_version="13",
    extra=(),
):
    lines = [f"{method} {target} HTTP/{version}", "Host: example.com"]
    if upgrade is not None:
        lines.append(f"Upgrade: {upgrade}")
    if connection is not None:
        lines.append(f"Connection: {connection}")
    if key is not None:
        lines.append(f"Sec-WebSocket-Key: {key}")
    if ws_version is not None:
        lines.append(f"Sec-WebSocket-Version: {ws_version}")
    lines.extend(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def handshake_seeds():
    return {
        "rfc-example": request(),
        "query-and-origin": request("/ws/room?token=abc&x=1", extra=["Origin: https://app.example"]),
        "native-subprotocol": request(extra=["Sec-WebSocket-Protocol: chat, switchboard.v1", "Sec-WebSocket-Protocol: x"]),
        "unsupported-native-version": request(extra=["Sec-WebSocket-Protocol: switchboard.v9"]),
        "deflate-offer": request(extra=["Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits"]),
        "deflate-offers-fallback": request(
            extra=[
                'Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits="10"; client_no_context_takeover, permessage-deflate',
                "Sec-WebSocket-Extensions: x-webkit-deflate-frame",
            ]
        ),
        "cookies-and-auth": request(extra=["Cookie: a=1; sb_token=eyJ", "Authorization: Bearer t"]),
        "keep-alive-upgrade-lowercase": request(connection="keep-alive, upgrade", upgrade="WebSocket"),
        "head-then-frame": request() + frame(1, b"early"),
        "not-upgrade": b"GET / HTTP/1.1\r\nHost: h\r\n\r\n",
        "post": request(method="POST"),
        "http10": request(version="1.0"),
        "version-8": request(ws_version="8"),
        "bad-key": request(key="short"),
        "no-key": request(key=None),
        "partial-head": request()[:40],
        "malformed": b"\x00\x01garbage\r\n\r\n",
        "bare-lf": request().replace(b"\r\n", b"\n"),
        # A header value with a non-UTF-8 byte (obs-text): kept, lossily.
        "obs-text-value": request(extra=["X-Name: caf\u00e9"]).replace("\u00e9".encode(), b"\xe9"),
    }


def native_seeds():
    return {
        "subscribe": b'{"id":1,"cmd":"subscribe","channel":"chat:lobby"}',
        "subscribe-since": b'{"id":2,"cmd":"subscribe","channel":"chat:a","since":{"offset":3,"epoch":"e1"}}',
        "unsubscribe": b'{"id":3,"cmd":"unsubscribe","channel":"chat:a"}',
        "publish-text": b'{"id":4,"cmd":"publish","channel":"chat:a","text":"hi \\u00e9\\n"}',
        "publish-binary": b'{"id":5,"cmd":"publish","channel":"chat:a","binary":"AAE="}',
        "presence": b'{"id":6,"cmd":"presence","channel":"chat:a"}',
        "history": b'{"id":7,"cmd":"history","channel":"chat:a","since":{"offset":0,"epoch":"e"},"limit":10}',
        "history-plain": b'{"cmd":"history","id":8,"channel":"c:x"}',
        "ping": b'{"id":18446744073709551615,"cmd":"ping"}',
        "send-text": b'{"id":9,"cmd":"send","text":"hello"}',
        "send-binary": b'{"id":10,"cmd":"send","binary":""}',
        "refresh": b'{"id":11,"cmd":"refresh","token":"eyJhbGciOiJIUzI1NiJ9.e30.x"}',
        "authenticate": b'{"id":1,"cmd":"authenticate","token":"eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbm4ifQ.c2ln"}',
        "unknown-cmd": b'{"id":12,"cmd":"teleport"}',
        "bad-fields": b'{"id":13,"cmd":"subscribe"}',
        "no-id": b'{"cmd":"ping"}',
        "not-json": b"hello",
    }


def write(target, seeds):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    for name, value in seeds.items():
        if isinstance(value, list):
            value = bytes(value[:2]) + value[2]
        with open(os.path.join(d, name), "wb") as f:
            f.write(value)


write("ws_frames", ws_seeds())
write("handshake", handshake_seeds())
write("native_command", native_seeds())
