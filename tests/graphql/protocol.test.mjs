// The wire, with a raw WebSocket client: subprotocol negotiation, every
// close code of docs/graphql.md (4400, 4401, 4403, 4406, 4408, 4409, 4429,
// 1013 for a connect the origin could not decide, and 1009), client tokens from the connection_init payload, the
// operation limit, an unreachable endpoint, suppressed unchanged results,
// and the control API's refusal to message a GraphQL connection.
//
// Needs: target/release/switchboard (cargo build --release -p switchboard).
// Run: npm test (npm ci in examples/graphql-origin, then node --test).

import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { createClient } from "graphql-ws";
import { Raw, digestOf, freePort, jwt, legacy, metric, modern, sleep, socketSpy, startGateway, startOrigin, startStack, until } from "./helpers.mjs";

const MODERN = "graphql-transport-ws";
const LEGACY = "graphql-ws";
const COUNTER = { query: "subscription { counter }" };

/** Starts a stack for the tests of one describe block. */
function withStack(options) {
  const box = {};
  before(async () => {
    box.stack = await startStack(options);
  });
  after(async () => {
    await box.stack?.stop();
  });
  return box;
}

/** A raw socket offering `protocols`, its `connection_init` sent. */
async function opened(url, protocols, payload) {
  const raw = await Raw.open(url, protocols, { skip: (m) => m.type === "ka" });
  if (payload !== null) raw.send(payload === undefined ? { type: "connection_init" } : { type: "connection_init", payload });
  return raw;
}

/** Asserts that `raw` is closed with `code` (and `reason`, when given). */
async function closedWith(raw, code, reason, ms = 5_000) {
  const close = await raw.closeWithin(ms);
  assert.equal(close.code, code, `expected close ${code}, got ${close.code} "${close.reason}" (received ${JSON.stringify(raw.all)})`);
  if (reason !== undefined) assert.equal(close.reason, reason);
  return close;
}

