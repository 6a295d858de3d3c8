// Sessions against the real gateway, through a TCP proxy that cuts the
// connection without a close frame: direct messages exactly once and in
// order across resumes, channel recovery, a refused resume, acknowledgements.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { startGateway, startProxy, newClient, waitFor, sleep, api, sendDirect, publish } from "../testlib/helpers.mjs";

let gw;
before(async () => {
  gw = await startGateway();
});
after(async () => {
  await gw?.stop();
});

const connected = (client) => waitFor(() => client.state === "connected", 10_000, "connected");

test("200 direct messages across 5 cuts: each exactly once, in order, same client id", async () => {
  const proxy = await startProxy(gw.port);
  const { client, events } = newClient(proxy.url);
  const got = [];
  client.on("direct", (m) => got.push(m));
  try {
    const { clientId } = await client.connect();
    const cuts = new Set([20, 60, 100, 140, 180]);
    for (let i = 1; i <= 200; i++) {
      if (cuts.has(i)) {
        await connected(client);
        await sleep(30);
        proxy.cut();
      }
      const r = await sendDirect(gw, clientId, `m${i}`);
      assert.equal(r.status, 200, JSON.stringify(r.body));
    }
    await waitFor(() => got.length >= 200, 20_000, "200 direct messages");
    await sleep(300); // nothing more (no duplicate) may come
    assert.equal(got.length, 200);
    assert.deepEqual(got.map((m) => m.seq), Array.from({ length: 200 }, (_, i) => i + 1));
    assert.deepEqual(got.map((m) => m.data), Array.from({ length: 200 }, (_, i) => `m${i + 1}`));
    assert.equal(client.clientId, clientId);
    assert.equal(events.filter((e) => e.name === "resumed").length, 5);
    assert.ok(events.filter((e) => e.name === "resumed").every((e) => e.clientId === clientId));
    assert.equal(events.filter((e) => e.name === "restarted").length, 0);
    assert.equal(events.filter((e) => e.name === "disconnected").length, 5);
    assert.ok(proxy.accepted >= 6);
  } finally {
    await client.close();
    await proxy.close();
  }
});

test("channel messages published while cut are recovered after the resume, in order, once", async () => {
  const proxy = await startProxy(gw.port);
  const { client, events } = newClient(proxy.url);
  const got = [];
  const subscribed = [];
  const gaps = [];
  try {
    await client.connect();
    const sub = await client.subscribe("chat:recover", {
      message: (m) => got.push(m),
      subscribed: (e) => subscribed.push(e),
      gap: (g) => gaps.push(g),
    });
    const start = subscribed[0].offset;
    let n = 0;
    const pub = async (k) => {
      for (let i = 0; i < k; i++) {
        n += 1;
        const r = await publish(gw, "chat:recover", `p${n}`);
        assert.equal(r.status, 200, JSON.stringify(r.body));
      }
    };
    await pub(10);
    await waitFor(() => got.length === 10, 5000, "the first 10");
    for (let round = 0; round < 3; round++) {
      proxy.hold(); // cut, and no new connection until released
      await pub(15); // published while the client is away
      proxy.release();
      await waitFor(() => events.filter((e) => e.name === "resumed").length === round + 1, 10_000, "resumed");
      // Resubscribed (the replay is in): what follows is live.
      await waitFor(() => subscribed.length === round + 2, 10_000, "resubscribed");
      await pub(5); // and live again
      await waitFor(() => got.length === n, 10_000, `${n} messages`);
    }
    await waitFor(() => got.length === n, 10_000, `all ${n} messages`);
    await sleep(300);
    assert.equal(got.length, n);
    assert.deepEqual(got.map((m) => m.offset), Array.from({ length: n }, (_, i) => start + i + 1));
    assert.deepEqual(got.map((m) => m.data), Array.from({ length: n }, (_, i) => `p${i + 1}`));
    assert.deepEqual(gaps, []);
    // First subscribe, then one recovered resubscribe per resume.
    assert.equal(subscribed.length, 4);
    assert.ok(subscribed.slice(1).every((s) => s.recovered === true));
    assert.deepEqual(subscribed.slice(1).map((s) => s.missed), [15, 15, 15]);
    assert.equal(sub.position.offset, start + n);
  } finally {
    await client.close();
    await proxy.close();
  }
});

