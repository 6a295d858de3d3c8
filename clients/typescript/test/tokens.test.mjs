// Tokens: getToken before every connection attempt (the `token` query
// parameter), the resume query parameters, and the refresh flow on a
// gateway that checks HS256 client tokens.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { createHmac } from "node:crypto";
import { startGateway, startProxy, newClient, waitFor, sendDirect, api } from "../testlib/helpers.mjs";

const secret = "a-test-secret-of-at-least-32-bytes-long";

function jwt(claims) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  const body = `${b64({ alg: "HS256", typ: "JWT" })}.${b64(claims)}`;
  return `${body}.${createHmac("sha256", secret).update(body).digest("base64url")}`;
}

let gw;
before(async () => {
  // A token expiring within 50 s gets a `refresh` push at once.
  gw = await startGateway(["--jwt-secret", secret, "--token-refresh-notice", "50s"]);
});
after(async () => {
  await gw?.stop();
});

test("getToken is called before each connection and on a refresh push; resumes carry resume= and received=", async () => {
  const proxy = await startProxy(gw.port);
  const issued = [];
  const getToken = async () => {
    // The first token expires soon (refresh push at once), the later ones late.
    const exp = Math.floor(Date.now() / 1000) + (issued.length === 0 ? 40 : 600);
    const t = jwt({ sub: "ann", exp });
    issued.push(t);
    return t;
  };
  const { client, events } = newClient(proxy.url, { getToken });
  const expiring = [];
  const refreshFailed = [];
  client.on("tokenExpiring", (e) => expiring.push(e));
  client.on("tokenRefreshFailed", (e) => refreshFailed.push(e));
  const got = [];
  client.on("direct", (m) => got.push(m));
  try {
    const { clientId } = await client.connect();
    assert.match(proxy.heads[0], new RegExp(`token=${issued[0]}`));
    assert.doesNotMatch(proxy.heads[0], /resume=/);
    // The refresh push: getToken is asked again, and its token sent with `refresh`.
    await waitFor(() => expiring.length === 1 && issued.length === 2, 5000, "refresh");
    assert.ok(expiring[0].expiresAtMs > Date.now());
    await client.ping(); // the refresh command went before this one: its reply came first
    assert.deepEqual(refreshFailed, []);

    await sendDirect(gw, clientId, "x");
    await sendDirect(gw, clientId, "y");
    await waitFor(() => got.length === 2, 5000, "directs");
    proxy.cut();
    await waitFor(() => events.some((e) => e.name === "resumed"), 10_000, "resumed");
    assert.equal(issued.length, 3);
    const head = proxy.heads.at(-1);
    assert.match(head, new RegExp(`token=${issued[2]}`));
    assert.match(head, /[?&]resume=[A-Za-z0-9_.-]+/);
    assert.match(head, /[?&]received=2(\s|&|$)/);
    assert.equal(client.clientId, clientId);
  } finally {
    await client.close();
    await proxy.close();
  }
});

test("a refused handshake (401) is terminal: `failed`, state closed, commands rejected", async () => {
  const { client, events } = newClient(`ws://127.0.0.1:${gw.port}/ws`, { token: "not-a-jwt" });
  await assert.rejects(client.connect(), (e) => e.code === "refused" && e.status === 401);
  assert.equal(client.state, "closed");
  assert.ok(events.some((e) => e.name === "failed"));
  await assert.rejects(client.ping(), (e) => e.code === "refused");
});

test("tokenIn: \"frame\": the token goes in an `authenticate` first frame, never in the URL; resumes and a refused resume work", async () => {
  const proxy = await startProxy(gw.port);
  const token = jwt({ sub: "bob", exp: Math.floor(Date.now() / 1000) + 600 });
  const { client, events } = newClient(proxy.url, { token, tokenIn: "frame" });
  const got = [];
  client.on("direct", (m) => got.push(m));
  try {
    const { clientId } = await client.connect();
    assert.equal(client.transport, "websocket");
    assert.doesNotMatch(proxy.heads[0], /token=/);
    const info = await api(gw, "GET", `/v1/connections/${clientId}`);
    assert.equal(info.body.user_id, "bob", JSON.stringify(info.body));
    await sendDirect(gw, clientId, "one");
    await waitFor(() => got.length === 1, 5000, "first direct");

    // A resume needs no token: the `authenticate` sent anyway is answered bad_command, which nothing waits for.
    proxy.cut();
    await waitFor(() => events.some((e) => e.name === "resumed"), 10_000, "resumed");
    assert.match(proxy.heads.at(-1), /[?&]resume=/);
    assert.doesNotMatch(proxy.heads.at(-1), /token=/);
    await sendDirect(gw, clientId, "two");
    await waitFor(() => got.length === 2, 5000, "second direct");
    await client.ping();

    // A refused resume: the gateway waits for `authenticate`, which came first.
    proxy.hold();
    await waitFor(async () => (await api(gw, "GET", `/v1/connections/${clientId}`)).body?.suspended === true, 5000, "suspended");
    await api(gw, "DELETE", `/v1/connections/${clientId}`);
    proxy.release();
    const restarted = await waitFor(() => events.find((e) => e.name === "restarted"), 10_000, "restarted");
    assert.equal(restarted.error?.code, "session_closed");
    const again = await api(gw, "GET", `/v1/connections/${restarted.clientId}`);
    assert.equal(again.body.user_id, "bob");
    assert.deepEqual(got.map((m) => m.data), ["one", "two"]);
  } finally {
    await client.close();
    await proxy.close();
  }
});

test("tokenIn: \"frame\" with a refused token: the gateway's 4005 is terminal", async () => {
  const { client, events } = newClient(`ws://127.0.0.1:${gw.port}/ws`, { token: "not-a-jwt", tokenIn: "frame" });
  await assert.rejects(client.connect(), (e) => e.code === "refused" && /4005/.test(e.message) && /token_malformed/.test(e.message));
  assert.equal(client.state, "closed");
  assert.ok(events.some((e) => e.name === "failed"));
  assert.ok(!events.some((e) => e.name === "connectFailed"));
});
