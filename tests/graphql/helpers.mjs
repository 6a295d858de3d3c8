// What the GraphQL tests share: where the gateway binary is, free ports,
// waiting for a server, starting the release gateway and the example origin
// (examples/graphql-origin) as child processes, a raw WebSocket client that
// queues what it receives, the control API, and HS256 client tokens.

import { createServer } from "node:net";
import { spawn, spawnSync } from "node:child_process";
import { createHash, createHmac } from "node:crypto";
import { existsSync, mkdirSync, rmdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { fileURLToPath } from "node:url";
import path from "node:path";
import assert from "node:assert/strict";
import WebSocket from "ws";

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, "../..");

/** Cargo's target directory (honours CARGO_TARGET_DIR). */
export const targetDir = process.env.CARGO_TARGET_DIR ?? path.join(root, "target");

/** The release gateway. */
export const gatewayBin = path.join(targetDir, "release", "switchboard");

/** The example GraphQL origin. */
export const originDir = path.join(root, "examples", "graphql-origin");

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/**
 * Installs the example origin's dependencies (`npm ci`) when they are
 * missing, so that `npm ci && node --test` is enough (`npm test` does it in
 * its pretest). Test files run in parallel processes: a lock directory lets
 * one install while the others wait.
 */
async function installOrigin() {
  const marker = path.join(originDir, "node_modules", "graphql", "package.json");
  const lock = path.join(tmpdir(), "switchboard-graphql-origin-npm-ci.lock");
  const deadline = Date.now() + 180_000;
  while (!existsSync(marker)) {
    try {
      mkdirSync(lock);
    } catch {
      if (Date.now() > deadline) throw new Error(`${lock} held for 3 minutes: remove it`);
      await sleep(200);
      continue;
    }
    try {
      if (!existsSync(marker)) {
        const npm = spawnSync("npm", ["ci", "--no-audit", "--no-fund"], { cwd: originDir, stdio: ["ignore", "ignore", "inherit"] });
        assert.equal(npm.status, 0, `npm ci in ${originDir} failed`);
      }
    } finally {
      rmdirSync(lock);
    }
  }
}

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

/** Polls `url` until it answers 2xx, for at most `ms`. */
export async function waitForHttp(url, ms) {
  const deadline = Date.now() + ms;
  for (;;) {
    try {
      const r = await fetch(url);
      if (r.ok) return;
    } catch {}
    if (Date.now() > deadline) throw new Error(`${url} did not answer within ${ms} ms`);
    await sleep(50);
  }
}

/** Waits until `f()` gives something truthy (returned), for at most `ms`. */
export async function until(what, f, ms = 10_000) {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = await f();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await sleep(50);
  }
}

/** Rejects with `what` when `promise` has not settled within `ms`. */
export function within(ms, what, promise) {
  let timer;
  return Promise.race([
    promise,
    new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
    }),
  ]).finally(() => clearTimeout(timer));
}

// Every child process started here, killed when the test process exits
// whatever happened (a failed assertion, a timeout).
const children = new Set();
process.on("exit", () => {
  for (const child of children) child.kill("SIGKILL");
});

