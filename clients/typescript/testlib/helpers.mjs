// What the SDK tests share: the real gateway binary on free ports, a TCP
// proxy that can cut every connection without a close frame, the control
// API, and waiting.

import { spawn } from "node:child_process";
import { createServer, connect } from "node:net";
import { existsSync } from "node:fs";
import { fileURLToPath } from "node:url";
import path from "node:path";
import WebSocket from "ws";
import { SwitchboardClient } from "../dist/index.js";

const pkg = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const root = path.resolve(pkg, "../..");

/** The gateway binary: $SWITCHBOARD_BIN, else the workspace's release build (honours CARGO_TARGET_DIR). */
export const gatewayBin =
  process.env.SWITCHBOARD_BIN ?? path.join(process.env.CARGO_TARGET_DIR ?? path.join(root, "target"), "release", "switchboard");

/** A free loopback port (bound by the OS, then released). */
export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Polls `predicate` until it is truthy, for at most `ms`. */
export async function waitFor(predicate, ms = 10_000, what = "condition") {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = await predicate();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(20);
  }
}

/** Starts the gateway (dev mode) on free ports and waits for /readyz. */
export async function startGateway(extraArgs = []) {
  if (!existsSync(gatewayBin)) {
    throw new Error(`gateway binary not found at ${gatewayBin}: build it (cargo build --release -p switchboard) or set SWITCHBOARD_BIN`);
  }
  const port = await freePort();
  const controlPort = await freePort();
  const child = spawn(
    gatewayBin,
    [
      "serve",
      "--listen",
      `127.0.0.1:${port}`,
      "--control-listen",
      `127.0.0.1:${controlPort}`,
      "--namespace",
      "chat:history-size=100,presence,join-leave,publish,subscribe",
      "--ping-interval",
      "1s",
      ...extraArgs,
    ],
    { stdio: ["ignore", "ignore", "pipe"], env: { ...process.env, RUST_LOG: process.env.RUST_LOG ?? "warn" } },
  );
  let stderr = "";
  child.stderr.on("data", (d) => {
    stderr += d;
    if (stderr.length > 100_000) stderr = stderr.slice(-50_000);
  });
  const exited = new Promise((resolve) => child.once("exit", resolve));
  const control = `http://127.0.0.1:${controlPort}`;
  const deadline = Date.now() + 15_000;
  for (;;) {
    if (child.exitCode !== null) throw new Error(`gateway exited with ${child.exitCode}: ${stderr}`);
    try {
      const r = await fetch(`${control}/readyz`);
      if (r.status === 200) break;
    } catch {}
    if (Date.now() > deadline) {
      child.kill("SIGKILL");
      throw new Error(`gateway not ready within 15 s: ${stderr}`);
    }
    await sleep(50);
  }
  return {
    port,
    control,
    url: `ws://127.0.0.1:${port}/ws`,
    stderr: () => stderr,
    async stop() {
      if (child.exitCode === null) {
        child.kill("SIGKILL");
        await exited;
      }
    },
  };
}

/**
 * A TCP proxy in front of the gateway. `cut()` destroys every connection
 * (the gateway and the client see the TCP connection end, no close frame);
 * `hold()` also refuses new connections until `release()`; `freeze()` stops
 * forwarding without closing (a dead link). Options play the networks the
 * HTTP fallbacks are for:
 *
 * - `refuseUpgrade`: a proxy that strips WebSocket: a request with
 *   `Upgrade: websocket` is answered `400` and closed (`refusedUpgrades`
 *   counts them); plain HTTP passes;
 * - `bufferEventStreams`: a proxy that buffers streamed answers: once a
 *   connection carried a request with `Accept: text/event-stream`, nothing
 *   more of the gateway's reaches the client on it.
 *
 * Both can be changed later through `proxy.options` (for new requests).
 */
