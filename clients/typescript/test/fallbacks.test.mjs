// The HTTP fallbacks against the real gateway (docs/fallbacks.md): a proxy
// that refuses WebSocket upgrades sends the client to SSE, one that buffers
// event streams to long-polling; streams and polls cut again and again
// lose nothing and double nothing; a session moves between transports; every
// command works over each transport.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { createHmac } from "node:crypto";
import { SwitchboardError } from "../dist/index.js";
import { startGateway, startProxy, newClient, waitFor, sleep, api, sendDirect, publish } from "../testlib/helpers.mjs";

let gw;
before(async () => {
  gw = await startGateway();
});
after(async () => {
  await gw?.stop();
});

const info = async (id) => (await api(gw, "GET", `/v1/connections/${encodeURIComponent(id)}`)).body;
const connected = (client) => waitFor(() => client.state === "connected", 15_000, "connected");
const range = (n, f) => Array.from({ length: n }, (_, i) => f(i + 1));

/** waitFor, whose failure lists the client's events (what it went through, and why). */
async function waitEvents(events, predicate, ms, what) {
  try {
    return await waitFor(predicate, ms, what);
  } catch (e) {
    const seen = events.map((ev) => [ev.name, ev.transport ?? ev.to ?? ev.reason?.kind ?? "", ev.error?.message ?? ""].filter(Boolean).join(" "));
    throw new Error(`${e.message}; events: ${seen.join(" | ")}`);
  }
}

test("WebSocket refused by a proxy: the client falls back to SSE at once, gets directs and channel messages; close() ends the session", async () => {
  const proxy = await startProxy(gw.port, { refuseUpgrade: true });
  const { client, events } = newClient(proxy.url);
  const got = [];
  const msgs = [];
  client.on("direct", (m) => got.push(m));
  try {
    const t0 = Date.now();
    const { clientId } = await client.connect();
    assert.ok(Date.now() - t0 < 4000, "a refused upgrade falls back without waiting for fallbackTimeoutMs");
    assert.equal(client.transport, "sse");
    assert.equal(proxy.refusedUpgrades, 1);
    const fb = events.filter((e) => e.name === "fallback");
    assert.equal(fb.length, 1);
    assert.deepEqual([fb[0].from, fb[0].to, fb[0].error.status], ["websocket", "sse", 400]);
    const names = events.map((e) => e.name);
    assert.deepEqual(names, ["fallback", "transport", "connected"]);
    assert.deepEqual([events[1].transport, events[1].previous], ["sse", undefined]);
    assert.equal((await info(clientId)).transport, "sse");

    const sub = await client.subscribe("chat:fb-sse", { message: (m) => msgs.push(m) });
    for (let i = 1; i <= 20; i++) {
      assert.equal((await sendDirect(gw, clientId, `d${i}`)).status, 200);
      assert.equal((await publish(gw, "chat:fb-sse", `p${i}`)).status, 200);
    }
    await waitFor(() => got.length === 20 && msgs.length === 20, 10_000, "20 directs and 20 channel messages");
    assert.deepEqual(got.map((m) => [m.seq, m.data]), range(20, (i) => [i, `d${i}`]));
    assert.deepEqual(msgs.map((m) => m.data), range(20, (i) => `p${i}`));
    assert.equal(sub.position.offset, msgs.at(-1).offset);
    // Acknowledged over POST: the gateway keeps none of them.
    await waitFor(async () => (await info(clientId)).outbox_messages === 0, 5000, "acknowledged");
  } finally {
    await client.close();
    await proxy.close();
  }
  // close() sent DELETE ?session=: the session is over, not suspended.
  const gone = await api(gw, "GET", `/v1/connections/${encodeURIComponent(client.clientId)}`);
  assert.equal(gone.status, 404);
});

