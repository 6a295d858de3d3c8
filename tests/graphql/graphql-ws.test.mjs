// The modern protocol (graphql-transport-ws) with its reference client, npm
// `graphql-ws`: connection_init accepted and refused by the origin, queries,
// mutations, subscriptions re-executed on the origin's triggers, complete,
// GraphQL errors, keep-alive, and a reconnect after the control API closed
// the connection. Contract: docs/graphql.md.
//
// Needs: target/release/switchboard (cargo build --release -p switchboard).
// Run: npm test (npm ci in examples/graphql-origin, then node --test).

import { after, afterEach, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { createClient } from "graphql-ws";
import WebSocket from "ws";
import { Feed, digestOf, sleep, socketSpy, startStack, until } from "./helpers.mjs";

let stack;
const clients = [];

/** A graphql-ws client of the gateway, disposed after the test. */
function client(options = {}) {
  const c = createClient({
    url: stack.wsUrl,
    webSocketImpl: WebSocket,
    retryAttempts: 0,
    onNonLazyError: () => {},
    ...options,
  });
  clients.push(c);
  return c;
}

/** Runs `payload` (a string is a query) on `c`; its results come in a Feed. */
function run(c, payload, what) {
  const feed = new Feed(what ?? (typeof payload === "string" ? payload : payload.query));
  feed.stop = c.subscribe(typeof payload === "string" ? { query: payload } : payload, feed.observer);
  return feed;
}

/** The single result of a query or mutation. */
async function once(c, payload) {
  const items = await run(c, payload).finished();
  assert.equal(items.length, 1, `one result expected, got ${JSON.stringify(items)}`);
  return items[0];
}

describe("graphql-ws (graphql-transport-ws) through the gateway", { timeout: 120_000 }, () => {
  before(async () => {
    stack = await startStack();
  });
  afterEach(async () => {
    for (const c of clients.splice(0)) {
      c.terminate();
      await c.dispose();
    }
  });
  after(async () => {
    await stack?.stop();
  });

  test("connection_init is accepted; the ack carries the origin's ack_payload", { timeout: 20_000 }, async () => {
    const acks = [];
    client({ lazy: false, connectionParams: { user: "ann" }, on: { connected: (_socket, payload) => acks.push(payload) } });
    await until("connection_ack", () => acks.length);
    assert.deepEqual(acks, [{ hello: "ann" }]);

    // The origin's connect event says which protocol, and carries the payload.
    const events = await stack.origin.events();
    const connect = events.find((e) => e.type === "connect" && e.init_payload?.user === "ann");
    assert.ok(connect, `no connect event with the init payload: ${JSON.stringify(events)}`);
    assert.equal(connect.subprotocol, "graphql-transport-ws");
    assert.deepEqual(connect.init_payload, { user: "ann" });

    // It is a connection like any other: listed by the control API, with the
    // user id the origin named.
    const [info] = await stack.api.connectionsOf("ann");
    assert.equal(info.id, connect.connection_id);
    assert.equal(info.subprotocol, "graphql-transport-ws");

    // Without a payload: init_payload is absent from the event.
    const anon = [];
    client({ lazy: false, on: { connected: (_s, payload) => anon.push(payload) } });
    await until("the second connection_ack", () => anon.length);
    assert.deepEqual(anon, [{ hello: "anonymous" }]);
    const again = (await stack.origin.events()).filter((e) => e.type === "connect" && e.subprotocol === "graphql-transport-ws");
    const last = again.at(-1);
    assert.ok(!("init_payload" in last) || last.init_payload === null, `init_payload should be absent: ${JSON.stringify(last)}`);
  });

  test("an origin refusal closes 4403 and the client does not retry", { timeout: 20_000 }, async () => {
    const spy = socketSpy();
    const closes = [];
    let connecting = 0;
    const c = client({
      webSocketImpl: spy.WebSocket,
      connectionParams: { refuse: true },
      on: { closed: (e) => closes.push(e), connecting: () => connecting++ },
    });
    const error = await run(c, "{ counter }").failure();
    assert.equal(error.code, 4403, `expected a 4403 close, got ${JSON.stringify(error)}`);
    assert.equal(error.reason, "Forbidden: refused by example");
    assert.equal(closes.length, 1);
    assert.equal(closes[0].code, 4403);
    // Nothing but the close: no connection_ack, no message.
    assert.deepEqual(spy.sockets[0].frames, []);
    await sleep(1_000);
    assert.equal(connecting, 1, "the client must not connect again");
    assert.equal(spy.sockets.length, 1);
  });

  test("a query gives one next, then complete", { timeout: 20_000 }, async () => {
    const c = client();
    const result = await once(c, "{ counter }");
    assert.equal(typeof result.data.counter, "number");
    assert.equal(result.errors, undefined);

    // operationName picks the operation of a document with several.
    const named = await once(c, {
      query: "query A { counter } query B($room: String!) { messages(room: $room) { text } }",
      operationName: "B",
      variables: { room: "graphql-ws-empty" },
    });
    assert.deepEqual(named, { data: { messages: [] } });
  });

  test("a mutation runs at the origin and its result comes back", { timeout: 20_000 }, async () => {
    const c = client();
    const before = (await once(c, "{ counter }")).data.counter;
    const result = await once(c, "mutation { increment(by: 3) }");
    assert.deepEqual(result, { data: { increment: before + 3 } });
    assert.deepEqual(await once(c, "{ counter }"), { data: { counter: before + 3 } });

    const sent = await once(c, {
      query: "mutation($room: String!, $text: String!) { send(room: $room, text: $text) { room text } }",
      variables: { room: "graphql-ws-mutation", text: "hello" },
    });
    assert.deepEqual(sent, { data: { send: { room: "graphql-ws-mutation", text: "hello" } } });
  });

  test("a subscription gets its initial result, then one per mutation", { timeout: 20_000 }, async () => {
    const c = client();
    const counter = run(c, "subscription { counter }");
    const first = await counter.next();
    assert.equal(typeof first.data.counter, "number");
    // The gateway removes extensions.switchboard before results reach clients.
    assert.equal(first.extensions?.switchboard, undefined, `extensions.switchboard leaked: ${JSON.stringify(first)}`);

    const room = run(c, { query: "subscription($room: String!) { messages(room: $room) { text } }", variables: { room: "graphql-ws-sub" } });
    assert.deepEqual(await room.next(), { data: { messages: [] } });

    // A mutation from another client: the origin publishes "counter", the
    // gateway re-executes and pushes.
    const other = client();
    const { increment } = (await once(other, "mutation { increment }")).data;
    assert.deepEqual(await counter.next(), { data: { counter: increment } });
    assert.equal(increment, first.data.counter + 1);

    await once(other, { query: 'mutation { send(room: "graphql-ws-sub", text: "one") { id } }' });
    assert.deepEqual(await room.next(), { data: { messages: [{ text: "one" }] } });
    await once(other, { query: 'mutation { send(room: "graphql-ws-sub", text: "two") { id } }' });
    assert.deepEqual(await room.next(), { data: { messages: [{ text: "one" }, { text: "two" }] } });
    // The room's messages do not touch the counter subscription.
    await counter.quiet(300);
    assert.equal(counter.done, false);
    assert.equal(room.done, false);
  });

  test("the requests to the origin carry the gateway's extensions and headers", { timeout: 20_000 }, async () => {
    const c = client({ lazy: false, connectionParams: { user: "ida" } });
    await stack.origin.reset();
    await once(c, { query: "query Who { counter }", extensions: { trace: "t-1", switchboard: { connection_id: "forged", user_id: "mallory" } } });
    const [info] = await stack.api.connectionsOf("ida");
    const request = (await stack.origin.requests()).find((r) => r.body.query === "query Who { counter }");
    assert.ok(request, "the origin got no request for the query");
    assert.equal(request.body.extensions.trace, "t-1", "the client's own extensions go as they are");
    const sb = request.body.extensions.switchboard;
    assert.equal(sb.connection_id, info.id, "extensions.switchboard is the gateway's");
    assert.equal(sb.user_id, "ida");
    assert.equal(sb.trigger ?? null, null);
    assert.equal(request.headers["switchboard-connection-id"], info.id);
    assert.equal(request.headers["switchboard-user-id"], "ida");
    assert.match(request.headers["content-type"], /^application\/json/);

    // A re-execution after a trigger: no connection id, the trigger key, the
    // first subscriber's user.
    const sub = run(c, { query: "subscription Watch($room: String!) { messages(room: $room) { text } }", variables: { room: "graphql-ws-ext" }, operationName: "Watch" });
    await sub.next();
    await stack.api.trigger("room:graphql-ws-ext");
    await sub.next();
    const rerun = (await stack.origin.requests()).filter((r) => r.body.operationName === "Watch").at(-1);
    assert.equal(rerun.body.extensions.switchboard.trigger, "room:graphql-ws-ext");
    assert.equal(rerun.body.extensions.switchboard.connection_id, undefined);
    assert.equal(rerun.body.extensions.switchboard.user_id, "ida");
  });

  test("complete stops a subscription: no result after it, no re-execution", { timeout: 20_000 }, async () => {
    const c = client();
    const query = 'subscription { messages(room: "graphql-ws-complete") { text } }';
    await stack.origin.reset();
    const sub = run(c, { query });
    assert.deepEqual(await sub.next(), { data: { messages: [] } });
    sub.stop(); // sends complete {id}
    await sleep(200);
    await once(c, 'mutation { send(room: "graphql-ws-complete", text: "after") { id } }');
    await sleep(700);
    assert.deepEqual(sub.items.slice(sub.read), [], "a result came after complete");
    const stats = await stack.origin.stats();
    assert.equal(stats.executions[digestOf({ query })], 1, `only the initial execution: ${JSON.stringify(stats)}`);
    assert.equal(stats.triggered[digestOf({ query })], undefined, "the origin re-executed a subscription nobody holds any more");
  });

  test("GraphQL errors come as an error message", { timeout: 20_000 }, async () => {
    const c = client();
    const errors = await run(c, "{ nope }").failure();
    assert.ok(Array.isArray(errors), `error payload should be a list of GraphQL errors: ${JSON.stringify(errors)}`);
    assert.equal(errors.length, 1);
    assert.match(errors[0].message, /Cannot query field "nope"/);
    const syntax = await run(c, "{ counter").failure();
    assert.match(syntax[0].message, /Syntax Error/);
    const sub = await run(c, "subscription { nope }").failure();
    assert.match(sub[0].message, /Cannot query field "nope" on type "Subscription"/);
    // The connection is still good.
    assert.equal(typeof (await once(c, "{ counter }")).data.counter, "number");
  });

  test("keep-alive: the client's pings are answered pong", { timeout: 20_000 }, async () => {
    const pongs = [];
    const c = client({ lazy: false, keepAlive: 150, on: { pong: (received, payload) => received && pongs.push(payload) } });
    await until("three pongs", () => pongs.length >= 3, 5_000);
    assert.equal(typeof (await once(c, "{ counter }")).data.counter, "number");
  });

  test("a connection closed by the control API reconnects and its subscription resumes", { timeout: 30_000 }, async () => {
    const connected = [];
    const c = client({
      lazy: false,
      retryAttempts: 5,
      retryWait: () => sleep(100),
      shouldRetry: () => true,
      connectionParams: { user: "phoenix" },
      on: { connected: (_s, payload, wasRetry) => connected.push({ payload, wasRetry }) },
    });
    const sub = run(c, "subscription { counter }");
    const first = await sub.next();
    const [before] = await stack.api.connectionsOf("phoenix");

    const closed = await stack.api.delete(`/v1/connections/${encodeURIComponent(before.id)}?code=1012&reason=restart`);
    assert.equal(closed.status, 202, JSON.stringify(closed.body));
    await until("a second connection_ack", () => connected.length >= 2, 10_000);
    assert.equal(connected[1].wasRetry, true);
    assert.deepEqual(connected[1].payload, { hello: "phoenix" });
    const [afterwards] = await stack.api.connectionsOf("phoenix");
    assert.notEqual(afterwards.id, before.id);

    // The client subscribed again: its initial result, then the triggers.
    const resumed = await sub.next();
    assert.equal(resumed.data.counter, first.data.counter);
    const other = client();
    const { increment } = (await once(other, "mutation { increment(by: 5) }")).data;
    assert.deepEqual(await sub.next(), { data: { counter: increment } });

    // The origin heard of the first connection's end, closed by the origin.
    const bye = await until("the disconnect event", async () =>
      (await stack.origin.events()).find((e) => e.type === "disconnect" && e.connection_id === before.id),
    );
    assert.equal(bye.closed_by, "origin");
    assert.equal(bye.code, 1012);
  });
});