function track(child, name) {
  children.add(child);
  const exited = new Promise((resolve) => child.once("exit", (code, signal) => resolve({ code, signal })));
  child.once("exit", () => children.delete(child));
  return {
    child,
    exited,
    /** Kills the process (SIGKILL: no drain) and waits for its end. */
    async kill() {
      if (child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
      await within(5_000, `${name} to exit`, exited);
    },
  };
}

/**
 * Starts the example origin on a free port; it publishes triggers to
 * `control` (a control API base URL). `env` adds environment variables.
 */
export async function startOrigin({ control, env = {} } = {}) {
  await installOrigin();
  const port = await freePort();
  const proc = spawn(process.execPath, [path.join(originDir, "server.mjs")], {
    cwd: originDir,
    env: { ...process.env, PORT: String(port), SWITCHBOARD_CONTROL: control ?? "http://127.0.0.1:9", ...env },
    stdio: ["ignore", "ignore", "inherit"],
  });
  const handle = track(proc, "the example origin");
  const url = `http://127.0.0.1:${port}`;
  await waitForHttp(`${url}/stats`, 10_000);
  const json = async (p, init) => (await fetch(`${url}${p}`, init)).json();
  return {
    ...handle,
    port,
    url,
    graphqlUrl: `${url}/graphql`,
    eventsUrl: `${url}/events`,
    /** `{executions: {digest or op name: n}, triggered: {…}, total}` */
    stats: () => json("/stats"),
    reset: () => json("/reset", { method: "POST" }),
    /** The webhook events the origin received, oldest first. */
    events: async () => (await json("/events")).events,
    /** The GraphQL requests the origin received lately: `{body, headers}`. */
    requests: async () => (await json("/requests")).requests,
  };
}

/**
 * Starts the release gateway on free ports with `args` more (after the
 * listeners, the warn log level, `--client-message-rate 0` and
 * `--max-connections 10000`). `control`
 * may be given (a port) when the origin had to know it first.
 */
export async function startGateway(args = [], { control } = {}) {
  assert.ok(existsSync(gatewayBin), `${gatewayBin} missing: cargo build --release -p switchboard`);
  const listen = await freePort();
  control ??= await freePort();
  const proc = spawn(
    gatewayBin,
    [
      "serve",
      "--listen", `127.0.0.1:${listen}`,
      "--control-listen", `127.0.0.1:${control}`,
      "--log-level", "warn",
      "--client-message-rate", "0",
      "--max-connections", "10000", // under the open-file limit: no warning at start
      ...args,
    ],
    { stdio: ["ignore", "inherit", "inherit"] },
  );
  const handle = track(proc, "the gateway");
  const controlUrl = `http://127.0.0.1:${control}`;
  await Promise.race([
    waitForHttp(`${controlUrl}/readyz`, 15_000),
    handle.exited.then(({ code, signal }) => {
      throw new Error(`the gateway exited (${code ?? signal}) at startup: switchboard serve ${args.join(" ")}`);
    }),
  ]);
  return {
    ...handle,
    port: listen,
    control,
    wsUrl: `ws://127.0.0.1:${listen}/graphql`,
    controlUrl,
    api: controlApi(controlUrl),
  };
}

/**
 * The usual pair: the example origin, and a gateway whose GraphQL endpoint
 * and webhooks are that origin's. `gatewayArgs` adds flags; `graphql: false`
 * leaves out `--graphql-endpoint`, `events: false` leaves out `--origin`.
 */
export async function startStack({ gatewayArgs = [], originEnv = {}, graphql = true, events = true } = {}) {
  const control = await freePort();
  const origin = await startOrigin({ control: `http://127.0.0.1:${control}`, env: originEnv });
  let gateway;
  try {
    gateway = await startGateway(
      [
        ...(graphql ? ["--graphql-endpoint", origin.graphqlUrl] : []),
        ...(events ? ["--origin", origin.eventsUrl] : []),
        ...gatewayArgs,
      ],
      { control },
    );
  } catch (e) {
    await origin.kill();
    throw e;
  }
  return {
    origin,
    gateway,
    wsUrl: gateway.wsUrl,
    api: gateway.api,
    async stop() {
      await gateway.kill();
      await origin.kill();
    },
  };
}

/** A small client of the control API at `base`: each call gives `{status, body}`. */
export function controlApi(base) {
  const call = async (method, p, body) => {
    const res = await fetch(`${base}${p}`, {
      method,
      headers: body === undefined ? {} : { "content-type": "application/json" },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await res.text();
    let json;
    try {
      json = text ? JSON.parse(text) : undefined;
    } catch {
      json = text;
    }
    return { status: res.status, body: json };
  };
  return {
    get: (p) => call("GET", p),
    post: (p, body) => call("POST", p, body),
    put: (p, body) => call("PUT", p, body),
    delete: (p) => call("DELETE", p),
    /** POST /v1/graphql/triggers, expecting 202. */
    async trigger(...triggers) {
      const r = await call("POST", "/v1/graphql/triggers", { triggers });
      assert.equal(r.status, 202, `POST /v1/graphql/triggers answered ${r.status} ${JSON.stringify(r.body)}`);
      return r.body;
    },
    /** The ids of the open connections of `user`, waiting until there are `n`. */
    async connectionsOf(user, n = 1) {
      return until(`${n} connection(s) of ${user} in GET /v1/connections`, async () => {
        const r = await call("GET", `/v1/connections?user_id=${encodeURIComponent(user)}`);
        const ids = (r.body?.connections ?? []).map((c) => c.id ?? c.connection_id);
        return ids.length === n ? r.body.connections : null;
      });
    },
    async metrics() {
      return (await fetch(`${base}/metrics`)).text();
    },
  };
}

/** A counter of a Prometheus text exposition: the sum of the series of
 * `name` whose labels contain every `labels` pair. */
export function metric(text, name, labels = {}) {
  let sum = 0;
  for (const line of text.split("\n")) {
    if (line.startsWith("#")) continue;
    const m = line.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([0-9.eE+-]+)/);
    if (!m || m[1] !== name) continue;
    const have = m[2] ?? "";
    if (Object.entries(labels).every(([k, v]) => have.includes(`${k}="${v}"`))) sum += Number(m[3]);
  }
  return sum;
}

/**
 * A raw WebSocket client: keeps every message it receives (parsed JSON, or
 * `{binary}` / `{text}` when it is not JSON) in a queue that `next()` reads,
 * and its close in `closed`. `skip` drops messages as they arrive (the
 * legacy `ka`, say).
 */
export class Raw {
  constructor(ws, { skip } = {}) {
    this.ws = ws;
    this.queue = [];
    this.all = [];
    this.waiters = [];
    this.skip = skip;
    this.closed = new Promise((resolve) => ws.on("close", (code, reason) => resolve({ code, reason: reason.toString() })));
    this.closed.then(() => this.wake());
    ws.on("error", () => {});
    ws.on("message", (data, isBinary) => {
      let m;
      if (isBinary) m = { binary: data };
      else {
        try {
          m = JSON.parse(data.toString());
        } catch {
          m = { text: data.toString() };
        }
      }
      this.all.push(m);
      if (this.skip?.(m)) return;
      this.queue.push(m);
      this.wake();
    });
  }

  /** Opens `url` offering `protocols`; resolves once open. */
  static open(url, protocols, { skip, headers } = {}) {
    const ws = new WebSocket(url, protocols, { headers });
    const raw = new Raw(ws, { skip });
    return within(
      10_000,
      `opening ${url}`,
      new Promise((resolve, reject) => {
        ws.once("open", () => resolve(raw));
        ws.once("unexpected-response", (_req, res) => reject(new Error(`handshake answered ${res.statusCode}`)));
        ws.once("error", reject);
      }),
    );
  }

  get protocol() {
    return this.ws.protocol;
  }

  wake() {
    for (const w of this.waiters.splice(0)) w();
  }

  send(m) {
    this.ws.send(typeof m === "string" || Buffer.isBuffer(m) ? m : JSON.stringify(m));
  }

  /** The next message, within `ms`. */
  async next(ms = 5_000) {
    const deadline = Date.now() + ms;
    for (;;) {
      if (this.queue.length) return this.queue.shift();
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`no message within ${ms} ms (received so far: ${JSON.stringify(this.all)})`);
      if (this.ws.readyState === WebSocket.CLOSED) {
        const c = await this.closed;
        throw new Error(`closed (${c.code} ${c.reason}) while waiting for a message`);
      }
      await new Promise((resolve) => {
        const t = setTimeout(resolve, left);
        this.waiters.push(() => (clearTimeout(t), resolve()));
      });
    }
  }

  /** The next message, which must be of `type` (and have `id`, when given). */
  async expect(type, id, ms) {
    const m = await this.next(ms);
    assert.equal(m.type, type, `expected ${type}${id ? ` for ${id}` : ""}, got ${JSON.stringify(m)}`);
    if (id !== undefined) assert.equal(m.id, id, `expected ${type} for ${id}, got ${JSON.stringify(m)}`);
    return m;
  }

  /** The first message of `type` (and `id`, when given) in the queue, out of
   * order: the others stay queued. Within `ms`. */
  async take(type, id, ms = 5_000) {
    const deadline = Date.now() + ms;
    const match = (m) => m.type === type && (id === undefined || m.id === id);
    for (;;) {
      const i = this.queue.findIndex(match);
      if (i >= 0) return this.queue.splice(i, 1)[0];
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`no ${type}${id ? ` for ${id}` : ""} within ${ms} ms (received: ${JSON.stringify(this.all)})`);
      if (this.ws.readyState === WebSocket.CLOSED) {
        const c = await this.closed;
        throw new Error(`closed (${c.code} ${c.reason}) while waiting for ${type}`);
      }
      await new Promise((resolve) => {
        const t = setTimeout(resolve, left);
        this.waiters.push(() => (clearTimeout(t), resolve()));
      });
    }
  }

  /** Asserts that nothing arrives (beyond `skip`) for `ms`. */
  async quiet(ms) {
    await sleep(ms);
    assert.deepEqual(this.queue, [], `expected no message for ${ms} ms`);
  }

  /** The close code and reason, within `ms`. */
  closeWithin(ms = 5_000) {
    return within(ms, "the gateway to close the socket", this.closed);
  }

  close(code, reason) {
    this.ws.close(code, reason);
  }

  terminate() {
    this.ws.terminate();
  }
}