for (const transport of ["sse", "long-poll"]) {
  test(`${transport}: cut mid-stream again and again, every direct exactly once and in order, channel messages recovered, same client id`, async () => {
    const proxy = await startProxy(gw.port);
    const { client, events } = newClient(proxy.url, { transports: [transport] });
    const got = [];
    const msgs = [];
    const gaps = [];
    client.on("direct", (m) => got.push(m));
    try {
      const { clientId } = await client.connect();
      assert.equal(client.transport, transport);
      assert.equal((await info(clientId)).transport, transport);
      await client.subscribe(`chat:cut-${transport}`, { message: (m) => msgs.push(m), gap: (g) => gaps.push(g) });
      let n = 0;
      let p = 0;
      for (let round = 0; round < 5; round++) {
        for (let i = 0; i < 20; i++) {
          n += 1;
          assert.equal((await sendDirect(gw, clientId, `m${n}`)).status, 200);
          if (i === 7) proxy.cut(); // mid-stream, with messages in flight
          if (i % 5 === 0) {
            p += 1;
            assert.equal((await publish(gw, `chat:cut-${transport}`, `p${p}`)).status, 200);
          }
        }
        await connected(client);
      }
      await waitFor(() => got.length >= n && msgs.length >= p, 30_000, `${n} directs and ${p} channel messages`);
      await client.ping();
      await sleep(300); // nothing more (no duplicate) may come
      assert.deepEqual(got.map((m) => m.seq), range(n, (i) => i));
      assert.deepEqual(got.map((m) => m.data), range(n, (i) => `m${i}`));
      assert.deepEqual(msgs.map((m) => m.data), range(p, (i) => `p${i}`));
      assert.deepEqual(gaps, []);
      assert.equal(client.clientId, clientId);
      assert.equal(events.filter((e) => e.name === "restarted").length, 0);
      if (transport === "sse") {
        // Each cut ended the stream: each was a resume.
        assert.equal(events.filter((e) => e.name === "resumed").length, 5);
        assert.ok(events.filter((e) => e.name === "disconnected").every((e) => e.reason.kind === "network"));
      }
      assert.ok(events.every((e) => e.name !== "transport" || e.transport === transport));
    } finally {
      await client.close();
      await proxy.close();
    }
  });
}

test("SSE buffered by a proxy: no `connected` push within fallbackTimeoutMs, the client goes on to long-polling", async () => {
  const proxy = await startProxy(gw.port, { refuseUpgrade: true, bufferEventStreams: true });
  const { client, events } = newClient(proxy.url, { fallbackTimeoutMs: 1500 });
  const got = [];
  client.on("direct", (m) => got.push(m));
  try {
    const t0 = Date.now();
    const { clientId } = await client.connect();
    assert.ok(Date.now() - t0 >= 1400, "waited for the SSE attempt's timeout");
    assert.equal(client.transport, "long-poll");
    const fb = events.filter((e) => e.name === "fallback");
    assert.deepEqual(fb.map((e) => [e.from, e.to, e.error.code]), [
      ["websocket", "sse", "refused"], // the proxy's 400: a refusal, but not the gateway's, so not terminal
      ["sse", "long-poll", "timeout"],
    ]);
    assert.equal((await info(clientId)).transport, "long-poll");
    for (let i = 1; i <= 10; i++) await sendDirect(gw, clientId, `x${i}`);
    await waitFor(() => got.length === 10, 10_000, "10 directs");
    assert.deepEqual(got.map((m) => m.data), range(10, (i) => `x${i}`));
    // The buffered SSE attempt got a session of its own, given up: the client's is the long-poll one.
    assert.equal(client.clientId, clientId);
  } finally {
    await client.close();
    await proxy.close();
  }
});

test("a session moves between transports: WebSocket, then SSE when upgrades are refused (resumed), then WebSocket again after fallbackRetryMs", async () => {
  const proxy = await startProxy(gw.port);
  const retryMs = 5000;
  const { client, events } = newClient(proxy.url, { fallbackRetryMs: retryMs });
  const got = [];
  client.on("direct", (m) => got.push(m));
  let n = 0;
  const send = async (k) => {
    for (let i = 0; i < k; i++) {
      n += 1;
      assert.equal((await sendDirect(gw, client.clientId, `m${n}`)).status, 200);
    }
  };
  try {
    const { clientId } = await client.connect();
    assert.equal(client.transport, "websocket");
    await send(5);
    await waitEvents(events, () => got.length === 5, 5000, "5 directs");

    // Upgrades refused from now on; the link drops with messages waiting.
    proxy.options.refuseUpgrade = true;
    proxy.hold();
    await send(5);
    proxy.release();
    const moved = await waitEvents(events, () => events.find((e) => e.name === "transport" && e.transport === "sse"), 20_000, "moved to SSE");
    const movedAt = Date.now();
    assert.equal(moved.previous, "websocket");
    await waitEvents(events, () => events.some((e) => e.name === "resumed"), 20_000, "resumed");
    assert.ok(events.indexOf(moved) < events.findIndex((e) => e.name === "resumed"));
    assert.equal(client.clientId, clientId);
    await send(5);
    await waitEvents(events, () => got.length === 15, 5000, "15 directs");

    // A reconnect before fallbackRetryMs goes straight back to SSE: no new WebSocket attempt.
    assert.ok(Date.now() - movedAt < retryMs / 2, "this machine is too slow for this test's timing");
    const refused = proxy.refusedUpgrades;
    proxy.cut();
    await waitEvents(events, () => events.filter((e) => e.name === "resumed").length === 2, 20_000, "second resume");
    assert.equal(proxy.refusedUpgrades, refused);
    assert.equal(client.transport, "sse");

    // Upgrades allowed again; after fallbackRetryMs the next reconnect tries WebSocket first.
    proxy.options.refuseUpgrade = false;
    await sleep(movedAt + retryMs + 100 - Date.now());
    proxy.cut();
    const back = await waitEvents(events, () => events.filter((e) => e.name === "transport" && e.transport === "websocket")[1], 20_000, "back to WebSocket");
    assert.equal(back.previous, "sse");
    await waitEvents(events, () => events.filter((e) => e.name === "resumed").length === 3, 20_000, "third resume");
    assert.equal(client.transport, "websocket");
    assert.equal((await info(clientId)).transport, "websocket");
    await send(5);
    await waitEvents(events, () => got.length === 20, 5000, "20 directs");
    await sleep(200);
    assert.deepEqual(got.map((m) => [m.seq, m.data]), range(20, (i) => [i, `m${i}`]));
    assert.equal(events.filter((e) => e.name === "restarted").length, 0);
  } finally {
    await client.close();
    await proxy.close();
  }
});

