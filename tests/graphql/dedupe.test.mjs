// One execution per digest and trigger on a node: 50 graphql-ws clients
// subscribed over 5 distinct inputs cost the origin 5 executions per trigger
// publication, and every subscriber gets the result. Also: a burst of
// changes ends with the newest state. Contract: docs/graphql.md
// ("Subscriptions: triggers and digest", "Publishing triggers").
//
// Needs: target/release/switchboard (cargo build --release -p switchboard).
// Run: npm test (npm ci in examples/graphql-origin, then node --test).

import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { createClient } from "graphql-ws";
import WebSocket from "ws";
import { Feed, digestOf, metric, sleep, startStack, until } from "./helpers.mjs";

const SUBSCRIBERS = 50;
const ROOMS = ["dd-r1", "dd-r2", "dd-r3", "dd-r4", "dd-r5"];
const QUERY = "subscription Room($room: String!) { messages(room: $room) { id text } }";

let stack;

describe("dedupe on one node", { timeout: 90_000 }, () => {
  const clients = [];
  const subscribers = []; // {room, feed}

  before(async () => {
    stack = await startStack();
    for (let i = 0; i < SUBSCRIBERS; i++) {
      const room = ROOMS[i % ROOMS.length];
      const c = createClient({ url: stack.wsUrl, webSocketImpl: WebSocket, retryAttempts: 0 });
      clients.push(c);
      const feed = new Feed(`subscriber ${i} of ${room}`);
      c.subscribe({ query: QUERY, variables: { room }, operationName: "Room" }, feed.observer);
      subscribers.push({ room, feed });
    }
    for (const { feed } of subscribers) assert.deepEqual(await feed.next(15_000), { data: { messages: [] } });
  });
  after(async () => {
    for (const c of clients) {
      c.terminate();
      await c.dispose();
    }
    await stack?.stop();
  });

  test("50 subscribers over 5 inputs: one trigger publication, 5 executions, 50 deliveries", { timeout: 30_000 }, async () => {
    const metricsBefore = await stack.api.metrics();
    assert.equal(metric(metricsBefore, "switchboard_graphql_digests"), ROOMS.length, "distinct subscription inputs on the node");
    await stack.origin.reset();
    const answer = await stack.api.trigger(...ROOMS.map((r) => `room:${r}`));
    assert.equal(answer.nodes, 1);
    assert.deepEqual(answer.failed_nodes, []);

    for (const { feed } of subscribers) assert.deepEqual(await feed.next(10_000), { data: { messages: [] } });
    await sleep(500); // nothing more comes
    for (const { feed } of subscribers) assert.equal(feed.items.length, 2, `${feed.what}: ${JSON.stringify(feed.items)}`);

    const stats = await stack.origin.stats();
    assert.equal(stats.total, ROOMS.length, `executions at the origin: ${JSON.stringify(stats)}`);
    for (const room of ROOMS) {
      const digest = digestOf({ query: QUERY, variables: { room }, operationName: "Room" });
      assert.equal(stats.executions[digest], 1, `one execution for ${room}`);
      assert.equal(stats.triggered[digest], 1);
    }
    const metricsAfter = await stack.api.metrics();
    const deliveries = metric(metricsAfter, "switchboard_graphql_deliveries_total") - metric(metricsBefore, "switchboard_graphql_deliveries_total");
    assert.equal(deliveries, SUBSCRIBERS);
    const triggered = metric(metricsAfter, "switchboard_graphql_requests_total", { reason: "trigger" }) - metric(metricsBefore, "switchboard_graphql_requests_total", { reason: "trigger" });
    assert.equal(triggered, ROOMS.length);
  });

  test("a mutation in one room: its 10 subscribers get the new state, from one execution", { timeout: 30_000 }, async () => {
    for (const { feed } of subscribers) feed.read = feed.items.length;
    await stack.origin.reset();
    const writer = createClient({ url: stack.wsUrl, webSocketImpl: WebSocket, retryAttempts: 0 });
    clients.push(writer);
    const sent = new Feed("send");
    writer.subscribe({ query: 'mutation { send(room: "dd-r3", text: "hello") { id text } }' }, sent.observer);
    const [{ data }] = await sent.finished();

    const inRoom = subscribers.filter((s) => s.room === "dd-r3");
    assert.equal(inRoom.length, SUBSCRIBERS / ROOMS.length);
    for (const { feed } of inRoom) assert.deepEqual(await feed.next(10_000), { data: { messages: [data.send] } });
    await sleep(500);
    for (const { feed } of subscribers) assert.equal(feed.items.length - feed.read, 0, `${feed.what} got more`);
    const stats = await stack.origin.stats();
    const digest = digestOf({ query: QUERY, variables: { room: "dd-r3" }, operationName: "Room" });
    assert.equal(stats.triggered[digest], 1);
    assert.equal(stats.total, 2, `the mutation and one re-execution: ${JSON.stringify(stats)}`);
  });

  test("a burst of changes: results in order, the newest state last", { timeout: 30_000 }, async () => {
    for (const { feed } of subscribers) feed.read = feed.items.length;
    const writer = createClient({ url: stack.wsUrl, webSocketImpl: WebSocket, retryAttempts: 0 });
    clients.push(writer);
    const sends = [];
    for (let i = 0; i < 10; i++) {
      const f = new Feed(`send ${i}`);
      writer.subscribe({ query: `mutation { send(room: "dd-r1", text: "burst ${i}") { id } }` }, f.observer);
      sends.push(f.finished());
    }
    await Promise.all(sends);
    const inRoom = subscribers.filter((s) => s.room === "dd-r1");
    for (const { feed } of inRoom) {
      const last = await until(`${feed.what}: the newest state`, () => {
        const l = feed.items.at(-1);
        return l.data.messages.filter((m) => m.text.startsWith("burst")).length === 10 ? l : null;
      });
      // Each result has at least as many messages as the one before.
      const counts = feed.items.slice(feed.read).map((r) => r.data.messages.length);
      assert.deepEqual(counts, [...counts].sort((a, b) => a - b), `${feed.what}: results out of order: ${counts}`);
      assert.equal(last.data.messages.length, 10);
    }
  });
});