describe("with the example origin", { timeout: 180_000 }, () => {
  const box = withStack({ gatewayArgs: ["--namespace", "chat", "--max-message-size", "4096"] });
  const url = () => box.stack.wsUrl;

  describe("negotiation", () => {
    test("the modern protocol wins whatever the order of the offer", { timeout: 10_000 }, async () => {
      for (const offer of [[LEGACY, MODERN], [MODERN, LEGACY], [MODERN]]) {
        const raw = await Raw.open(url(), offer);
        assert.equal(raw.protocol, MODERN, `offer ${offer}`);
        raw.close();
      }
      const old = await Raw.open(url(), [LEGACY]);
      assert.equal(old.protocol, LEGACY);
      old.close();
      // switchboard.v1 comes before both.
      const native = await Raw.open(url(), [LEGACY, MODERN, "switchboard.v1"]);
      assert.equal(native.protocol, "switchboard.v1");
      native.close();
    });
  });

  describe("4400: a message that is not valid", () => {
    const cases = [
      ["not JSON", "{nope"],
      ["JSON but not an object", "[1, 2]"],
      ["an unknown type", { type: "bogus" }],
      ["a binary frame", Buffer.from(JSON.stringify({ id: "1", type: "subscribe", payload: { query: "{ counter }" } }))],
      ["a subscribe without id", { type: "subscribe", payload: { query: "{ counter }" } }],
      ["a subscribe without payload", { id: "1", type: "subscribe" }],
      ["a subscribe whose payload is not an object", { id: "1", type: "subscribe", payload: ["{ counter }"] }],
    ];
    for (const [what, message] of cases) {
      test(`modern, after the ack: ${what}`, { timeout: 10_000 }, async () => {
        const raw = await modern(url());
        raw.send(message);
        await closedWith(raw, 4400);
      });
    }
    for (const [what, message] of [
      ["not JSON", "{nope"],
      ["an unknown type", { type: "bogus" }],
      ["a binary frame", Buffer.from(JSON.stringify({ id: "1", type: "start", payload: { query: "{ counter }" } }))],
      ["a start without id", { type: "start", payload: { query: "{ counter }" } }],
    ]) {
      test(`legacy, after the ack: ${what}`, { timeout: 10_000 }, async () => {
        const raw = await legacy(url());
        raw.send(message);
        await closedWith(raw, 4400);
      });
    }
    test("modern, before connection_init: not JSON", { timeout: 10_000 }, async () => {
      const raw = await opened(url(), [MODERN], null);
      raw.send("{nope");
      await closedWith(raw, 4400);
    });
  });

  describe("4401: an operation before connection_init", () => {
    test("modern subscribe first", { timeout: 10_000 }, async () => {
      const raw = await opened(url(), [MODERN], null);
      raw.send({ id: "1", type: "subscribe", payload: { query: "{ counter }" } });
      await closedWith(raw, 4401, "Unauthorized");
    });
    test("legacy start first", { timeout: 10_000 }, async () => {
      const raw = await opened(url(), [LEGACY], null);
      raw.send({ id: "1", type: "start", payload: { query: "{ counter }" } });
      await closedWith(raw, 4401, "Unauthorized");
    });
    test("legacy start right after connection_init, without waiting for the ack, is fine", { timeout: 10_000 }, async () => {
      const raw = await opened(url(), [LEGACY], null);
      raw.send({ type: "connection_init", payload: {} });
      raw.send({ id: "1", type: "start", payload: { query: "{ counter }" } });
      await raw.expect("connection_ack");
      const data = await raw.expect("data", "1");
      assert.equal(typeof data.payload.data.counter, "number");
      await raw.expect("complete", "1");
    });
    test("a modern ping before connection_init is answered pong (payload echoed)", { timeout: 10_000 }, async () => {
      const raw = await opened(url(), [MODERN], null);
      raw.send({ type: "ping", payload: { early: true } });
      assert.deepEqual(await raw.expect("pong"), { type: "pong", payload: { early: true } });
      raw.send({ type: "connection_init" });
      await raw.expect("connection_ack");
      raw.close();
    });
  });

  describe("4403: the origin refuses", () => {
    test("modern: closed 4403 with the origin's reason, nothing sent before", { timeout: 10_000 }, async () => {
      const raw = await opened(url(), [MODERN], { refuse: true });
      await closedWith(raw, 4403, "Forbidden: refused by example");
      assert.deepEqual(raw.all, []);
    });
    test("legacy: connection_error, then closed 4403", { timeout: 10_000 }, async () => {
      const raw = await opened(url(), [LEGACY], { refuse: true });
      const error = await raw.expect("connection_error");
      assert.equal(typeof error.payload?.message, "string", JSON.stringify(error));
      await closedWith(raw, 4403, "Forbidden: refused by example");
    });
  });

  describe("operations", () => {
    test("modern query: next then complete; ids may be reused once complete", { timeout: 10_000 }, async () => {
      const raw = await modern(url());
      assert.deepEqual(raw.ack.payload, { hello: "anonymous" });
      for (let i = 0; i < 2; i++) {
        raw.send({ id: "q", type: "subscribe", payload: { query: "{ counter }" } });
        const next = await raw.expect("next", "q");
        assert.equal(typeof next.payload.data.counter, "number");
        await raw.expect("complete", "q");
      }
      raw.close();
    });

    test("modern: a GraphQL error is an error message with the origin's errors", { timeout: 10_000 }, async () => {
      const raw = await modern(url());
      raw.send({ id: "e", type: "subscribe", payload: { query: "{ nope }" } });
      const error = await raw.expect("error", "e");
      assert.ok(Array.isArray(error.payload), JSON.stringify(error));
      assert.match(error.payload[0].message, /Cannot query field "nope"/);
      await raw.quiet(200); // no complete after an error
      raw.close();
    });

    test("modern ping and pong after the ack", { timeout: 10_000 }, async () => {
      const raw = await modern(url());
      raw.send({ type: "ping", payload: { n: 1 } });
      assert.deepEqual(await raw.expect("pong"), { type: "pong", payload: { n: 1 } });
      raw.send({ type: "ping" });
      const pong = await raw.expect("pong");
      assert.equal(pong.payload ?? null, null);
      // An unsolicited pong (a one-way heartbeat) is allowed by the protocol.
      raw.send({ type: "pong" });
      raw.send({ id: "q", type: "subscribe", payload: { query: "{ counter }" } });
      await raw.expect("next", "q");
      raw.close();
    });

    test("4409: a modern subscribe with the id of a running subscription", { timeout: 10_000 }, async () => {
      const raw = await modern(url());
      raw.send({ id: "dup", type: "subscribe", payload: COUNTER });
      await raw.expect("next", "dup");
      raw.send({ id: "dup", type: "subscribe", payload: COUNTER });
      await closedWith(raw, 4409, "Subscriber for dup already exists");
    });

    test("legacy: a start with the id of a running subscription replaces it", { timeout: 10_000 }, async () => {
      const raw = await legacy(url());
      raw.send({ id: "x", type: "start", payload: COUNTER });
      const first = await raw.expect("data", "x");
      assert.equal(typeof first.payload.data.counter, "number");
      raw.send({ id: "x", type: "start", payload: { query: 'subscription { messages(room: "legacy-replace") { text } }' } });
      assert.deepEqual(await raw.expect("data", "x"), { id: "x", type: "data", payload: { data: { messages: [] } } });
      // The counter subscription is gone: a counter trigger sends nothing.
      await box.stack.api.trigger("counter");
      await raw.quiet(500);
      await box.stack.api.trigger("room:legacy-replace");
      assert.deepEqual((await raw.expect("data", "x")).payload, { data: { messages: [] } });
      raw.close();
    });

    test("legacy stop is answered complete; connection_terminate closes 1000", { timeout: 10_000 }, async () => {
      const raw = await legacy(url());
      raw.send({ id: "s", type: "start", payload: COUNTER });
      await raw.expect("data", "s");
      raw.send({ id: "s", type: "stop" });
      await raw.expect("complete", "s");
      await box.stack.api.trigger("counter");
      await raw.quiet(400);
      raw.send({ type: "connection_terminate" });
      await closedWith(raw, 1000);
    });

    test("modern complete from the client: nothing more for that id", { timeout: 10_000 }, async () => {
      const raw = await modern(url());
      raw.send({ id: "c", type: "subscribe", payload: COUNTER });
      await raw.expect("next", "c");
      raw.send({ id: "c", type: "complete" });
      await sleep(100);
      await box.stack.api.trigger("counter");
      await raw.quiet(500);
      raw.close();
    });

    test("without suppression, a trigger without a change still sends the result again", { timeout: 10_000 }, async () => {
      const raw = await modern(url());
      raw.send({ id: "s", type: "subscribe", payload: { query: 'subscription { messages(room: "unsuppressed") { text } }' } });
      const first = await raw.expect("next", "s");
      await box.stack.api.trigger("room:unsuppressed");
      assert.deepEqual(await raw.expect("next", "s"), first);
      raw.close();
    });

    test("1009: a message over --max-message-size", { timeout: 10_000 }, async () => {
      const raw = await modern(url());
      raw.send({ id: "big", type: "subscribe", payload: { query: `{ counter } # ${"x".repeat(5000)}` } });
      await closedWith(raw, 1009);
    });
  });

  describe("4429: a second connection_init", () => {
    test("modern", { timeout: 10_000 }, async () => {
      const raw = await modern(url());
      raw.send({ type: "connection_init" });
      await closedWith(raw, 4429, "Too many initialisation requests");
    });
    test("legacy", { timeout: 10_000 }, async () => {
      const raw = await legacy(url());
      raw.send({ type: "connection_init" });
      await closedWith(raw, 4429, "Too many initialisation requests");
    });
  });

  describe("the control API and the origin's events", () => {
    test("direct messages and channel subscriptions are refused 409 graphql_connection", { timeout: 10_000 }, async () => {
      const raw = await modern(url(), { user: "dm" });
      const [info] = await box.stack.api.connectionsOf("dm");
      const id = encodeURIComponent(info.id);
      const direct = await box.stack.api.post(`/v1/connections/${id}/messages`, { text: "hi" });
      assert.equal(direct.status, 409, JSON.stringify(direct.body));
      assert.equal(direct.body.code, "graphql_connection");
      const channel = await box.stack.api.put(`/v1/connections/${id}/channels/chat:lobby`);
      assert.equal(channel.status, 409, JSON.stringify(channel.body));
      assert.equal(channel.body.code, "graphql_connection");
      await raw.quiet(300);
      // It is listed like any other, and still works.
      const one = await box.stack.api.get(`/v1/connections/${id}`);
      assert.equal(one.status, 200);
      assert.equal(one.body.subprotocol, MODERN);
      assert.equal(one.body.user_id, "dm");
      raw.send({ id: "q", type: "subscribe", payload: { query: "{ counter }" } });
      await raw.expect("next", "q");
      raw.close(1000, "done");
      const bye = await until("the disconnect event", async () =>
        (await box.stack.origin.events()).find((e) => e.type === "disconnect" && e.connection_id === info.id),
      );
      assert.equal(bye.closed_by, "client");
      assert.equal(bye.code, 1000);
    });

    test("protocol closes are counted in switchboard_graphql_closes_total", { timeout: 10_000 }, async () => {
      const raw = await modern(url());
      raw.send({ type: "bogus" });
      await closedWith(raw, 4400);
      const text = await until("the 4400 close counted", async () => {
        const t = await box.stack.api.metrics();
        return metric(t, "switchboard_graphql_closes_total", { code: "4400" }) >= 1 ? t : null;
      });
      assert.ok(text.includes("switchboard_graphql_requests_total"));
    });
  });
});

