// The choice of transport, without a gateway: a scripted WebSocket and a
// scripted fetch play the network, so every rule of "Transports and
// fallbacks" (README.md) is checked on its own: fall back at once or after
// fallbackTimeoutMs, keep what worked, try WebSocket again after
// fallbackRetryMs, start over after a failed round, and which refusals end
// the client.

import { test } from "node:test";
import assert from "node:assert/strict";
import { SwitchboardClient } from "../dist/index.js";
import { waitFor, sleep } from "../testlib/helpers.mjs";

/** The fake network: how each transport answers next, and what was asked. */
function network() {
  const net = { ws: "refuse400", sse: "ok", lp: "ok", log: [], streams: [], sockets: [] };
  const connected = (url, kind) => {
    const resume = new URL(url).searchParams.get("resume");
    return { push: "connected", client: resume ? "id-1" : `id-${net.log.length}`, node: "n", session: "TOKEN", resumed: !!resume, via: kind };
  };

  class FakeWebSocket {
    constructor(url, protocol) {
      this.url = url;
      this.protocol = "";
      this.readyState = 0;
      this.binaryType = "blob";
      this.listeners = {};
      net.log.push(`websocket ${new URL(url).search}`);
      net.sockets.push(this);
      const mode = net.ws;
      setTimeout(() => {
        if (mode === "hang" || this.readyState === 3) return;
        if (mode.startsWith("refuse")) {
          this.fire("error", { message: `Unexpected server response: ${mode.slice(6)}` });
          this.readyState = 3;
          this.fire("close", { code: 1006, reason: "" });
          return;
        }
        this.readyState = 1;
        this.protocol = protocol;
        this.fire("open", {});
        this.fire("message", { data: JSON.stringify(connected(url, "websocket")) });
      }, 5);
    }
    fire(type, ev) {
      for (const fn of [...(this.listeners[type] ?? [])]) fn(ev);
    }
    addEventListener(type, fn) {
      (this.listeners[type] ??= new Set()).add(fn);
    }
    removeEventListener(type, fn) {
      this.listeners[type]?.delete(fn);
    }
    send() {}
    close() {
      this.terminate();
    }
    terminate() {
      if (this.readyState === 3) return;
      this.readyState = 3;
      this.fire("close", { code: 1006, reason: "" });
    }
  }

  const fetch = async (input, init = {}) => {
    const url = new URL(input);
    const method = init.method ?? "GET";
    if (method !== "GET") return new Response(null, { status: 204 });
    const lp = url.searchParams.get("transport") === "long-poll";
    if (lp && url.searchParams.has("session")) {
      // A poll: waits until aborted.
      return new Promise((_, reject) => init.signal?.addEventListener("abort", () => reject(new Error("aborted"))));
    }
    const kind = lp ? "long-poll" : "sse";
    net.log.push(`${kind} ${url.search}`);
    const mode = lp ? net.lp : net.sse;
    if (mode === "fail") throw new TypeError("fetch failed");
    if (/^\d+$/.test(mode)) return new Response(JSON.stringify({ code: "some_code", message: "no" }), { status: Number(mode) });
    if (lp) return new Response(JSON.stringify({ cursor: 1, pushes: [connected(url.toString(), kind)] }), { status: 200 });
    let controller;
    const body = new ReadableStream({
      start(c) {
        controller = c;
      },
    });
    init.signal?.addEventListener("abort", () => {
      try {
        controller.error(new Error("aborted"));
      } catch {}
    });
    if (mode === "ok") controller.enqueue(new TextEncoder().encode(`data: ${JSON.stringify(connected(url.toString(), kind))}\n\n`));
    net.streams.push(controller);
    return new Response(body, { status: 200, headers: { "content-type": "text/event-stream" } });
  };
  return { net, FakeWebSocket, fetch };
}

function client(env, options = {}) {
  const c = new SwitchboardClient("ws://gw.example/ws?app=x", {
    WebSocket: env.FakeWebSocket,
    fetch: env.fetch,
    browserEvents: false,
    backoffInitialMs: 20,
    backoffMaxMs: 50,
    ...options,
  });
  const events = [];
  for (const name of ["transport", "fallback", "connected", "resumed", "restarted", "disconnected", "connectFailed", "failed"]) {
    c.on(name, (e) => events.push({ name, ...(e instanceof Error ? { error: e } : e) }));
  }
  return { c, events };
}

/** Ends the current SSE stream as a lost link (no close event). */
const loseStream = (net) => net.streams.at(-1).close();

test("policy: a refused upgrade falls back at once; the transport that worked is kept; after fallbackRetryMs WebSocket is tried again", async () => {
  const env = network();
  const { net } = env;
  const { c, events } = client(env, { fallbackRetryMs: 300 });
  try {
    await c.connect();
    assert.equal(c.transport, "sse");
    assert.deepEqual(net.log, ["websocket ?app=x", "sse ?app=x"]);
    assert.deepEqual(
      events.map((e) => e.name),
      ["fallback", "transport", "connected"],
    );
    assert.deepEqual([events[0].from, events[0].to, events[0].error.status], ["websocket", "sse", 400]);

    // A lost stream: the reconnect goes straight to SSE and resumes there.
    loseStream(net);
    await waitFor(() => events.some((e) => e.name === "resumed"), 2000, "resumed");
    assert.deepEqual(net.log.slice(2), ["sse ?app=x&resume=TOKEN&received=0"]);

    // fallbackRetryMs later, the next reconnect starts with WebSocket again (which now works).
    net.ws = "ok";
    await sleep(350);
    loseStream(net);
    await waitFor(() => events.filter((e) => e.name === "resumed").length === 2, 2000, "resumed again");
    assert.deepEqual(net.log.slice(3), ["websocket ?app=x&resume=TOKEN&received=0"]);
    assert.equal(c.transport, "websocket");
    const last = events.filter((e) => e.name === "transport").at(-1);
    assert.deepEqual([last.transport, last.previous], ["websocket", "sse"]);
  } finally {
    await c.close();
  }
});

