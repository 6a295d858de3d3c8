// Switchboard origin helpers for Node.js 18+: webhook verification and a
// minimal control API client. No npm packages: node:crypto, node:http and
// the global fetch only. Copy this file into your project, or import it:
//
//   import { verify, ControlClient } from "./origin.mjs";
//
// Run directly, it is also a tiny demo origin (see docs/origin-helpers.md):
//
//   SWITCHBOARD_ORIGIN_SECRET=s3cret node origin.mjs serve 3000
//
// The contract is docs/origin.md (webhooks) and docs/control-api.md.

import { createHmac, timingSafeEqual } from "node:crypto";
import { createServer } from "node:http";
import { pathToFileURL } from "node:url";

/** How far (seconds) a request's timestamp may be from our clock, either way. */
export const DEFAULT_TOLERANCE_SECONDS = 300;

/**
 * Checks a webhook request: `timestamp` and `signature` are the values of
 * the X-Switchboard-Timestamp and X-Switchboard-Signature headers, `rawBody`
 * the body exactly as received (a Buffer or Uint8Array; a string is taken
 * as UTF-8). Verify before parsing the JSON, never a re-serialized copy.
 * Returns true only for a fresh timestamp and a matching signature.
 */
export function verify(secret, timestamp, signature, rawBody,
                       toleranceSeconds = DEFAULT_TOLERANCE_SECONDS,
                       nowSeconds = Date.now() / 1000) {
  const ts = String(timestamp ?? "").trim();
  if (!/^[0-9]{1,15}$/.test(ts)) return false;
  const seconds = Number(ts);
  if (Math.abs(nowSeconds - seconds) > toleranceSeconds) return false;
  const sig = String(signature ?? "").trim();
  if (!/^v1=[0-9a-fA-F]{64}$/.test(sig)) return false;
  const given = Buffer.from(sig.slice(3), "hex");
  const want = createHmac("sha256", secret)
    .update(`${seconds}.`)
    .update(rawBody ?? "")
    .digest();
  return timingSafeEqual(given, want);
}

/** A control API error answer: `status` (HTTP) and the stable `code`. */
export class ControlError extends Error {
  constructor(status, code, message) {
    super(`control API answered ${status} ${code}: ${message}`);
    this.name = "ControlError";
    this.status = status;
    this.code = code;
  }
}

/** `text` (a string) or binary data (Buffer/Uint8Array) as a message body. */
function messageBody(message) {
  if (typeof message === "string") return { text: message };
  return { binary: Buffer.from(message).toString("base64") };
}

/** A minimal client of a gateway's control API (`--control-listen`). */
export class ControlClient {
  constructor(baseUrl = "http://127.0.0.1:8081", apiKey = undefined) {
    this.baseUrl = String(baseUrl).replace(/\/+$/, "");
    this.apiKey = apiKey;
  }

