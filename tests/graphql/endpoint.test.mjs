// The gateway's side of the origin's GraphQL endpoint, against a scripted
// endpoint in this process: what an answer means (data: null, errors without
// data, partial results, extensions kept, not GraphQL, too slow), a failed
// re-execution, the default digest, coalesced re-executions, signatures and
// forwarded headers on the requests, and the triggers route's validation.
// Contract: docs/graphql.md ("Operations", "The origin's side").
//
// Needs: target/release/switchboard (cargo build --release -p switchboard).
// Run: npm test (node --test).

import { after, before, beforeEach, describe, test } from "node:test";
import assert from "node:assert/strict";
import { createServer } from "node:http";
import { createHmac, timingSafeEqual } from "node:crypto";
import { Raw, modern, sleep, startGateway, until } from "./helpers.mjs";

const SECRET = "endpoint-test-origin-secret";

/** A GraphQL endpoint whose answers the test scripts: `answer(body, req)`
 * gives `{status?, body?, raw?, delay?}`. Every request is kept. */
async function scriptedEndpoint() {
  const endpoint = { requests: [], answer: () => ({ body: { data: null } }) };
  endpoint.server = createServer(async (req, res) => {
    const chunks = [];
    for await (const c of req) chunks.push(c);
    const raw = Buffer.concat(chunks);
    let body;
    try {
      body = JSON.parse(raw.toString());
    } catch {
      body = raw.toString();
    }
    const request = { body, raw, headers: req.headers, method: req.method, started: performance.now() };
    endpoint.requests.push(request);
    try {
      const a = (await endpoint.answer(body, request)) ?? {};
      if (a.delay) await sleep(a.delay);
      const text = a.raw ?? (a.body === undefined ? "" : JSON.stringify(a.body));
      res.writeHead(a.status ?? 200, { "content-type": a.contentType ?? "application/json" });
      res.end(text);
    } finally {
      request.ended = performance.now();
    }
  });
  await new Promise((resolve) => endpoint.server.listen(0, "127.0.0.1", resolve));
  endpoint.url = `http://127.0.0.1:${endpoint.server.address().port}/graphql`;
  endpoint.reset = () => {
    endpoint.requests = [];
  };
  /** Most of the kept requests matching `pick` in progress at one time. */
  endpoint.maxOverlap = (pick) => {
    const spans = endpoint.requests.filter(pick);
    return Math.max(0, ...spans.map((a) => spans.filter((b) => b.started <= a.started && (b.ended ?? Infinity) > a.started).length));
  };
  endpoint.close = () => {
    endpoint.server.closeAllConnections();
    return new Promise((resolve) => endpoint.server.close(resolve));
  };
  return endpoint;
}

const sub = (triggers, digest, more = {}) => ({ switchboard: { subscription: { triggers, ...(digest ? { digest } : {}) } }, ...more });
const isTrigger = (body) => body?.extensions?.switchboard?.trigger != null;