describe("with client tokens (--jwt-secret)", { timeout: 60_000 }, () => {
  const SECRET = "graphql-tests-hs256-secret-of-32-bytes-or-more";
  const box = withStack({ gatewayArgs: ["--jwt-secret", SECRET] });
  const url = () => box.stack.wsUrl;

  test("no token anywhere: 4403 Forbidden: token_missing", { timeout: 10_000 }, async () => {
    const raw = await opened(url(), [MODERN], {});
    await closedWith(raw, 4403, "Forbidden: token_missing");
  });

  test("no token anywhere, legacy: connection_error, then 4403 Forbidden: token_missing", { timeout: 10_000 }, async () => {
    const old = await opened(url(), [LEGACY], {});
    const error = await old.expect("connection_error");
    assert.equal(typeof error.payload?.message, "string");
    await closedWith(old, 4403, "Forbidden: token_missing");
  });

  test("an expired token: 4403 Forbidden: token_expired", { timeout: 10_000 }, async () => {
    const expired = await opened(url(), [MODERN], { token: jwt(SECRET, { sub: "old", exp: Math.floor(Date.now() / 1000) - 3600 }) });
    await closedWith(expired, 4403, "Forbidden: token_expired");
  });

  test("a token signed with another key: 4403 Forbidden: token_bad_signature", { timeout: 10_000 }, async () => {
    const forged = await opened(url(), [MODERN], { token: jwt("another-secret-that-is-also-32-bytes-long!", { sub: "eve" }) });
    await closedWith(forged, 4403, "Forbidden: token_bad_signature");
  });

  test("a token in the connection_init payload, in each accepted field", { timeout: 15_000 }, async () => {
    const t = jwt(SECRET, { sub: "alice", plan: "pro" });
    for (const payload of [{ token: t }, { authToken: t }, { authorization: `Bearer ${t}` }, { Authorization: t }]) {
      const raw = await opened(url(), [MODERN], payload);
      const ack = await raw.expect("connection_ack");
      assert.deepEqual(ack.payload, { hello: "alice" }, `payload field ${Object.keys(payload)}`);
      raw.close();
    }
    const old = await opened(url(), [LEGACY], { authToken: t });
    assert.deepEqual((await old.expect("connection_ack")).payload, { hello: "alice" });
    old.close();
    // The origin's connect event and GraphQL requests know the user.
    const connect = (await box.stack.origin.events()).filter((e) => e.type === "connect" && e.user_id === "alice");
    assert.ok(connect.length >= 5);
    assert.equal(connect[0].claims.plan, "pro");
    const raw = await opened(url(), [MODERN], { token: t });
    await raw.expect("connection_ack");
    raw.send({ id: "w", type: "subscribe", payload: { query: "query WhoAmI { counter }" } });
    await raw.expect("next", "w");
    const request = (await box.stack.origin.requests()).find((r) => r.body.query === "query WhoAmI { counter }");
    assert.equal(request.body.extensions.switchboard.user_id, "alice");
    assert.equal(request.body.extensions.switchboard.claims.sub, "alice");
    assert.equal(request.headers["switchboard-user-id"], "alice");
    raw.close();
  });

  test("a valid token in the upgrade request is used", { timeout: 10_000 }, async () => {
    const t = jwt(SECRET, { sub: "bob" });
    const raw = await opened(`${url()}?token=${t}`, [MODERN], {});
    assert.deepEqual((await raw.expect("connection_ack")).payload, { hello: "bob" });
    raw.close();
  });

  test("an invalid token in the upgrade request: the handshake is refused (401), as for any client", { timeout: 10_000 }, async () => {
    // "Everything the handshake checks still applies (allowed origins,
    // limits, a token given in the request)."
    await assert.rejects(Raw.open(`${url()}?token=not-a-token`, [MODERN]), /handshake answered 401/);
  });
});