  /**
   * One request; `path` segments must already be encoded (see `seg`).
   * Resolves to the parsed JSON answer (null for 204); rejects with a
   * ControlError for an error answer.
   */
  async call(method, path, body = undefined) {
    const headers = {};
    if (this.apiKey) headers.authorization = `Bearer ${this.apiKey}`;
    if (body !== undefined) headers["content-type"] = "application/json";
    const res = await fetch(this.baseUrl + path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await res.text();
    let json = null;
    try { json = text ? JSON.parse(text) : null; } catch { /* not JSON */ }
    if (!res.ok) {
      throw new ControlError(res.status, json?.code ?? "", json?.message ?? text);
    }
    return json;
  }

  /** Publishes to a channel: resolves to {offset, epoch, duplicate}. */
  publish(channel, message, idempotencyKey = undefined) {
    const body = messageBody(message);
    if (idempotencyKey !== undefined) body.idempotency_key = idempotencyKey;
    return this.call("POST", `/v1/channels/${seg(channel)}/messages`, body);
  }

  /** Sends to one connection: resolves to {status: "delivered"}. */
  send(connectionId, message) {
    return this.call("POST", `/v1/connections/${seg(connectionId)}/messages`,
                     messageBody(message));
  }
}

/** One percent-encoded path segment (channel names may hold `/ ? # %`). */
export function seg(s) {
  return encodeURIComponent(s);
}

// --- run directly: `check` (used by the test suite) or `serve` (a demo) ---

/**
 * `check`: verifies the cases of CHECK_CASES (JSON [{timestamp, signature,
 * body_b64}]) with SWITCHBOARD_ORIGIN_SECRET, publishes CHECK_TEXT to
 * CHECK_CHANNEL twice with the idempotency key CHECK_KEY, sends CHECK_TEXT
 * to CHECK_CONNECTION, and tries a wrong API key; prints the results as JSON.
 */
async function check(env) {
  const secret = env.SWITCHBOARD_ORIGIN_SECRET;
  const cases = JSON.parse(env.CHECK_CASES);
  const out = {
    verify: cases.map((c) =>
      verify(secret, c.timestamp, c.signature, Buffer.from(c.body_b64, "base64"))),
  };
  const api = new ControlClient(env.SWITCHBOARD_CONTROL_URL, env.SWITCHBOARD_API_KEY);
  out.publish = await api.publish(env.CHECK_CHANNEL, env.CHECK_TEXT, env.CHECK_KEY);
  out.publish_again = await api.publish(env.CHECK_CHANNEL, env.CHECK_TEXT, env.CHECK_KEY);
  out.send = await api.send(env.CHECK_CONNECTION, env.CHECK_TEXT);
  out.send_binary = await api.send(env.CHECK_CONNECTION, Buffer.from([0, 1, 255]));
  const errorOf = async (p) => {
    try { await p; return null; } catch (e) { return { status: e.status, code: e.code }; }
  };
  out.wrong_key = await errorOf(
    new ControlClient(env.SWITCHBOARD_CONTROL_URL, "wrong").publish(env.CHECK_CHANNEL, "x"));
  out.unknown_connection = await errorOf(api.send(`${env.CHECK_CONNECTION}x`, "x"));
  console.log(JSON.stringify(out));
}

/**
 * `serve [port]`: an origin on 127.0.0.1 that verifies every request with
 * SWITCHBOARD_ORIGIN_SECRET (401 if it fails), accepts every connection and
 * echoes each text message back as "echo: <text>". Prints "listening <port>".
 */
function serve(env, port) {
  const secret = env.SWITCHBOARD_ORIGIN_SECRET;
  const server = createServer((req, res) => {
    const chunks = [];
    req.on("data", (c) => chunks.push(c));
    req.on("end", () => {
      const raw = Buffer.concat(chunks);
      const answer = (status, body) => {
        res.writeHead(status, { "content-type": "application/json" });
        res.end(JSON.stringify(body));
      };
      if (!verify(secret, req.headers["x-switchboard-timestamp"],
                  req.headers["x-switchboard-signature"], raw)) {
        return answer(401, { reason: "bad signature" });
      }
      let events;
      try {
        events = JSON.parse(raw).events;
      } catch {
        return answer(400, { reason: "not an event batch" });
      }
      const replies = [];
      for (const event of events) {
        if (event.type === "message" && typeof event.text === "string") {
          replies.push({ connection_id: event.connection_id, text: `echo: ${event.text}` });
        }
        // Skip types you do not handle (new ones may appear).
      }
      answer(200, { replies });
    });
  });
  server.listen(Number(port ?? 3000), "127.0.0.1", () => {
    console.log(`listening ${server.address().port}`);
  });
  if (env.SWITCHBOARD_EXIT_ON_STDIN_EOF) {
    process.stdin.on("end", () => process.exit(0)).resume();
  }
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  const [mode, arg] = process.argv.slice(2);
  if (mode === "check") {
    check(process.env).catch((e) => { console.error(e); process.exit(1); });
  } else if (mode === "serve") {
    serve(process.env, arg);
  } else {
    console.error("usage: node origin.mjs check | serve [port]");
    process.exit(2);
  }
}