describe("against a scripted endpoint", { timeout: 120_000 }, () => {
  let endpoint, gateway;
  before(async () => {
    endpoint = await scriptedEndpoint();
    gateway = await startGateway([
      "--graphql-endpoint", endpoint.url,
      "--graphql-timeout", "500ms",
      "--origin-secret", SECRET,
      "--forward-header", "x-tenant",
    ]);
  });
  after(async () => {
    await gateway?.kill();
    await endpoint?.close();
  });
  beforeEach(() => endpoint.reset());

  test("the request: POST, JSON, the operation as sent, the gateway's extensions, signed", { timeout: 10_000 }, async () => {
    endpoint.answer = () => ({ body: { data: { v: 1 } } });
    const raw = await Raw.open(gateway.wsUrl, ["graphql-transport-ws"], { headers: { "x-tenant": "acme" } });
    raw.send({ type: "connection_init" });
    await raw.expect("connection_ack");
    const payload = { query: "query Q($a: Int) { v }", variables: { a: 1 }, operationName: "Q", extensions: { mine: [1] } };
    raw.send({ id: "1", type: "subscribe", payload });
    assert.deepEqual((await raw.expect("next", "1")).payload, { data: { v: 1 } });
    await raw.expect("complete", "1");
    const [request] = endpoint.requests;
    assert.equal(request.method, "POST");
    assert.match(request.headers["content-type"], /^application\/json/);
    assert.equal(request.body.query, payload.query);
    assert.deepEqual(request.body.variables, payload.variables);
    assert.equal(request.body.operationName, "Q");
    assert.deepEqual(request.body.extensions.mine, [1]);
    const sb = request.body.extensions.switchboard;
    assert.match(sb.connection_id, /^[^.]+\..+/);
    assert.equal(sb.trigger ?? null, null);
    assert.equal(request.headers["switchboard-connection-id"], sb.connection_id);
    assert.equal(request.headers["x-tenant"], "acme", "--forward-header headers go along");
    // Signed as the webhooks are: v1=HMAC-SHA256(secret, "<timestamp>.<body>").
    const ts = request.headers["x-switchboard-timestamp"];
    const sig = request.headers["x-switchboard-signature"];
    assert.match(ts ?? "", /^[0-9]+$/);
    assert.match(sig ?? "", /^v1=[0-9a-f]{64}$/);
    const want = createHmac("sha256", SECRET).update(`${ts}.`).update(request.raw).digest();
    assert.ok(timingSafeEqual(Buffer.from(sig.slice(3), "hex"), want), "the signature does not verify");
    raw.close();
  });

  test("extensions other than switchboard reach the client", { timeout: 10_000 }, async () => {
    endpoint.answer = (body) =>
      body.query.startsWith("subscription")
        ? { body: { data: { v: 2 }, extensions: sub(["ext"], "ext-digest", { cost: 3 }) } }
        : { body: { data: { v: 1 }, extensions: { cost: 1 } } };
    const raw = await modern(gateway.wsUrl);
    raw.send({ id: "q", type: "subscribe", payload: { query: "{ v }" } });
    assert.deepEqual((await raw.expect("next", "q")).payload, { data: { v: 1 }, extensions: { cost: 1 } });
    await raw.expect("complete", "q");
    raw.send({ id: "s", type: "subscribe", payload: { query: "subscription { v }" } });
    assert.deepEqual((await raw.expect("next", "s")).payload, { data: { v: 2 }, extensions: { cost: 3 } });
    raw.close();
  });

  test("data: null with the extension: no initial result, the first trigger brings one", { timeout: 10_000 }, async () => {
    endpoint.answer = (body) => ({
      body: { data: isTrigger(body) ? { v: 7 } : null, extensions: sub(["late"], "late-digest") },
    });
    const raw = await modern(gateway.wsUrl);
    raw.send({ id: "s", type: "subscribe", payload: { query: "subscription { v }" } });
    await raw.quiet(400);
    await gateway.api.trigger("late");
    assert.deepEqual((await raw.expect("next", "s")).payload, { data: { v: 7 } });
    raw.close();
  });

  test("errors without data (any status) are an error; errors with data are a result", { timeout: 10_000 }, async () => {
    const errors = [{ message: "nope", extensions: { code: "BAD_USER_INPUT" } }];
    const raw = await modern(gateway.wsUrl);
    for (const status of [200, 400, 500]) {
      endpoint.answer = () => ({ status, body: { errors } });
      raw.send({ id: `e${status}`, type: "subscribe", payload: { query: "{ v }" } });
      const error = await raw.expect("error", `e${status}`);
      assert.deepEqual(error.payload, errors, `status ${status}`);
    }
    endpoint.answer = () => ({ body: { data: { v: null }, errors } });
    raw.send({ id: "partial", type: "subscribe", payload: { query: "{ v }" } });
    assert.deepEqual((await raw.expect("next", "partial")).payload, { data: { v: null }, errors });
    await raw.expect("complete", "partial");
    raw.close();
  });

  test("not GraphQL, a bare failure, or too slow: origin_unavailable", { timeout: 15_000 }, async () => {
    const raw = await modern(gateway.wsUrl);
    const answers = {
      "a 500 without a body": { status: 500 },
      "a 502 with HTML": { status: 502, raw: "<html>bad gateway</html>", contentType: "text/html" },
      "a 200 that is not JSON": { raw: "hello" },
      "a 200 that is JSON but not GraphQL": { body: { hello: "world" } },
      "an answer after --graphql-timeout": { body: { data: { v: 1 } }, delay: 2_000 },
    };
    for (const [what, answer] of Object.entries(answers)) {
      endpoint.answer = () => answer;
      const started = Date.now();
      raw.send({ id: what, type: "subscribe", payload: { query: "{ v }" } });
      const error = await raw.expect("error", what, 5_000);
      assert.equal(error.payload.length, 1, `${what}: ${JSON.stringify(error)}`);
      assert.equal(error.payload[0].extensions?.code, "origin_unavailable", `${what}: ${JSON.stringify(error)}`);
      if (answer.delay) assert.ok(Date.now() - started < 1_800, `${what}: took ${Date.now() - started} ms`);
    }
    raw.close();
  });

  test("a failed re-execution sends one origin_unavailable error as a result; the subscription goes on", { timeout: 10_000 }, async () => {
    let fail = false;
    let version = 0;
    endpoint.answer = () => (fail ? { status: 503 } : { body: { data: { v: ++version }, extensions: sub(["flaky"], "flaky-digest") } });
    const raw = await modern(gateway.wsUrl);
    raw.send({ id: "s", type: "subscribe", payload: { query: "subscription { v }" } });
    assert.deepEqual((await raw.expect("next", "s")).payload, { data: { v: 1 } });
    fail = true;
    await gateway.api.trigger("flaky");
    const failed = await raw.expect("next", "s");
    assert.equal(failed.payload.errors?.length, 1, JSON.stringify(failed));
    assert.equal(failed.payload.errors[0].extensions?.code, "origin_unavailable");
    fail = false;
    await gateway.api.trigger("flaky");
    assert.deepEqual((await raw.expect("next", "s")).payload, { data: { v: 2 } });
    raw.close();
  });

  test("without a digest, subscribers with the same query and variables share one execution", { timeout: 10_000 }, async () => {
    endpoint.answer = (body) => ({ body: { data: { room: body.variables?.room ?? null }, extensions: sub(["nodigest"]) } });
    const query = "subscription($room: String) { room }";
    const a = await modern(gateway.wsUrl);
    const b = await modern(gateway.wsUrl);
    const c = await modern(gateway.wsUrl);
    a.send({ id: "s", type: "subscribe", payload: { query, variables: { room: "x" } } });
    b.send({ id: "s", type: "subscribe", payload: { query, variables: { room: "x" } } });
    c.send({ id: "s", type: "subscribe", payload: { query, variables: { room: "y" } } });
    for (const r of [a, b, c]) await r.expect("next", "s");
    endpoint.reset();
    await gateway.api.trigger("nodigest");
    assert.deepEqual((await a.expect("next", "s")).payload, { data: { room: "x" } });
    assert.deepEqual((await b.expect("next", "s")).payload, { data: { room: "x" } });
    assert.deepEqual((await c.expect("next", "s")).payload, { data: { room: "y" } });
    await sleep(200);
    const rooms = endpoint.requests.map((r) => r.body.variables.room).sort();
    assert.deepEqual(rooms, ["x", "y"], "one re-execution per distinct input");
    for (const r of [a, b, c]) r.close();
  });

  test("a re-execution carries the first subscriber's headers, no connection id", { timeout: 10_000 }, async () => {
    endpoint.answer = () => ({ body: { data: { v: 1 }, extensions: sub(["hdr"], "hdr-digest") } });
    const first = await Raw.open(gateway.wsUrl, ["graphql-transport-ws"], { headers: { "x-tenant": "first" } });
    first.send({ type: "connection_init" });
    await first.expect("connection_ack");
    first.send({ id: "s", type: "subscribe", payload: { query: "subscription { v }" } });
    await first.expect("next", "s");
    const second = await Raw.open(gateway.wsUrl, ["graphql-transport-ws"], { headers: { "x-tenant": "second" } });
    second.send({ type: "connection_init" });
    await second.expect("connection_ack");
    second.send({ id: "s", type: "subscribe", payload: { query: "subscription { v }" } });
    await second.expect("next", "s");
    endpoint.reset();
    await gateway.api.trigger("hdr");
    await first.expect("next", "s");
    await second.expect("next", "s");
    assert.equal(endpoint.requests.length, 1);
    const [rerun] = endpoint.requests;
    assert.equal(rerun.headers["x-tenant"], "first");
    assert.equal(rerun.headers["switchboard-connection-id"], undefined);
    assert.equal(rerun.body.extensions.switchboard.connection_id, undefined);
    assert.equal(rerun.body.extensions.switchboard.trigger, "hdr");
    first.close();
    second.close();
  });

  test("triggers during a re-execution: run once more after it, never two at once, newest state last", { timeout: 15_000 }, async () => {
    let version = 0;
    endpoint.answer = (body) => ({
      body: { data: { v: ++version }, extensions: sub(["busy"], "busy-digest") },
      delay: isTrigger(body) ? 300 : 0,
    });
    const raw = await modern(gateway.wsUrl);
    raw.send({ id: "s", type: "subscribe", payload: { query: "subscription { v }" } });
    await raw.expect("next", "s");
    endpoint.reset();
    await gateway.api.trigger("busy");
    await sleep(50); // the first re-execution is under way
    for (let i = 0; i < 4; i++) await gateway.api.trigger("busy");
    const busy = (r) => r.body.extensions?.switchboard?.trigger === "busy";
    await until("the re-executions to settle", () => endpoint.requests.filter(busy).length >= 2 && endpoint.requests.every((r) => r.ended), 5_000);
    await sleep(500);
    assert.equal(endpoint.maxOverlap(busy), 1, "two re-executions of one digest at once");
    assert.equal(endpoint.requests.filter(busy).length, 2, "the triggers that came during the first run are one more run");
    const results = [];
    while (raw.queue.length) results.push((await raw.next()).payload.data.v);
    assert.deepEqual(results, [...results].sort((x, y) => x - y), "results in order");
    assert.equal(results.at(-1), version, "the newest state last");
    raw.close();
  });

  test("POST /v1/graphql/triggers refuses what is not 1 to 32 keys of 1 to 256 bytes", { timeout: 10_000 }, async () => {
    for (const body of [
      {},
      { triggers: [] },
      { triggers: "k" },
      { triggers: [1] },
      { triggers: [""] },
      { triggers: ["x".repeat(257)] },
      { triggers: Array.from({ length: 33 }, (_, i) => `k${i}`) },
    ]) {
      const r = await gateway.api.post("/v1/graphql/triggers", body);
      assert.equal(r.status, 400, `${JSON.stringify(body).slice(0, 80)}: ${r.status} ${JSON.stringify(r.body)}`);
      assert.equal(r.body.code, "invalid_body");
    }
    const ok = await gateway.api.post("/v1/graphql/triggers", { triggers: ["x".repeat(256), ...Array.from({ length: 31 }, (_, i) => `k${i}`)] });
    assert.equal(ok.status, 202, JSON.stringify(ok.body));
    assert.deepEqual(ok.body, { nodes: 1, failed_nodes: [] });
  });
});

