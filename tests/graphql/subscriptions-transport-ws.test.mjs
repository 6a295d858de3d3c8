// The legacy protocol (graphql-ws) with its client, npm
// `subscriptions-transport-ws`: connection_init accepted and refused
// (connection_error), queries, mutations, subscriptions re-executed on the
// origin's triggers, stop, GraphQL errors, `ka` keep-alives, and a reconnect
// after the control API closed the connection. Contract: docs/graphql.md.
//
// Needs: target/release/switchboard (cargo build --release -p switchboard).
// Run: npm test (npm ci in examples/graphql-origin, then node --test).

import { after, afterEach, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { SubscriptionClient } from "subscriptions-transport-ws";
import { Feed, sleep, socketSpy, startStack, until } from "./helpers.mjs";

// Pings (and so `ka`s) every second, to see several in a test.
const PING_INTERVAL = "1s";

let stack;
const clients = [];

/** A SubscriptionClient of the gateway through a socket spy, closed after the test. */
function client(options = {}) {
  const spy = socketSpy();
  const c = new SubscriptionClient(stack.wsUrl, { reconnect: false, ...options }, spy.WebSocket);
  c.spy = spy;
  c.errors = [];
  c.onError((e) => c.errors.push(e));
  clients.push(c);
  return c;
}

/** Runs `payload` (a string is a query) on `c`; its results come in a Feed. */
function run(c, payload, what) {
  const request = typeof payload === "string" ? { query: payload } : payload;
  const feed = new Feed(what ?? request.query);
  const subscription = c.request(request).subscribe(feed.observer);
  feed.stop = () => subscription.unsubscribe();
  return feed;
}

async function once(c, payload) {
  const items = await run(c, payload).finished();
  assert.equal(items.length, 1, `one result expected, got ${JSON.stringify(items)}`);
  return items[0];
}

/** The frames the client's current socket received, ka excluded. */
function frames(c) {
  return c.spy.sockets.at(-1).frames.filter((f) => f.type !== "ka");
}

describe("subscriptions-transport-ws (graphql-ws) through the gateway", { timeout: 120_000 }, () => {
  before(async () => {
    stack = await startStack({ gatewayArgs: ["--ping-interval", PING_INTERVAL] });
  });
  afterEach(() => {
    for (const c of clients.splice(0)) c.close();
  });
  after(async () => {
    await stack?.stop();
  });

  test("connection_init is accepted; the ack carries the origin's ack_payload", { timeout: 20_000 }, async () => {
    const c = client({ connectionParams: { user: "lee" } });
    const acks = [];
    c.onConnected((payload) => acks.push(payload));
    await until("connection_ack", () => acks.length);
    assert.deepEqual(acks, [{ hello: "lee" }]);
    assert.equal(c.spy.sockets[0].ws.protocol, "graphql-ws");
    const connect = (await stack.origin.events()).find((e) => e.type === "connect" && e.init_payload?.user === "lee");
    assert.ok(connect, "no connect event with the init payload");
    assert.equal(connect.subprotocol, "graphql-ws");
    const [info] = await stack.api.connectionsOf("lee");
    assert.equal(info.subprotocol, "graphql-ws");
  });

  test("an origin refusal: connection_error, then close 4403", { timeout: 20_000 }, async () => {
    const errors = [];
    const c = client({ connectionParams: { refuse: true }, connectionCallback: (e) => e && errors.push(e) });
    await until("connection_error", () => errors.length);
    assert.equal(typeof errors[0].message, "string", `connection_error payload: ${JSON.stringify(errors[0])}`);
    await until("the close", () => c.spy.sockets[0].close);
    assert.equal(c.spy.sockets[0].close.code, 4403);
    assert.equal(c.spy.sockets[0].close.reason, "Forbidden: refused by example");
    assert.deepEqual(
      c.spy.sockets[0].frames.map((f) => f.type),
      ["connection_error"],
      "connection_error and nothing else before the close",
    );
    await sleep(500);
    assert.equal(c.spy.sockets.length, 1, "reconnect: false, so no second socket");
  });

  test("a query and a mutation: data, then complete", { timeout: 20_000 }, async () => {
    const c = client();
    const before = (await once(c, "{ counter }")).data.counter;
    assert.equal(typeof before, "number");
    assert.deepEqual(await once(c, "mutation { increment(by: 2) }"), { data: { increment: before + 2 } });
    assert.deepEqual(await once(c, "{ counter }"), { data: { counter: before + 2 } });
    const wire = frames(c).map((f) => f.type);
    assert.deepEqual(wire, ["connection_ack", "data", "complete", "data", "complete", "data", "complete"]);
  });

  test("a subscription gets its initial result, then one per mutation", { timeout: 20_000 }, async () => {
    const c = client();
    const room = run(c, { query: "subscription($room: String!) { messages(room: $room) { text } }", variables: { room: "legacy-sub" } });
    assert.deepEqual(await room.next(), { data: { messages: [] } });
    const counter = run(c, "subscription { counter }");
    const first = await counter.next();
    assert.equal(first.extensions?.switchboard, undefined, "extensions.switchboard leaked to the client");

    const other = client();
    await once(other, 'mutation { send(room: "legacy-sub", text: "hi") { id } }');
    assert.deepEqual(await room.next(), { data: { messages: [{ text: "hi" }] } });
    const { increment } = (await once(other, "mutation { increment }")).data;
    assert.deepEqual(await counter.next(), { data: { counter: increment } });
    await room.quiet(300);
  });

  test("stop ends a subscription: the gateway answers complete, and sends nothing more", { timeout: 20_000 }, async () => {
    const c = client();
    const sub = run(c, { query: 'subscription { messages(room: "legacy-stop") { text } }' });
    await sub.next();
    const id = frames(c).find((f) => f.type === "data").id;
    sub.stop(); // sends stop {id}
    await until("complete for the stopped operation", () => frames(c).some((f) => f.type === "complete" && f.id === id));
    await once(c, 'mutation { send(room: "legacy-stop", text: "after") { id } }');
    await sleep(500);
    assert.equal(frames(c).filter((f) => f.type === "data" && f.id === id).length, 1, "data came after stop");
  });

  test("GraphQL errors come as an error message", { timeout: 20_000 }, async () => {
    const c = client();
    const error = await run(c, "{ nope }").failure();
    // The client hands the observer the first error of the payload.
    assert.match(error.message, /Cannot query field "nope"/);
    const wire = frames(c).find((f) => f.type === "error");
    assert.ok(Array.isArray(wire.payload), `error payload should be a list: ${JSON.stringify(wire)}`);
    assert.equal(typeof (await once(c, "{ counter }")).data.counter, "number");
  });

  test("ka right after connection_ack, then every ping interval", { timeout: 20_000 }, async () => {
    const c = client();
    await until("connection_ack", () => c.spy.sockets[0]?.frames.length);
    await sleep(2_600);
    const types = c.spy.sockets[0].frames.map((f) => f.type);
    assert.deepEqual(types.slice(0, 2), ["connection_ack", "ka"], `a ka right after the ack: ${types}`);
    const kas = types.filter((t) => t === "ka").length;
    assert.ok(kas >= 2 && kas <= 5, `about one ka per second after the first: ${kas} in 2.6 s`);
    // The client counted them as keep-alives (it would close otherwise).
    assert.equal(c.wasKeepAliveReceived !== undefined, true);
    assert.equal(c.status, c.spy.WebSocket.OPEN);
  });

  test("reconnect: true brings a closed connection back, and its subscription", { timeout: 30_000 }, async () => {
    const c = client({ reconnect: true, connectionParams: { user: "lazarus" } });
    const reconnected = [];
    c.onReconnected((payload) => reconnected.push(payload));
    const sub = run(c, "subscription { counter }");
    const first = await sub.next();
    const [before] = await stack.api.connectionsOf("lazarus");
    const closed = await stack.api.delete(`/v1/connections/${encodeURIComponent(before.id)}?code=4000&reason=bye`);
    assert.equal(closed.status, 202, JSON.stringify(closed.body));
    await until("the reconnect", () => reconnected.length, 10_000);
    assert.equal(c.spy.sockets[0].close.code, 4000);
    assert.equal(c.spy.sockets[0].close.reason, "bye");
    assert.deepEqual(reconnected, [{ hello: "lazarus" }]);
    const [afterwards] = await stack.api.connectionsOf("lazarus");
    assert.notEqual(afterwards.id, before.id);
    // start was sent again: the initial result, then the triggers.
    assert.equal((await sub.next()).data.counter, first.data.counter);
    const other = client();
    const { increment } = (await once(other, "mutation { increment(by: 7) }")).data;
    assert.deepEqual(await sub.next(), { data: { counter: increment } });
  });
});
