// The admin page in a real browser: log in (a wrong key refused first), watch
// the live figures move while another page drives traffic, find a
// connection by its user, see its channels, close it with a code the client
// receives, and publish a test message on a channel.
//
// Needs: target/release/switchboard (cargo build --release -p switchboard)
// and Chromium (apt-get install chromium). Run: npm ci && node --test

import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { createServer } from "node:http";
import { existsSync, mkdirSync } from "node:fs";
import path from "node:path";
import { chromiumPath, freePort, launchBrowser, releaseBin, targetDir, waitForHttp } from "./helpers.mjs";

const gatewayBin = releaseBin("switchboard");
const API_KEY = "admin-test-key-0123456789";
const JWT_SECRET = "a-secret-of-at-least-32-bytes-for-hs256!";

/** An HS256 client token for `sub`, valid for an hour. */
function token(sub) {
  const b64 = (v) => Buffer.from(JSON.stringify(v)).toString("base64url");
  const body = `${b64({ alg: "HS256", typ: "JWT" })}.${b64({ sub, exp: Math.floor(Date.now() / 1000) + 3600 })}`;
  return `${body}.${createHmac("sha256", JWT_SECRET).update(body).digest("base64url")}`;
}

/** The number shown by a figure card of the admin page. */
async function figure(page, name) {
  const text = await page.locator(`[data-figure="${name}"] .v`).textContent();
  return Number(text.replace(/[^0-9.]/g, ""));
}

