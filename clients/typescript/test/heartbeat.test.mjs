// A link that goes silent (no frame, no ping) is dropped after
// 2 × ping_interval_ms + 5 s, without a close frame, and the session resumes.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { startGateway, startProxy, newClient, waitFor, sendDirect, sleep, api, BrowserLikeWebSocket } from "../testlib/helpers.mjs";

let gw;
before(async () => {
  gw = await startGateway();
});
after(async () => {
  await gw?.stop();
});

test("a silent link is dropped after the heartbeat deadline and the session resumes", async () => {
  const proxy = await startProxy(gw.port);
  const { client, events } = newClient(proxy.url);
  const got = [];
  client.on("direct", (m) => got.push(m));
  try {
    const { clientId } = await client.connect();
    await sendDirect(gw, clientId, "one");
    await waitFor(() => got.length === 1, 5000, "first direct");
    proxy.freeze();
    const frozenAt = Date.now();
    const r = await sendDirect(gw, clientId, "two"); // written into the frozen link
    assert.equal(r.status, 200);
    const lost = await waitFor(() => events.find((e) => e.name === "disconnected"), 12_000, "disconnected");
    const after = Date.now() - frozenAt;
    assert.equal(lost.reason.kind, "heartbeat_timeout");
    assert.equal(lost.reason.afterMs, 2 * 1000 + 5000);
    assert.ok(after >= 6500, `dropped after ${after} ms`);
    const resumed = await waitFor(() => events.find((e) => e.name === "resumed"), 10_000, "resumed");
    assert.equal(resumed.clientId, clientId);
    await waitFor(() => got.length === 2, 5000, "second direct");
    assert.deepEqual(got.map((m) => [m.seq, m.data]), [[1, "one"], [2, "two"]]);
    assert.equal(events.filter((e) => e.name === "restarted").length, 0);
  } finally {
    await client.close();
    await proxy.close();
  }
});

test("browser-like socket (no terminate, pings unseen): a quiet link stays up; a silent one is given up without a close frame and resumed", async () => {
  const proxy = await startProxy(gw.port);
  const { client, events } = newClient(proxy.url, { WebSocket: BrowserLikeWebSocket });
  const got = [];
  client.on("direct", (m) => got.push(m));
  try {
    const { clientId } = await client.connect();
    // Nothing but gateway pings for longer than the deadline: the SDK's `ping` commands keep it up.
    await sleep(8000);
    assert.equal(client.state, "connected");
    assert.equal(events.filter((e) => e.name === "disconnected").length, 0);
    proxy.freeze();
    await sendDirect(gw, clientId, "during");
    const lost = await waitFor(() => events.find((e) => e.name === "disconnected"), 12_000, "disconnected");
    assert.equal(lost.reason.kind, "heartbeat_timeout");
    // The old socket was left open (no close frame, which would end the session): the resume takes it over.
    const resumed = await waitFor(() => events.find((e) => e.name === "resumed"), 10_000, "resumed");
    assert.equal(resumed.clientId, clientId);
    await waitFor(() => got.length === 1, 5000, "the direct sent while frozen");
    assert.deepEqual(got.map((m) => [m.seq, m.data]), [[1, "during"]]);
    const info = await api(gw, "GET", `/v1/connections/${clientId}`);
    assert.equal(info.body.suspended, false);
    // The given-up socket was left open (its close frame would have ended the session)…
    const [old, current] = BrowserLikeWebSocket.instances;
    assert.equal(BrowserLikeWebSocket.instances.length, 2);
    assert.equal(old.readyState, 1);
    // …until the client is closed.
    await client.close();
    assert.ok(old.readyState >= 2, `old socket state ${old.readyState}`);
    assert.equal(current.readyState, 3);
  } finally {
    await client.close();
    await proxy.close();
  }
});