describe("without --graphql-endpoint", { timeout: 30_000 }, () => {
  const box = withStack({ graphql: false });
  const url = () => box.stack.wsUrl;

  test("4406: a client offering only GraphQL gets the one it preferred, then the close", { timeout: 10_000 }, async () => {
    for (const offer of [[MODERN], [LEGACY], [LEGACY, MODERN]]) {
      const raw = await Raw.open(url(), offer);
      // The modern protocol whenever it is offered.
      assert.equal(raw.protocol, offer.includes(MODERN) ? MODERN : offer[0]);
      await closedWith(raw, 4406, "Subprotocol not acceptable");
    }
  });

  test("graphql-ws stops at 4406 instead of retrying", { timeout: 10_000 }, async () => {
    const spy = socketSpy();
    let connecting = 0;
    const client = createClient({ url: url(), webSocketImpl: spy.WebSocket, retryWait: () => sleep(50), on: { connecting: () => connecting++ } });
    const error = await new Promise((resolve) => client.subscribe({ query: "{ counter }" }, { next() {}, error: resolve, complete: () => resolve(null) }));
    assert.equal(error?.code, 4406, `expected the 4406 close, got ${JSON.stringify(error)}`);
    await sleep(500);
    assert.equal(connecting, 1);
    await client.dispose();
  });
});