for (const transport of ["websocket", "sse", "long-poll"]) {
  test(`${transport}: subscribe, publish, presence, history, unsubscribe (own and server-side), send, ping and refused commands`, async () => {
    const { client: a, events } = newClient(gw.url, { transports: [transport] });
    const { client: b } = newClient(gw.url);
    const channel = `chat:cmds-${transport}`;
    try {
      const [ca, cb] = await Promise.all([a.connect(), b.connect()]);
      assert.equal(a.transport, transport);
      assert.equal((await info(ca.clientId)).transport, transport);
      const got = [];
      const joins = [];
      const subscribed = [];
      const sub = await a.subscribe(channel, { message: (m) => got.push(m), join: (m) => joins.push(m), subscribed: (e) => subscribed.push(e) });
      const start = subscribed[0].offset;
      await b.subscribe(channel);
      await waitFor(() => joins.length === 1, 5000, "join");
      assert.equal(joins[0].client, cb.clientId);

      const r1 = await a.publish(channel, "text");
      const r2 = await a.publish(channel, new Uint8Array([0, 1, 2, 255]));
      const r3 = await b.publish(channel, "from b");
      assert.deepEqual([r1.offset, r2.offset, r3.offset], [start + 1, start + 2, start + 3]);
      await waitFor(() => got.length === 3, 5000, "3 messages");
      assert.equal(got[0].data, "text");
      assert.deepEqual([...got[1].data], [0, 1, 2, 255]);
      assert.equal(got[2].data, "from b");

      const presence = await a.presence(channel);
      assert.equal(presence.clients, 2);
      assert.deepEqual(presence.members.map((m) => m.client).sort(), [ca.clientId, cb.clientId].sort());
      const h = await a.history(channel, { limit: 10 });
      assert.deepEqual(h.publications.map((x) => x.offset), [r1.offset, r2.offset, r3.offset]);
      const since = await a.history(channel, { since: { offset: r2.offset, epoch: r2.epoch } });
      assert.equal(since.recovered, true);
      assert.deepEqual(since.publications.map((x) => x.data), ["from b"]);

      // Many commands at once: each answered, in order.
      const many = await Promise.all(range(30, (i) => a.publish(channel, `burst ${i}`)));
      assert.deepEqual(many.map((r) => r.offset), range(30, (i) => r3.offset + i));
      await waitFor(() => got.length === 33, 5000, "the burst");
      assert.deepEqual(got.slice(3).map((m) => m.data), range(30, (i) => `burst ${i}`));

      await sub.unsubscribe();
      assert.deepEqual((await info(ca.clientId)).channels ?? [], []);
      await b.publish(channel, "after");
      await a.send("for the origin");
      assert.ok((await a.ping()) >= 0);
      assert.equal(got.length, 33);

      // A server-side subscription, left with client.unsubscribe.
      const server = [];
      a.on("message", (m) => server.push(m));
      await api(gw, "PUT", `/v1/connections/${encodeURIComponent(ca.clientId)}/channels/${channel}-srv`);
      await waitFor(() => events.some((e) => e.name === "serverSubscribed"), 5000, "serverSubscribed");
      await publish(gw, `${channel}-srv`, "s1");
      await waitFor(() => server.length === 1, 5000, "s1");
      await a.unsubscribe(`${channel}-srv`);
      assert.deepEqual((await info(ca.clientId)).channels ?? [], []);
      await publish(gw, `${channel}-srv`, "s2");
      await a.ping();
      await sleep(100);
      assert.deepEqual(server.map((m) => m.data), ["s1"]);

      await assert.rejects(a.subscribe("no spaces allowed"), (e) => e instanceof SwitchboardError && e.code === "bad_channel");
      await assert.rejects(a.history("nope:x"), (e) => e.code === "unknown_namespace");
      await a.publish(channel, "still fine");
    } finally {
      await Promise.all([a.close(), b.close()]);
    }
  });
}