export async function startProxy(targetPort, options = {}) {
  const pairs = new Set();
  let holding = false;
  let accepted = 0;
  let refusedUpgrades = 0;
  const heads = [];
  const server = createServer((client) => {
    if (holding) {
      client.destroy();
      return;
    }
    accepted += 1;
    const upstream = connect(targetPort, "127.0.0.1");
    const pair = { client, upstream, frozen: false, buffering: false };
    client.once("data", (chunk) => heads.push(chunk.toString("latin1").split("\r\n")[0]));
    pairs.add(pair);
    const end = () => {
      client.destroy();
      upstream.destroy();
      pairs.delete(pair);
    };
    client.on("error", end);
    upstream.on("error", end);
    client.on("close", end);
    upstream.on("close", end);
    client.on("data", (chunk) => {
      if (pair.frozen) return;
      const text = chunk.toString("latin1");
      if (options.refuseUpgrade && /\r\nupgrade:[ \t]*websocket/i.test(text)) {
        refusedUpgrades += 1;
        pairs.delete(pair);
        upstream.destroy();
        client.end("HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\ncontent-length: 21\r\nconnection: close\r\n\r\nno upgrades here, sir");
        return;
      }
      if (options.bufferEventStreams && /\r\naccept:[ \t]*text\/event-stream/i.test(text)) pair.buffering = true;
      upstream.write(chunk);
    });
    upstream.on("data", (chunk) => {
      if (!pair.frozen && !pair.buffering) client.write(chunk);
    });
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  const port = server.address().port;
  return {
    port,
    url: `ws://127.0.0.1:${port}/ws`,
    options,
    get accepted() {
      return accepted;
    },
    get refusedUpgrades() {
      return refusedUpgrades;
    },
    /** The request line of every connection accepted. */
    heads,
    get open() {
      return pairs.size;
    },
    cut() {
      for (const { client, upstream } of [...pairs]) {
        // Closed without a close frame. Not resetAndDestroy(): with the HTTP fallbacks' streams through
        // the proxy, reset sockets leave Node 20 spinning at exit in its handle cleanup.
        client.destroy();
        upstream.destroy();
      }
      pairs.clear();
    },
    /** Stops forwarding on every open connection, without closing it (a dead link). */
    freeze() {
      for (const pair of pairs) {
        pair.frozen = true;
        pair.client.pause();
        pair.upstream.pause();
      }
    },
    hold() {
      holding = true;
      this.cut();
    },
    release() {
      holding = false;
    },
    close() {
      this.cut();
      return new Promise((resolve) => server.close(resolve));
    },
  };
}

/** A control API call; returns { status, body }. */
export async function api(gw, method, pathname, body) {
  const r = await fetch(`${gw.control}${pathname}`, {
    method,
    headers: body === undefined ? {} : { "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await r.text();
  let json;
  try {
    json = text ? JSON.parse(text) : undefined;
  } catch {
    json = text;
  }
  return { status: r.status, body: json };
}

/** Sends a direct message through the control API. */
export function sendDirect(gw, id, text) {
  return api(gw, "POST", `/v1/connections/${encodeURIComponent(id)}/messages`, { text });
}

/** Publishes through the control API. */
export function publish(gw, channel, text) {
  return api(gw, "POST", `/v1/channels/${encodeURIComponent(channel)}/messages`, { text });
}

/** A client over `ws`, with fast backoff for tests; records every client event. */
export function newClient(url, options = {}) {
  const client = new SwitchboardClient(url, {
    WebSocket,
    backoffInitialMs: 50,
    backoffMaxMs: 300,
    ...options,
  });
  const events = [];
  for (const name of ["connected", "resumed", "restarted", "disconnected", "connectFailed", "transport", "fallback", "serverSubscribed", "serverUnsubscribed", "failed", "closed"]) {
    client.on(name, (e) => events.push({ ...(e ?? {}), name, error: e instanceof Error ? e : e?.error }));
  }
  return { client, events };
}

/**
 * A WebSocket with only what a browser's has: no `terminate()` and no view
 * of pings (the `ws` socket it wraps still answers them, as browsers do).
 */
export class BrowserLikeWebSocket {
  static instances = [];
  constructor(url, protocols) {
    this.inner = new WebSocket(url, protocols);
    BrowserLikeWebSocket.instances.push(this);
  }
  get protocol() {
    return this.inner.protocol;
  }
  get readyState() {
    return this.inner.readyState;
  }
  get binaryType() {
    return this.inner.binaryType;
  }
  set binaryType(v) {
    this.inner.binaryType = v;
  }
  send(data) {
    this.inner.send(data);
  }
  close(code, reason) {
    this.inner.close(code, reason);
  }
  addEventListener(type, fn) {
    this.inner.addEventListener(type, fn);
  }
  removeEventListener(type, fn) {
    this.inner.removeEventListener(type, fn);
  }
}