describe("--graphql-init-timeout 500ms", { timeout: 30_000 }, () => {
  const box = withStack({ gatewayArgs: ["--graphql-init-timeout", "500ms"] });

  test("4408: no connection_init in time", { timeout: 10_000 }, async () => {
    const started = Date.now();
    const raw = await opened(box.stack.wsUrl, [MODERN], null);
    await closedWith(raw, 4408, "Connection initialisation timeout", 3_000);
    const took = Date.now() - started;
    assert.ok(took >= 400, `closed after ${took} ms`);
  });

  test("4408: pings do not count as connection_init", { timeout: 10_000 }, async () => {
    const raw = await opened(box.stack.wsUrl, [MODERN], null);
    raw.send({ type: "ping" });
    await raw.expect("pong");
    await closedWith(raw, 4408, "Connection initialisation timeout", 3_000);
  });

  test("4408 for the legacy protocol too", { timeout: 10_000 }, async () => {
    const raw = await opened(box.stack.wsUrl, [LEGACY], null);
    await closedWith(raw, 4408, "Connection initialisation timeout", 3_000);
  });

  test("a client that sends connection_init in time is not closed", { timeout: 10_000 }, async () => {
    const raw = await modern(box.stack.wsUrl);
    await sleep(1_000);
    raw.send({ id: "q", type: "subscribe", payload: { query: "{ counter }" } });
    await raw.expect("next", "q");
    raw.close();
  });
});

