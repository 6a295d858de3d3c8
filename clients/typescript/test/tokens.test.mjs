// Tokens: getToken before every connection attempt (the `token` query
// parameter), the resume query parameters, and the refresh flow on a
// gateway that checks HS256 client tokens.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { createHmac } from "node:crypto";
import { startGateway, startProxy, newClient, waitFor, sendDirect } from "../testlib/helpers.mjs";

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