describe("a connect answer with messages and channels", { timeout: 30_000 }, () => {
  let endpoint, webhook, gateway;
  before(async () => {
    endpoint = await scriptedEndpoint();
    endpoint.answer = () => ({ body: { data: { v: 1 } } });
    webhook = createServer(async (req, res) => {
      for await (const _ of req);
      res.writeHead(200, { "content-type": "application/json" });
      res.end(JSON.stringify({
        user_id: "u1",
        metadata: { plan: "pro" },
        messages: [{ text: "welcome" }],
        channels: ["chat:lobby"],
        ack_payload: ["any", "json"],
      }));
    });
    await new Promise((resolve) => webhook.listen(0, "127.0.0.1", resolve));
    gateway = await startGateway([
      "--graphql-endpoint", endpoint.url,
      "--origin", `http://127.0.0.1:${webhook.address().port}/events`,
      "--namespace", "chat",
    ]);
  });
  after(async () => {
    await gateway?.kill();
    webhook?.closeAllConnections();
    webhook?.close();
    await endpoint?.close();
  });

  test("the ack carries ack_payload; messages and channels are ignored; user_id and metadata are kept", { timeout: 10_000 }, async () => {
    const raw = await modern(gateway.wsUrl);
    assert.deepEqual(raw.ack.payload, ["any", "json"]);
    await raw.quiet(300); // no "welcome"
    const published = await gateway.api.post("/v1/channels/chat:lobby/messages", { text: "to the channel" });
    assert.equal(published.status, 200, JSON.stringify(published.body));
    await raw.quiet(300);
    const [info] = await gateway.api.connectionsOf("u1");
    assert.deepEqual(info.metadata, { plan: "pro" });
    assert.deepEqual(info.channels ?? [], []);
    raw.send({ id: "q", type: "subscribe", payload: { query: "{ v }" } });
    await raw.expect("next", "q");
    const sb = endpoint.requests.at(-1).body.extensions.switchboard;
    assert.equal(sb.user_id, "u1");
    assert.deepEqual(sb.metadata, { plan: "pro" });
    assert.equal(endpoint.requests.at(-1).headers["switchboard-user-id"], "u1");
    raw.close();
  });
});