describe("the origin's webhook URL down", { timeout: 30_000 }, () => {
  let box;
  before(async () => {
    const closed = await freePort();
    box = { stack: await startStack({ events: false, gatewayArgs: ["--origin", `http://127.0.0.1:${closed}/events`] }) };
  });
  after(async () => {
    await box?.stack?.stop();
  });

  test("1013 (retried by graphql-ws, unlike 4500): the connect event fails", { timeout: 10_000 }, async () => {
    const raw = await opened(box.stack.wsUrl, [MODERN], {});
    await closedWith(raw, 1013, "origin unavailable");
  });

  test("1013, legacy: connection_error, then the close", { timeout: 10_000 }, async () => {
    const old = await opened(box.stack.wsUrl, [LEGACY], {});
    await old.expect("connection_error");
    await closedWith(old, 1013, "origin unavailable");
  });
});

describe("the GraphQL endpoint down", { timeout: 30_000 }, () => {
  let box;
  before(async () => {
    const closed = await freePort();
    box = { stack: await startStack({ graphql: false, gatewayArgs: ["--graphql-endpoint", `http://127.0.0.1:${closed}/graphql`] }) };
  });
  after(async () => {
    await box?.stack?.stop();
  });

  test("an operation gets one error with extensions.code origin_unavailable", { timeout: 15_000 }, async () => {
    const raw = await modern(box.stack.wsUrl);
    for (const payload of [{ query: "{ counter }" }, COUNTER]) {
      raw.send({ id: "u", type: "subscribe", payload });
      const error = await raw.expect("error", "u", 12_000);
      assert.equal(error.payload.length, 1, JSON.stringify(error));
      assert.equal(error.payload[0].extensions?.code, "origin_unavailable", JSON.stringify(error));
      assert.equal(typeof error.payload[0].message, "string");
    }
    const old = await legacy(box.stack.wsUrl);
    old.send({ id: "1", type: "start", payload: { query: "{ counter }" } });
    const error = await old.expect("error", "1", 12_000);
    assert.equal(error.payload[0].extensions?.code, "origin_unavailable", JSON.stringify(error));
    raw.close();
    old.close();
  });
});

describe("an endpoint that answers something that is not GraphQL", { timeout: 30_000 }, () => {
  // The example origin answers 404 {"error": "not found"} off its routes: a
  // status without a GraphQL body.
  let origin, gateway;
  before(async () => {
    origin = await startOrigin();
    gateway = await startGateway(["--origin", origin.eventsUrl, "--graphql-endpoint", `${origin.url}/not-graphql`]);
  });
  after(async () => {
    await gateway?.kill();
    await origin?.kill();
  });

  test("origin_unavailable", { timeout: 15_000 }, async () => {
    const raw = await modern(gateway.wsUrl);
    raw.send({ id: "n", type: "subscribe", payload: { query: "{ counter }" } });
    const error = await raw.expect("error", "n", 12_000);
    assert.equal(error.payload[0].extensions?.code, "origin_unavailable", JSON.stringify(error));
    raw.close();
  });
});