/** A modern (graphql-transport-ws) raw client past `connection_ack`. */
export async function modern(url, payload) {
  const raw = await Raw.open(url, ["graphql-transport-ws"]);
  assert.equal(raw.protocol, "graphql-transport-ws");
  raw.send(payload === undefined ? { type: "connection_init" } : { type: "connection_init", payload });
  raw.ack = await raw.expect("connection_ack");
  return raw;
}

/** A legacy (graphql-ws) raw client past `connection_ack`; `ka` is skipped. */
export async function legacy(url, payload) {
  const raw = await Raw.open(url, ["graphql-ws"], { skip: (m) => m.type === "ka" });
  assert.equal(raw.protocol, "graphql-ws");
  raw.send(payload === undefined ? { type: "connection_init" } : { type: "connection_init", payload });
  raw.ack = await raw.expect("connection_ack");
  return raw;
}

/** An HS256 client token signed with `secret`, with `claims` (exp: an hour
 * from now unless given). */
export function jwt(secret, claims) {
  const b64 = (v) => Buffer.from(JSON.stringify(v)).toString("base64url");
  const body = `${b64({ alg: "HS256", typ: "JWT" })}.${b64({ exp: Math.floor(Date.now() / 1000) + 3600, ...claims })}`;
  return `${body}.${createHmac("sha256", secret).update(body).digest("base64url")}`;
}