test("a refused resume yields `restarted` with session_closed and a new id; the subscription carries on", async () => {
  const proxy = await startProxy(gw.port);
  const { client, events } = newClient(proxy.url);
  const got = [];
  const subscribed = [];
  try {
    const { clientId } = await client.connect();
    await client.subscribe("chat:restart", { message: (m) => got.push(m), subscribed: (e) => subscribed.push(e) });
    const start = subscribed[0].offset;
    await publish(gw, "chat:restart", "before");
    await waitFor(() => got.length === 1, 5000, "first message");

    proxy.hold();
    await waitFor(async () => (await api(gw, "GET", `/v1/connections/${clientId}`)).body?.suspended === true, 5000, "suspended");
    const del = await api(gw, "DELETE", `/v1/connections/${clientId}`);
    assert.equal(del.status, 202);
    await publish(gw, "chat:restart", "while away");
    proxy.release();

    const restarted = await waitFor(() => events.find((e) => e.name === "restarted"), 10_000, "restarted");
    assert.equal(restarted.error?.code, "session_closed");
    assert.notEqual(restarted.clientId, clientId);
    assert.equal(client.clientId, restarted.clientId);
    assert.equal(events.filter((e) => e.name === "resumed").length, 0);

    // The subscription was made again from its own position: the message published while away is recovered.
    await waitFor(() => got.length === 2, 5000, "recovered message");
    assert.equal(subscribed.at(-1).recovered, true);
    await publish(gw, "chat:restart", "after");
    await waitFor(() => got.length === 3, 5000, "live message");
    assert.deepEqual(got.map((m) => m.data), ["before", "while away", "after"]);
    assert.deepEqual(got.map((m) => m.offset), [start + 1, start + 2, start + 3]);
    const info = await api(gw, "GET", `/v1/connections/${restarted.clientId}`);
    assert.deepEqual(info.body.channels, ["chat:restart"]);
  } finally {
    await client.close();
    await proxy.close();
  }
});

test("direct messages are acknowledged in batches: the gateway keeps none of them", async () => {
  const { client } = newClient(gw.url);
  const got = [];
  client.on("direct", (m) => got.push(m));
  try {
    const { clientId } = await client.connect();
    // Fewer than a batch: acknowledged by the 500 ms timer.
    const t0 = Date.now();
    for (let i = 1; i <= 5; i++) await sendDirect(gw, clientId, `a${i}`);
    await waitFor(() => got.length === 5, 5000, "5 directs");
    const kept = (await api(gw, "GET", `/v1/connections/${clientId}`)).body.outbox_messages;
    // Unless this machine was too slow to look before the 500 ms timer, the gateway still keeps them.
    if (Date.now() - t0 < 400) assert.ok(kept > 0, `expected unacknowledged messages right after receipt, got ${kept}`);
    await sleep(700);
    assert.equal((await api(gw, "GET", `/v1/connections/${clientId}`)).body.outbox_messages, 0);
    // More than a batch.
    for (let i = 1; i <= 70; i++) await sendDirect(gw, clientId, `b${i}`);
    await waitFor(() => got.length === 75, 5000, "75 directs");
    await sleep(700);
    const info = await api(gw, "GET", `/v1/connections/${clientId}`);
    assert.equal(info.body.outbox_messages, 0);
    assert.equal(info.body.suspended, false);
  } finally {
    await client.close();
  }
});

