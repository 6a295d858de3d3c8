"""Switchboard origin helpers for Python 3.8+: webhook verification and a
minimal control API client, standard library only. Copy this file into your
project, or import it:

    from origin import verify, ControlClient

Run directly, it is also a tiny demo origin (see docs/origin-helpers.md):

    SWITCHBOARD_ORIGIN_SECRET=s3cret python3 origin.py serve 3000

The contract is docs/origin.md (webhooks) and docs/control-api.md.
"""

import base64
import hashlib
import hmac
import json
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

# How far (seconds) a request's timestamp may be from our clock, either way.
DEFAULT_TOLERANCE_SECONDS = 300

_TIMESTAMP = re.compile(r"[0-9]{1,15}")
_SIGNATURE = re.compile(r"v1=[0-9a-fA-F]{64}")


def verify(secret, timestamp, signature, raw_body,
           tolerance_seconds=DEFAULT_TOLERANCE_SECONDS, now=None):
    """Checks a webhook request.

    `timestamp` and `signature` are the values of the X-Switchboard-Timestamp
    and X-Switchboard-Signature headers (str or None), `raw_body` the body
    exactly as received (bytes). Verify before parsing the JSON, never a
    re-serialized copy. `secret` is str (UTF-8) or bytes. Returns True only
    for a fresh timestamp and a matching signature.
    """
    ts = (timestamp or "").strip()
    if not _TIMESTAMP.fullmatch(ts):
        return False
    seconds = int(ts)
    if abs((time.time() if now is None else now) - seconds) > tolerance_seconds:
        return False
    sig = (signature or "").strip()
    if not _SIGNATURE.fullmatch(sig):
        return False
    key = secret.encode() if isinstance(secret, str) else secret
    want = hmac.new(key, b"%d." % seconds + raw_body, hashlib.sha256).digest()
    return hmac.compare_digest(bytes.fromhex(sig[3:]), want)


class ControlError(Exception):
    """A control API error answer: `status` (HTTP) and the stable `code`."""

    def __init__(self, status, code, message):
        super().__init__(f"control API answered {status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


def _message_body(message):
    """`text` (a str) or binary data (bytes) as a message body."""
    if isinstance(message, str):
        return {"text": message}
    return {"binary": base64.b64encode(bytes(message)).decode("ascii")}


def seg(s):
    """One percent-encoded path segment (channel names may hold / ? # %)."""
    return urllib.parse.quote(s, safe="")


class ControlClient:
    """A minimal client of a gateway's control API (`--control-listen`)."""

    def __init__(self, base_url="http://127.0.0.1:8081", api_key=None, timeout=30):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout

    def call(self, method, path, body=None):
        """One request; `path` segments must already be encoded (see `seg`).
        Returns the parsed JSON answer (None for 204); raises ControlError
        for an error answer."""
        headers = {}
        data = None
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        if body is not None:
            headers["Content-Type"] = "application/json"
            data = json.dumps(body).encode()
        req = urllib.request.Request(self.base_url + path, data=data,
                                     headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as res:
                text = res.read()
                return json.loads(text) if text else None
        except urllib.error.HTTPError as e:
            text = e.read().decode("utf-8", "replace")
            try:
                err = json.loads(text)
            except ValueError:
                err = {}
            if not isinstance(err, dict):
                err = {}
            raise ControlError(e.code, err.get("code", ""), err.get("message", text)) from None

    def publish(self, channel, message, idempotency_key=None):
        """Publishes to a channel; returns {offset, epoch, duplicate}."""
        body = _message_body(message)
        if idempotency_key is not None:
            body["idempotency_key"] = idempotency_key
        return self.call("POST", f"/v1/channels/{seg(channel)}/messages", body)

    def send(self, connection_id, message):
        """Sends to one connection; returns {"status": "delivered"}."""
        return self.call("POST", f"/v1/connections/{seg(connection_id)}/messages",
                         _message_body(message))


# --- run directly: `check` (used by the test suite) or `serve` (a demo) ---

def _check(env):
    """Verifies the cases of CHECK_CASES (JSON [{timestamp, signature,
    body_b64}]) with SWITCHBOARD_ORIGIN_SECRET, publishes CHECK_TEXT to
    CHECK_CHANNEL twice with the idempotency key CHECK_KEY, sends CHECK_TEXT
    to CHECK_CONNECTION, and tries a wrong API key; prints the results as JSON."""
    secret = env["SWITCHBOARD_ORIGIN_SECRET"]
    out = {"verify": [verify(secret, c["timestamp"], c["signature"],
                             base64.b64decode(c["body_b64"]))
                      for c in json.loads(env["CHECK_CASES"])]}
    api = ControlClient(env["SWITCHBOARD_CONTROL_URL"], env.get("SWITCHBOARD_API_KEY"))
    channel, text, key = env["CHECK_CHANNEL"], env["CHECK_TEXT"], env["CHECK_KEY"]
    out["publish"] = api.publish(channel, text, key)
    out["publish_again"] = api.publish(channel, text, key)
    out["send"] = api.send(env["CHECK_CONNECTION"], text)
    out["send_binary"] = api.send(env["CHECK_CONNECTION"], b"\x00\x01\xff")

    def error_of(call):
        try:
            call()
            return None
        except ControlError as e:
            return {"status": e.status, "code": e.code}

    wrong = ControlClient(env["SWITCHBOARD_CONTROL_URL"], "wrong")
    out["wrong_key"] = error_of(lambda: wrong.publish(channel, "x"))
    out["unknown_connection"] = error_of(lambda: api.send(env["CHECK_CONNECTION"] + "x", "x"))
    print(json.dumps(out), flush=True)


def _serve(env, port):
    """An origin on 127.0.0.1 that verifies every request with
    SWITCHBOARD_ORIGIN_SECRET (401 if it fails), accepts every connection and
    echoes each text message back as "echo: <text>". Prints "listening <port>"."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    secret = env["SWITCHBOARD_ORIGIN_SECRET"]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if not verify(secret, self.headers.get("X-Switchboard-Timestamp"),
                          self.headers.get("X-Switchboard-Signature"), raw):
                return self._answer(401, {"reason": "bad signature"})
            try:
                events = json.loads(raw)["events"]
            except (ValueError, KeyError, TypeError):
                return self._answer(400, {"reason": "not an event batch"})
            replies = []
            for event in events:
                if event["type"] == "message" and "text" in event:
                    replies.append({"connection_id": event["connection_id"],
                                    "text": "echo: " + event["text"]})
                # Skip types you do not handle (new ones may appear).
            self._answer(200, {"replies": replies})

        def _answer(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", int(port or 3000)), Handler)
    server.daemon_threads = True
    print(f"listening {server.server_address[1]}", flush=True)
    if env.get("SWITCHBOARD_EXIT_ON_STDIN_EOF"):
        def exit_on_eof():
            sys.stdin.read()
            os._exit(0)
        threading.Thread(target=exit_on_eof, daemon=True).start()
    server.serve_forever()


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else ""
    if mode == "check":
        _check(os.environ)
    elif mode == "serve":
        _serve(os.environ, sys.argv[2] if len(sys.argv) > 2 else None)
    else:
        sys.exit("usage: python3 origin.py check | serve [port]")