/**
 * What a client library hands an operation's observer: results (`next`),
 * then an end (`complete`) or a failure (`error`). `next()` reads the
 * results in order; `finished()` waits for the end.
 */
export class Feed {
  constructor(what = "operation") {
    this.what = what;
    this.items = [];
    this.read = 0;
    this.done = false;
    this.error = undefined;
    this.waiters = [];
  }

  /** An observer (`{next, error, complete}`) feeding this. */
  get observer() {
    return {
      next: (v) => this.push(v),
      error: (e) => this.fail(e),
      complete: () => this.end(),
    };
  }

  push(v) {
    this.items.push(v);
    this.wake();
  }

  fail(e) {
    this.error = e ?? new Error("failed without an error");
    this.done = true;
    this.wake();
  }

  end() {
    this.done = true;
    this.wake();
  }

  wake() {
    for (const w of this.waiters.splice(0)) w();
  }

  async wait(ms, what, ready) {
    const deadline = Date.now() + ms;
    for (;;) {
      if (ready()) return;
      const left = deadline - Date.now();
      if (left <= 0) {
        throw new Error(`${this.what}: timed out after ${ms} ms waiting for ${what} (results: ${JSON.stringify(this.items)}, error: ${describe(this.error)})`);
      }
      await new Promise((resolve) => {
        const t = setTimeout(resolve, left);
        this.waiters.push(() => (clearTimeout(t), resolve()));
      });
    }
  }

  /** The next result not read yet, within `ms`. */
  async next(ms = 5_000) {
    await this.wait(ms, "a result", () => this.items.length > this.read || this.done);
    if (this.items.length > this.read) return this.items[this.read++];
    throw new Error(`${this.what}: ended (${describe(this.error) ?? "complete"}) while a result was expected`);
  }

  /** Waits for the end: the results when it completed, throws the error when it failed. */
  async finished(ms = 5_000) {
    await this.wait(ms, "the end", () => this.done);
    if (this.error !== undefined) throw this.error;
    return this.items;
  }

  /** The failure, within `ms` (throws if it completed instead). */
  async failure(ms = 5_000) {
    await this.wait(ms, "a failure", () => this.done);
    if (this.error === undefined) throw new Error(`${this.what}: completed (${JSON.stringify(this.items)}) where a failure was expected`);
    return this.error;
  }

  /** Asserts that no result comes in `ms` beyond those read. */
  async quiet(ms) {
    await sleep(ms);
    assert.deepEqual(this.items.slice(this.read), [], `${this.what}: expected no result for ${ms} ms`);
  }
}

/** A readable form of anything thrown or handed to an error callback. */
export function describe(e) {
  if (e === undefined) return undefined;
  if (e instanceof Error) return `${e.name}: ${e.message}`;
  if (e && typeof e === "object" && "code" in e && "reason" in e) return `close ${e.code} ${e.reason}`;
  try {
    return JSON.stringify(e);
  } catch {
    return String(e);
  }
}

/**
 * A `ws` WebSocket that records, for the tests, every socket a client library
 * opens through it: the frames it received (parsed) and how it closed.
 * Pass `spy.WebSocket` as the library's WebSocket implementation.
 */
export function socketSpy() {
  const spy = { sockets: [] };
  spy.WebSocket = class SpiedWebSocket extends WebSocket {
    constructor(...args) {
      super(...args);
      const record = { ws: this, frames: [], close: undefined };
      spy.sockets.push(record);
      this.on("message", (data, isBinary) => {
        try {
          record.frames.push(isBinary ? { binary: data } : JSON.parse(data.toString()));
        } catch {
          record.frames.push({ text: data.toString() });
        }
      });
      this.on("close", (code, reason) => (record.close = { code, reason: reason.toString() }));
    }
  };
  return spy;
}

/** The digest the example origin gives a subscription (as its server.mjs
 * computes it), to find it in the origin's /stats. */
export function digestOf({ query, variables, operationName }) {
  return createHash("sha256")
    .update(JSON.stringify([query, variables ?? {}, operationName ?? null]))
    .digest("hex");
}
