// Subscribe, publish, presence and history against the real gateway, and
// the typed errors of refused commands.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { SwitchboardError } from "../dist/index.js";
import { startGateway, newClient, waitFor, api } from "../testlib/helpers.mjs";

let gw;
before(async () => {
  gw = await startGateway();
});
after(async () => {
  await gw?.stop();
});

test("subscribe, publish, presence and history round trip", async () => {
  const { client: a, events } = newClient(gw.url);
  const { client: b } = newClient(gw.url);
  const states = [];
  a.on("state", (s) => states.push(s));
  try {
    const [ca, cb] = await Promise.all([a.connect(), b.connect()]);
    assert.equal(a.state, "connected");
    assert.equal(a.clientId, ca.clientId);
    assert.deepEqual(states, ["connecting", "connected"]);
    assert.deepEqual(events.map((e) => e.name), ["transport", "connected"]);
    assert.deepEqual([events[0].transport, events[0].previous], ["websocket", undefined]);
    assert.equal(a.transport, "websocket");

    const got = [];
    const subscribed = [];
    const joins = [];
    const sub = await a.subscribe("chat:room", {
      message: (m) => got.push(m),
      subscribed: (e) => subscribed.push(e),
      join: (m) => joins.push(m),
    });
    assert.equal(sub.channel, "chat:room");
    assert.equal(subscribed.length, 1);
    assert.equal(subscribed[0].recovered, undefined);
    const start = subscribed[0].offset;

    const seen = [];
    await b.subscribe("chat:room", { message: (m) => seen.push(m) });
    await waitFor(() => joins.length === 1, 5000, "join");
    assert.equal(joins[0].client, cb.clientId);

    const r1 = await b.publish("chat:room", "hello");
    const r2 = await a.publish("chat:room", new Uint8Array([0, 1, 2, 255]));
    assert.equal(r1.offset, start + 1);
    assert.equal(r2.offset, start + 2);
    await waitFor(() => got.length === 2 && seen.length === 2, 5000, "messages");
    assert.equal(got[0].data, "hello");
    assert.deepEqual([...got[1].data], [0, 1, 2, 255]);
    assert.deepEqual(got.map((m) => m.offset), [start + 1, start + 2]);
    assert.deepEqual(sub.position, { offset: r2.offset, epoch: r2.epoch });

    const p = await a.presence("chat:room");
    assert.equal(p.clients, 2);
    assert.deepEqual(p.members.map((m) => m.client).sort(), [ca.clientId, cb.clientId].sort());

    const h = await a.history("chat:room", { limit: 10 });
    assert.equal(h.offset, r2.offset);
    assert.deepEqual(h.publications.map((x) => x.offset), [r1.offset, r2.offset]);
    assert.equal(h.publications[0].data, "hello");
    const since = await a.history("chat:room", { since: { offset: r1.offset, epoch: r1.epoch } });
    assert.equal(since.recovered, true);
    assert.deepEqual(since.publications.map((x) => x.offset), [r2.offset]);

    // Unsubscribed: nothing more arrives, the other client sees the leave.
    await sub.unsubscribe();
    assert.equal(sub.active, false);
    await b.publish("chat:room", "after");
    await waitFor(() => seen.length === 3, 5000, "b's own message");
    assert.equal(got.length, 2);
    const info = await api(gw, "GET", `/v1/connections/${ca.clientId}`);
    assert.deepEqual(info.body.channels ?? [], []);

    await a.send("for the origin");
    assert.ok((await a.ping()) >= 0);
  } finally {
    await Promise.all([a.close(), b.close()]);
  }
  assert.equal(a.state, "closed");
  assert.equal(events.at(-1).name, "closed");
});

test("refused commands reject with a SwitchboardError carrying the protocol's code", async () => {
  const { client } = newClient(gw.url);
  try {
    await client.connect();
    await assert.rejects(client.subscribe("no spaces allowed"), (e) => e instanceof SwitchboardError && e.code === "bad_channel" && e.command === "subscribe");
    await assert.rejects(client.subscribe("admin:x"), (e) => e instanceof SwitchboardError && e.code === "unknown_namespace");
    await assert.rejects(client.publish("bad channel", "x"), (e) => e instanceof SwitchboardError && e.code === "bad_channel" && e.command === "publish");
    await assert.rejects(client.history("nope:x"), (e) => e.code === "unknown_namespace");
    await client.subscribe("chat:dup");
    await assert.rejects(client.subscribe("chat:dup"), (e) => e.code === "already_subscribed");
    // The connection carries on after errors.
    await client.publish("chat:dup", "fine");
  } finally {
    await client.close();
  }
  await assert.rejects(client.publish("chat:dup", "x"), (e) => e instanceof SwitchboardError && e.code === "closed");
});

test("commands wait for a connection and time out with a typed error", async () => {
  // Nothing listens on this port: every attempt fails, commands wait, then time out.
  const { client, events } = newClient("ws://127.0.0.1:1/ws", { commandTimeoutMs: 400 });
  client.connect();
  const t0 = Date.now();
  await assert.rejects(client.presence("chat:x"), (e) => e instanceof SwitchboardError && e.code === "timeout" && e.command === "presence");
  assert.ok(Date.now() - t0 >= 350);
  assert.ok(events.some((e) => e.name === "connectFailed"));
  // The queue of commands waiting for a connection is bounded.
  const small = newClient("ws://127.0.0.1:1/ws", { commandTimeoutMs: 300, maxQueuedCommands: 2 }).client;
  small.connect();
  const waiting = [small.ping(), small.ping()];
  await assert.rejects(small.ping(), (e) => e instanceof SwitchboardError && e.code === "queue_full");
  for (const w of waiting) await assert.rejects(w, (e) => e.code === "timeout");
  await small.close();
  assert.notEqual(client.state, "connected");
  await client.close();
  assert.equal(client.state, "closed");
});