for (const transport of ["sse", "long-poll"]) {
  test(`${transport}: the gateway's close reports its code and the reconnect starts a new session; a silent link is resumed`, async () => {
    const proxy = await startProxy(gw.port);
    const { client, events } = newClient(proxy.url, { transports: [transport] });
    const got = [];
    client.on("direct", (m) => got.push(m));
    try {
      const { clientId } = await client.connect();
      const del = await api(gw, "DELETE", `/v1/connections/${encodeURIComponent(clientId)}?code=4321`);
      assert.equal(del.status, 202);
      const lost = await waitFor(() => events.find((e) => e.name === "disconnected"), 5000, "disconnected");
      assert.deepEqual([lost.reason.kind, lost.reason.code], ["closed", 4321]);
      const restarted = await waitFor(() => events.find((e) => e.name === "restarted"), 10_000, "restarted");
      assert.equal(restarted.error?.code, "session_closed");
      assert.notEqual(restarted.clientId, clientId);
      await connected(client);

      // A link that goes silent: given up after 2 × ping interval + 5 s, then resumed.
      proxy.freeze();
      const frozenAt = Date.now();
      await sendDirect(gw, restarted.clientId, "while frozen");
      const silent = await waitFor(() => events.find((e) => e.name === "disconnected" && e.reason.kind === "heartbeat_timeout"), 15_000, "heartbeat timeout");
      assert.ok(Date.now() - frozenAt >= 6500);
      assert.equal(silent.reason.afterMs, 7000);
      await waitFor(() => events.some((e) => e.name === "resumed"), 15_000, "resumed");
      await waitFor(() => got.length === 1, 5000, "the direct sent while frozen");
      assert.deepEqual(got.map((m) => [m.seq, m.data]), [[1, "while frozen"]]);
      assert.equal(client.clientId, restarted.clientId);
    } finally {
      await client.close();
      await proxy.close();
    }
  });
}

test("tokens over the fallbacks: always in the query (also with tokenIn: \"frame\"), refreshed over POST; a refused token is terminal (401)", async () => {
  const secret = "another-test-secret-of-at-least-32-bytes";
  const jwt = (claims) => {
    const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
    const body = `${b64({ alg: "HS256", typ: "JWT" })}.${b64(claims)}`;
    return `${body}.${createHmac("sha256", secret).update(body).digest("base64url")}`;
  };
  const gw2 = await startGateway(["--jwt-secret", secret, "--token-refresh-notice", "50s"]);
  const proxy = await startProxy(gw2.port, { refuseUpgrade: true });
  const issued = [];
  const getToken = () => {
    // The first token expires soon (refresh push at once), the later ones late.
    const t = jwt({ sub: "carol", exp: Math.floor(Date.now() / 1000) + (issued.length === 0 ? 40 : 600) });
    issued.push(t);
    return t;
  };
  const { client } = newClient(proxy.url, { getToken, tokenIn: "frame" });
  const expiring = [];
  client.on("tokenExpiring", (e) => expiring.push(e));
  try {
    const { clientId } = await client.connect();
    assert.equal(client.transport, "sse");
    const sseHead = proxy.heads.find((h) => h.startsWith("GET") && h.includes(`token=${issued[0]}`));
    assert.ok(sseHead, `the SSE request carries the token: ${proxy.heads.join(" | ")}`);
    const who = (await api(gw2, "GET", `/v1/connections/${encodeURIComponent(clientId)}`)).body;
    assert.equal(who.user_id, "carol");
    assert.equal(who.transport, "sse");
    // The refresh push came over the stream; the refresh command went as a POST, its reply on the stream.
    await waitFor(() => expiring.length === 1 && issued.length === 2, 5000, "refresh");
    await client.ping();

    const bad = newClient(`ws://127.0.0.1:${gw2.port}/ws`, { token: "not-a-jwt", transports: ["sse"] }).client;
    await assert.rejects(bad.connect(), (e) => e.code === "refused" && e.status === 401 && /token_malformed/.test(e.message));
    assert.equal(bad.state, "closed");
  } finally {
    await client.close();
    await proxy.close();
    await gw2.stop();
  }
});