describe("--graphql-max-operations 2", { timeout: 30_000 }, () => {
  const box = withStack({ gatewayArgs: ["--graphql-max-operations", "2"] });

  test("a third operation gets too_many_operations and is not run", { timeout: 10_000 }, async () => {
    const raw = await modern(box.stack.wsUrl);
    raw.send({ id: "1", type: "subscribe", payload: COUNTER });
    await raw.expect("next", "1");
    raw.send({ id: "2", type: "subscribe", payload: { query: 'subscription { messages(room: "max-ops") { text } }' } });
    await raw.expect("next", "2");
    await box.stack.origin.reset();
    const third = { query: 'subscription { messages(room: "max-ops-3") { text } }' };
    raw.send({ id: "3", type: "subscribe", payload: third });
    const error = await raw.expect("error", "3");
    assert.equal(error.payload[0].extensions?.code, "too_many_operations", JSON.stringify(error));
    assert.equal((await box.stack.origin.stats()).total, 0, "the refused operation reached the origin");
    // A query counts while it waits for its result, too.
    raw.send({ id: "4", type: "subscribe", payload: { query: "{ counter }" } });
    assert.equal((await raw.expect("error", "4")).payload[0].extensions?.code, "too_many_operations");

    // Once one ends, there is room again.
    raw.send({ id: "1", type: "complete" });
    await sleep(100);
    raw.send({ id: "5", type: "subscribe", payload: third });
    await raw.expect("next", "5");
    const text = await box.stack.api.metrics();
    assert.ok(metric(text, "switchboard_graphql_refused_operations_total", { code: "too_many_operations" }) >= 2);
    raw.close();
  });
});

describe("--graphql-suppress-unchanged", { timeout: 30_000 }, () => {
  const box = withStack({ gatewayArgs: ["--graphql-suppress-unchanged"] });

  test("a re-executed result equal to the previous re-execution's is not sent", { timeout: 10_000 }, async () => {
    const raw = await modern(box.stack.wsUrl);
    const query = 'subscription { messages(room: "suppress") { text } }';
    raw.send({ id: "s", type: "subscribe", payload: { query } });
    assert.deepEqual((await raw.expect("next", "s")).payload, { data: { messages: [] } });
    await box.stack.origin.reset();
    // The first re-execution is sent (initial results are not compared);
    // a second one without a change is not.
    await box.stack.api.trigger("room:suppress");
    assert.deepEqual((await raw.take("next", "s")).payload, { data: { messages: [] } });
    await box.stack.api.trigger("room:suppress");
    await until("the re-executions", async () => (await box.stack.origin.stats()).triggered[digestOf({ query })] >= 2);
    await raw.quiet(500);
    // A change: sent.
    raw.send({ id: "m", type: "subscribe", payload: { query: 'mutation { send(room: "suppress", text: "new") { id } }' } });
    await raw.take("next", "m");
    await raw.take("complete", "m");
    assert.deepEqual((await raw.take("next", "s")).payload, { data: { messages: [{ text: "new" }] } });
    // And the same again: not sent.
    await box.stack.api.trigger("room:suppress");
    await raw.quiet(500);
    const text = await box.stack.api.metrics();
    assert.ok(metric(text, "switchboard_graphql_suppressed_total") >= 2, "suppressed results are counted");
    raw.close();
  });
});

describe("--origin-secret, with the example origin verifying every request", { timeout: 30_000 }, () => {
  const SECRET = "graphql-tests-origin-secret";
  const box = withStack({ gatewayArgs: ["--origin-secret", SECRET], originEnv: { ORIGIN_SECRET: SECRET } });

  test("connect, query, subscription and mutation all pass the origin's signature check", { timeout: 10_000 }, async () => {
    const raw = await modern(box.stack.wsUrl, { user: "signed" });
    assert.deepEqual(raw.ack.payload, { hello: "signed" });
    raw.send({ id: "s", type: "subscribe", payload: COUNTER });
    const first = await raw.take("next", "s");
    raw.send({ id: "m", type: "subscribe", payload: { query: "mutation { increment }" } });
    const { increment } = (await raw.take("next", "m")).payload.data;
    assert.deepEqual((await raw.take("next", "s")).payload, { data: { counter: increment } });
    assert.equal(increment, first.payload.data.counter + 1);
    raw.close();
  });
});