test("policy: no `connected` push within fallbackTimeoutMs goes on to the next transport; the last one gets connectTimeoutMs", async () => {
  const env = network();
  const { net } = env;
  net.ws = "hang";
  net.sse = "silent"; // a 200 event stream that says nothing: a buffering proxy
  const { c, events } = client(env, { fallbackTimeoutMs: 150, connectTimeoutMs: 2000 });
  try {
    const t0 = Date.now();
    await c.connect();
    const took = Date.now() - t0;
    assert.ok(took >= 280 && took < 1500, `took ${took} ms`);
    assert.equal(c.transport, "long-poll");
    assert.deepEqual(
      events.filter((e) => e.name === "fallback").map((e) => [e.from, e.to, e.error.code]),
      [
        ["websocket", "sse", "timeout"],
        ["sse", "long-poll", "timeout"],
      ],
    );
    assert.equal(net.sockets[0].readyState, 3, "the hanging socket was aborted");
  } finally {
    await c.close();
  }
});

test("policy: a round where everything failed is one connectFailed; the next round starts from the first transport; an unreachable host ends a round", async () => {
  const env = network();
  const { net } = env;
  net.ws = "refuse503";
  net.sse = "503";
  net.lp = "503";
  const { c, events } = client(env);
  try {
    c.connect();
    await waitFor(() => events.filter((e) => e.name === "connectFailed").length >= 2, 2000, "two failed rounds");
    const firstRounds = net.log.slice(0, 6).map((l) => l.split(" ")[0]);
    assert.deepEqual(firstRounds, ["websocket", "sse", "long-poll", "websocket", "sse", "long-poll"]);
    const failed = events.find((e) => e.name === "connectFailed");
    assert.equal(failed.error.status, 503);
    // SSE gets no answer at all: the network is down, long-polling would fail the same way (or land by
    // chance on a network just back, and be kept): the round ends there.
    net.sse = "fail";
    const from = net.log.length;
    const rounds = events.filter((e) => e.name === "connectFailed").length;
    await waitFor(() => events.filter((e) => e.name === "connectFailed").length >= rounds + 3, 2000, "three more failed rounds (the first may have begun before)");
    const later = net.log.slice(from).map((l) => l.split(" ")[0]);
    const start = later.indexOf("websocket");
    assert.deepEqual(later.slice(start, start + 4), ["websocket", "sse", "websocket", "sse"]);
    assert.match(events.filter((e) => e.name === "connectFailed").at(-1).error.message, /fetch failed/);
    // Now SSE works: the client settles there and keeps it.
    net.sse = "ok";
    await waitFor(() => c.state === "connected", 2000, "connected");
    assert.equal(c.transport, "sse");
    // 426: a gateway without this transport; the next one is tried.
    net.sse = "426";
    net.lp = "ok";
    const before = net.log.length;
    loseStream(net);
    await waitFor(() => c.transport === "long-poll" && c.state === "connected", 2000, "long-poll");
    const fb = events.filter((e) => e.name === "fallback").at(-1);
    assert.deepEqual([fb.from, fb.to, fb.error.code, fb.error.status], ["sse", "long-poll", "protocol", 426]);
    // That round started with the kept transport, SSE, not with WebSocket.
    assert.deepEqual(net.log.slice(before).map((l) => l.split(" ")[0]), ["sse", "long-poll"]);
    assert.ok(!events.some((e) => e.name === "failed"));
  } finally {
    await c.close();
  }
});

test("policy: terminal refusals: a WebSocket 401, an SSE 403; a WebSocket refused when it is the only transport", async () => {
  for (const [options, ws, sse, status, asked] of [
    [{}, "refuse401", "ok", 401, ["websocket"]],
    [{}, "refuse400", "403", 403, ["websocket", "sse"]],
    [{ transports: ["websocket"] }, "refuse400", "ok", 400, ["websocket"]],
    [{ transports: ["long-poll", "sse"] }, "refuse400", "ok", 404, ["long-poll"]],
  ]) {
    const env = network();
    env.net.ws = ws;
    env.net.sse = sse;
    env.net.lp = "404";
    const { c, events } = client(env, options);
    await assert.rejects(c.connect(), (e) => e.code === "refused" && e.status === status);
    assert.equal(c.state, "closed");
    assert.deepEqual(env.net.log.map((l) => l.split(" ")[0]), asked);
    assert.ok(events.some((e) => e.name === "failed"));
  }
});

test("policy: options are checked", () => {
  const env = network();
  assert.throws(() => new SwitchboardClient("ws://x/ws", { transports: [] }), /empty/);
  assert.throws(() => new SwitchboardClient("ws://x/ws", { transports: ["carrier-pigeon"], fetch: env.fetch }), /unknown transport/);
  assert.throws(() => new SwitchboardClient("ws://x/ws", { transports: ["sse", "sse"], fetch: env.fetch }), /twice/);
  // No WebSocket needed without the websocket transport.
  const saved = globalThis.WebSocket;
  try {
    globalThis.WebSocket = undefined;
    assert.throws(() => new SwitchboardClient("ws://x/ws", { fetch: env.fetch }), /no WebSocket constructor/);
    new SwitchboardClient("ws://x/ws", { transports: ["sse"], fetch: env.fetch });
  } finally {
    globalThis.WebSocket = saved;
  }
});