/** Waits until `f()` holds, for at most `ms`. */
async function until(what, f, ms = 10_000) {
  const deadline = Date.now() + ms;
  for (;;) {
    if (await f()) return;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

test("the admin page shows live figures, finds and closes a connection, publishes", { timeout: 90_000 }, async () => {
  assert.ok(existsSync(gatewayBin), `${gatewayBin} missing: cargo build --release -p switchboard`);
  assert.ok(existsSync(chromiumPath), `${chromiumPath} missing: apt-get install chromium`);
  // An origin that accepts everything, a little slowly, so the page has an
  // origin latency to show.
  const origin = createServer((req, res) => {
    req.resume();
    req.on("end", () =>
      setTimeout(() => {
        res.writeHead(200, { "content-type": "application/json" });
        res.end("{}");
      }, 5),
    );
  });
  await new Promise((resolve) => origin.listen(0, "127.0.0.1", resolve));
  const [ws, control] = [await freePort(), await freePort()];
  const gateway = spawn(
    gatewayBin,
    [
      "serve",
      "--listen", `127.0.0.1:${ws}`,
      "--control-listen", `127.0.0.1:${control}`,
      "--api-key", API_KEY,
      "--origin", `http://127.0.0.1:${origin.address().port}/events`,
      "--jwt-secret", JWT_SECRET,
      "--namespace", "chat:presence,history-size=20",
      "--log-level", "warn",
    ],
    { stdio: ["ignore", "inherit", "inherit"] },
  );
  const browser = await launchBrowser();
  const controlUrl = `http://127.0.0.1:${control}`;
  const api = (method, p) => fetch(`${controlUrl}${p}`, { method, headers: { authorization: `Bearer ${API_KEY}` } });
  try {
    await waitForHttp(`${controlUrl}/healthz`, 10_000);

    // Traffic: a client of user alice sends a message every 20 ms until closed.
    const client = await browser.newPage();
    await client.goto(`${controlUrl}/healthz`);
    await client.evaluate(
      ([url]) =>
        new Promise((resolve, reject) => {
          const s = new WebSocket(url);
          window.wsClosed = new Promise((done) => s.addEventListener("close", (e) => done({ code: e.code, reason: e.reason })));
          s.addEventListener("open", () => {
            window.sending = setInterval(() => s.readyState === 1 && s.send("hello"), 20);
            resolve();
          });
          s.addEventListener("error", () => reject(new Error("websocket failed")));
        }),
      [`ws://127.0.0.1:${ws}/?token=${token("alice")}`],
    );
    const found = await (await api("GET", "/v1/connections?user_id=alice")).json();
    assert.equal(found.connections.length, 1, JSON.stringify(found));
    const id = found.connections[0].id;
    assert.equal((await api("PUT", `/v1/connections/${id}/channels/chat%3Aroom`)).status, 200);

    // Log in: a wrong key is refused, the right one opens the page.
    const admin = await browser.newPage();
    await admin.goto(`${controlUrl}/admin`);
    await admin.fill("#key", "not-the-key");
    await admin.click("#login button[type=submit]");
    await admin.locator("#login-error", { hasText: "refused" }).waitFor({ timeout: 10_000 });
    assert.equal(await admin.evaluate(() => sessionStorage.getItem("switchboard-admin-key")), null);
    await admin.fill("#key", API_KEY);
    await admin.click("#login button[type=submit]");
    await admin.locator("#app").waitFor({ state: "visible", timeout: 10_000 });
    await admin.locator("#who", { hasText: "node " }).waitFor({ timeout: 10_000 });
    assert.equal(await admin.locator("#conn-close").isVisible(), false, "nothing to close yet");

    // Live numbers: one connection, messages flowing in.
    await until("one connection and messages in/s above zero", async () =>
      (await figure(admin, "connections (WebSocket)")) === 1 && (await figure(admin, "messages in/s")) > 0);
    const rate = await figure(admin, "messages in/s");
    assert.ok(rate > 5 && rate < 200, `messages in/s ${rate}`);
    assert.equal(await figure(admin, "subscriptions"), 1);
    const latency = admin.locator("#nodes tbody tr td").nth(7);
    await until("an origin latency", async () => /^[0-9.]+ ms$/.test(await latency.textContent()));
    const ms = Number((await latency.textContent()).replace(" ms", ""));
    assert.ok(ms >= 4 && ms < 1000, `origin latency ${ms} ms`);
    // For a person to look at (not an assertion).
    mkdirSync(path.join(targetDir, "browser"), { recursive: true });
    await admin.screenshot({ path: path.join(targetDir, "browser", "admin.png"), fullPage: true });

    // Find it by its user, see its channel, close it with a code.
    await admin.fill("#conn-user", "alice");
    await admin.click("#conn-find button[type=submit]");
    const info = admin.locator("#conn-info");
    await info.locator("dd", { hasText: id }).waitFor({ timeout: 10_000 });
    await info.locator("dd", { hasText: "chat:room" }).waitFor({ timeout: 10_000 });
    await admin.fill("#close-code", "4321");
    await admin.fill("#close-reason", "closed from the admin page");
    await admin.click("#conn-close button[type=submit]");
    await admin.locator("#conn-result", { hasText: `Closing ${id}` }).waitFor({ timeout: 10_000 });
    const closed = await client.evaluate(() => window.wsClosed);
    assert.deepEqual(closed, { code: 4321, reason: "closed from the admin page" });
    await until("no connection left", async () => (await figure(admin, "connections (WebSocket)")) === 0);

    // A channel: publish a test message, see it in the history.
    await admin.fill("#chan-name", "chat:room");
    await admin.click("#chan-find button[type=submit]");
    await admin.locator("#chan-publish").waitFor({ state: "visible", timeout: 10_000 });
    await admin.fill("#chan-text", "test message from the admin page");
    await admin.click("#chan-publish button[type=submit]");
    await admin.locator("#chan-result", { hasText: "Published at offset 1" }).waitFor({ timeout: 10_000 });
    await admin.locator("#chan-history td", { hasText: "test message from the admin page" }).waitFor({ timeout: 10_000 });

    // Log out: the key is forgotten and the data is gone from the page.
    await admin.click("#logout");
    await admin.locator("#login-view").waitFor({ state: "visible", timeout: 10_000 });
    assert.equal(await admin.evaluate(() => sessionStorage.getItem("switchboard-admin-key")), null);
  } finally {
    await browser.close();
    gateway.kill("SIGTERM");
    origin.close();
  }
});