test("server-side subscriptions: client events, recovered across a resume, removal while away reported", async () => {
  const proxy = await startProxy(gw.port);
  const { client, events } = newClient(proxy.url);
  const got = [];
  client.on("message", (m) => got.push(m));
  try {
    const { clientId } = await client.connect();
    const put = await api(gw, "PUT", `/v1/connections/${clientId}/channels/chat:srv`);
    assert.ok(put.status < 300, JSON.stringify(put));
    const subscribed = await waitFor(() => events.find((e) => e.name === "serverSubscribed"), 5000, "serverSubscribed");
    assert.equal(subscribed.channel, "chat:srv");
    await publish(gw, "chat:srv", "s1");
    await waitFor(() => got.length === 1, 5000, "s1");

    // Published while away: recovered from the SDK's own position after the resume.
    proxy.hold();
    await publish(gw, "chat:srv", "s2");
    await publish(gw, "chat:srv", "s3");
    // Subscribed by the server while away: reported after `resumed`.
    await api(gw, "PUT", `/v1/connections/${clientId}/channels/chat:srv2`);
    proxy.release();
    await waitFor(() => events.some((e) => e.name === "resumed"), 10_000, "resumed");
    await waitFor(() => got.length === 3, 5000, "s2, s3");
    const later = await waitFor(() => events.find((e) => e.name === "serverSubscribed" && e.channel === "chat:srv2"), 5000, "chat:srv2");
    assert.ok(events.indexOf(later) > events.findIndex((e) => e.name === "resumed"));
    await publish(gw, "chat:srv2", "t1");
    await waitFor(() => got.length === 4, 5000, "t1");
    assert.deepEqual(got.map((m) => `${m.channel} ${m.data}`), ["chat:srv s1", "chat:srv s2", "chat:srv s3", "chat:srv2 t1"]);

    // Unsubscribed by the server while away: reported after the next resume.
    proxy.hold();
    await api(gw, "DELETE", `/v1/connections/${clientId}/channels/chat:srv`);
    proxy.release();
    await waitFor(() => events.filter((e) => e.name === "resumed").length === 2, 10_000, "second resume");
    const gone = await waitFor(() => events.find((e) => e.name === "serverUnsubscribed"), 5000, "serverUnsubscribed");
    assert.equal(gone.channel, "chat:srv");
  } finally {
    await client.close();
    await proxy.close();
  }
});

test("a close frame from the gateway ends the session: `disconnected` with its code, then `restarted`", async () => {
  const { client, events } = newClient(gw.url);
  try {
    const { clientId } = await client.connect();
    const del = await api(gw, "DELETE", `/v1/connections/${clientId}?code=4321`);
    assert.equal(del.status, 202);
    const lost = await waitFor(() => events.find((e) => e.name === "disconnected"), 5000, "disconnected");
    assert.deepEqual([lost.reason.kind, lost.reason.code], ["closed", 4321]);
    const restarted = await waitFor(() => events.find((e) => e.name === "restarted"), 5000, "restarted");
    assert.equal(restarted.error?.code, "session_closed");
    assert.notEqual(restarted.clientId, clientId);
    assert.equal(client.state, "connected");
    await client.ping();
  } finally {
    await client.close();
  }
});

test("client.unsubscribe leaves server-side subscriptions: at once when connected, on the resume when away", async () => {
  const proxy = await startProxy(gw.port);
  const { client, events } = newClient(proxy.url);
  const got = [];
  client.on("message", (m) => got.push(m));
  const channels = async (id) => (await api(gw, "GET", `/v1/connections/${id}`)).body.channels ?? [];
  try {
    const { clientId } = await client.connect();
    for (const ch of ["chat:o1", "chat:o2"]) await api(gw, "PUT", `/v1/connections/${clientId}/channels/${ch}`);
    await waitFor(() => events.filter((e) => e.name === "serverSubscribed").length === 2, 5000, "serverSubscribed");
    await publish(gw, "chat:o1", "a");
    await waitFor(() => got.length === 1, 5000, "a");

    await client.unsubscribe("chat:o1");
    assert.deepEqual(await channels(clientId), ["chat:o2"]);
    await publish(gw, "chat:o1", "b"); // not ours any more
    await publish(gw, "chat:o2", "c");
    await waitFor(() => got.length === 2, 5000, "c");

    // Away: resolves at once; the resumed session leaves it.
    proxy.hold();
    await client.unsubscribe("chat:o2");
    await publish(gw, "chat:o2", "d");
    proxy.release();
    await waitFor(() => events.some((e) => e.name === "resumed"), 10_000, "resumed");
    await waitFor(async () => (await channels(clientId)).length === 0, 5000, "left on resume");
    await publish(gw, "chat:o2", "e");
    await client.ping();
    await sleep(200);
    assert.deepEqual(got.map((m) => `${m.channel} ${m.data}`), ["chat:o1 a", "chat:o2 c"]);
    assert.ok(!events.some((e) => e.name === "serverUnsubscribed"), "the client's own unsubscribe is not a server event");
  } finally {
    await client.close();
    await proxy.close();
  }
});
