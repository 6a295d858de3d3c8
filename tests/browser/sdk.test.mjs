// The TypeScript SDK in a real browser: headless Chromium loads the built
// package (clients/typescript/dist) as ES modules, connects with the
// browser's own WebSocket through a TCP proxy the test can cut, and keeps
// its session: the same client id, every direct message exactly once and in
// order, and the channel messages published while the link was down.
//
// Then the same with WebSocket blocked at a proxy (the SDK falls back to
// SSE), and with event streams buffered there too (it falls back to
// long-polling).
//
// Needs: target/release/switchboard, clients/typescript/dist (npm run build
// there) and Chromium. Run: npm ci && node --test

import { test } from "node:test";
import assert from "node:assert/strict";
import { createServer as createHttpServer } from "node:http";
import { existsSync, readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import path from "node:path";
import { chromiumPath, cuttableProxy, freePort, launchBrowser, releaseBin, spawnGateway, waitForHttp } from "./helpers.mjs";

const dist = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../clients/typescript/dist");
const gatewayBin = releaseBin("switchboard");

/** Serves the page and the SDK's modules. */
function pageServer(port) {
  const server = createHttpServer((req, res) => {
    if (req.url === "/") {
      res.writeHead(200, { "content-type": "text/html" });
      res.end("<!doctype html><title>sdk</title>");
      return;
    }
    const file = path.join(dist, path.normalize(req.url.replace(/^\/sdk\//, "")));
    if (!req.url.startsWith("/sdk/") || !file.startsWith(dist) || !existsSync(file)) {
      res.writeHead(404).end();
      return;
    }
    res.writeHead(200, { "content-type": "text/javascript" });
    res.end(readFileSync(file));
  });
  return new Promise((resolve) => server.listen(port, "127.0.0.1", () => resolve(server)));
}

async function api(control, method, route, body) {
  const r = await fetch(`http://127.0.0.1:${control}${route}`, {
    method,
    headers: { "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  return { status: r.status, json: await r.json().catch(() => null) };
}

test("the SDK keeps its session in a browser across cut connections", { timeout: 90_000 }, async () => {
  assert.ok(existsSync(gatewayBin), `${gatewayBin} missing: cargo build --release -p switchboard`);
  assert.ok(existsSync(path.join(dist, "index.js")), `${dist} missing: npm run build in clients/typescript`);
  assert.ok(existsSync(chromiumPath), `${chromiumPath} missing: apt-get install chromium`);
  const [ws, control, web, via] = [await freePort(), await freePort(), await freePort(), await freePort()];
  const gateway = spawnGateway(ws, control, [
    "--namespace", "chat:history-size=1000,subscribe,publish",
    "--ping-interval", "1s",
  ]);
  const pages = await pageServer(web);
  const link = await cuttableProxy(via, ws);
  const browser = await launchBrowser();
  try {
    await waitForHttp(`http://127.0.0.1:${control}/readyz`, 10_000);
    const page = await browser.newPage();
    page.on("pageerror", (e) => { throw e; });
    await page.goto(`http://127.0.0.1:${web}/`);
    const clientId = await page.evaluate(async (url) => {
      const { SwitchboardClient } = await import("/sdk/index.js");
      const client = new SwitchboardClient(url);
      window.seen = { directs: [], messages: [], events: [] };
      client.on("direct", (m) => window.seen.directs.push([m.seq, m.data]));
      for (const name of ["resumed", "restarted"]) {
        client.on(name, (e) => window.seen.events.push([name, e.clientId]));
      }
      const { clientId } = await client.connect();
      await client.subscribe("chat:room", {
        message: (m) => window.seen.messages.push([m.offset, m.data]),
      });
      window.client = client;
      return clientId;
    }, `ws://127.0.0.1:${via}/`);

    const N = 60;
    let cuts = 0;
    for (let i = 1; i <= N; i++) {
      if (i % 15 === 0) {
        // Cut a live link: the previous cut's resume is done.
        await page.waitForFunction(
          (k) => window.seen.events.length >= k && window.client.state === "connected",
          cuts,
          { timeout: 15_000 },
        );
        link.cut();
        cuts += 1;
      }
      const direct = await api(control, "POST", `/v1/connections/${clientId}/messages`, { text: `d${i}` });
      assert.equal(direct.status, 200, JSON.stringify(direct.json));
      assert.ok(["delivered", "queued"].includes(direct.json.status), JSON.stringify(direct.json));
      const published = await api(control, "POST", "/v1/channels/chat:room/messages", { text: `m${i}` });
      assert.equal(published.status, 200, JSON.stringify(published.json));
      await new Promise((r) => setTimeout(r, 20));
    }
    // Four cuts, each followed by a resume.
    await page.waitForFunction(
      (n) => window.seen.directs.length >= n && window.seen.messages.length >= n && window.seen.events.length >= 4,
      N,
      { timeout: 30_000 },
    );
    const seen = await page.evaluate(() => window.seen);
    assert.deepEqual(seen.directs, Array.from({ length: N }, (_, i) => [i + 1, `d${i + 1}`]));
    assert.deepEqual(seen.messages.map(([, d]) => d), Array.from({ length: N }, (_, i) => `m${i + 1}`));
    const offsets = seen.messages.map(([o]) => o);
    assert.deepEqual(offsets, [...offsets].sort((a, b) => a - b), "in offset order");
    assert.ok(seen.events.every(([name, id]) => name === "resumed" && id === clientId), JSON.stringify(seen.events));
    await page.evaluate(() => window.client.close());
  } finally {
    await browser.close();
    link.server.close();
    pages.close();
    gateway.kill("SIGTERM");
  }
});

for (const [name, blocked, expected] of [
  ["falls back to SSE when WebSocket is blocked", { refuseUpgrades: true }, "sse"],
  [
    "falls back to long-polling when WebSocket is blocked and streams are buffered",
    { refuseUpgrades: true, bufferEventStreams: true },
    "long-poll",
  ],
]) {
  test(`the SDK in a browser ${name}, across cut connections`, { timeout: 90_000 }, async () => {
    assert.ok(existsSync(gatewayBin), `${gatewayBin} missing: cargo build --release -p switchboard`);
    assert.ok(existsSync(path.join(dist, "index.js")), `${dist} missing: npm run build in clients/typescript`);
    assert.ok(existsSync(chromiumPath), `${chromiumPath} missing: apt-get install chromium`);
    const [listen, control, web, via] = [await freePort(), await freePort(), await freePort(), await freePort()];
    const gateway = spawnGateway(listen, control, [
      "--namespace", "chat:history-size=1000,subscribe,publish",
      "--ping-interval", "1s",
      "--poll-timeout", "2s",
    ]);
    const pages = await pageServer(web);
    const link = await cuttableProxy(via, listen, blocked);
    const browser = await launchBrowser();
    try {
      await waitForHttp(`http://127.0.0.1:${control}/readyz`, 10_000);
      const page = await browser.newPage();
      page.on("pageerror", (e) => {
        throw e;
      });
      await page.goto(`http://127.0.0.1:${web}/`);
      const clientId = await page.evaluate(
        async (url) => {
          const { SwitchboardClient } = await import("/sdk/index.js");
          const client = new SwitchboardClient(url, { fallbackTimeoutMs: 3000 });
          window.seen = { directs: [], messages: [], events: [] };
          client.on("direct", (m) => window.seen.directs.push([m.seq, m.data]));
          for (const name of ["resumed", "restarted"]) {
            client.on(name, (e) => window.seen.events.push([name, e.clientId]));
          }
          const { clientId } = await client.connect();
          await client.subscribe("chat:room", {
            message: (m) => window.seen.messages.push([m.offset, m.data]),
          });
          window.client = client;
          return clientId;
        },
        `ws://127.0.0.1:${via}/`,
      );
      assert.equal(await page.evaluate(() => window.client.transport), expected);

      const N = 40;
      let cuts = 0;
      for (let i = 1; i <= N; i++) {
        if (i % 10 === 0) {
          // A cut SSE stream is a lost connection, resumed; a cut poll is
          // polled again (the same cursor), with no reconnect to wait for.
          await page.waitForFunction(
            ([k, polling]) => (polling || window.seen.events.length >= k) && window.client.state === "connected",
            [cuts, expected === "long-poll"],
            { timeout: 20_000 },
          );
          link.cut();
          cuts += 1;
        }
        const direct = await api(control, "POST", `/v1/connections/${clientId}/messages`, { text: `d${i}` });
        assert.equal(direct.status, 200, JSON.stringify(direct.json));
        const published = await api(control, "POST", "/v1/channels/chat:room/messages", { text: `m${i}` });
        assert.equal(published.status, 200, JSON.stringify(published.json));
        await new Promise((r) => setTimeout(r, 20));
      }
      await page.waitForFunction(
        (n) => window.seen.directs.length >= n && window.seen.messages.length >= n,
        N,
        { timeout: 30_000 },
      );
      const seen = await page.evaluate(() => window.seen);
      assert.deepEqual(seen.directs, Array.from({ length: N }, (_, i) => [i + 1, `d${i + 1}`]));
      assert.deepEqual(seen.messages.map(([, d]) => d), Array.from({ length: N }, (_, i) => `m${i + 1}`));
      assert.ok(seen.events.every(([name, id]) => name === "resumed" && id === clientId), JSON.stringify(seen.events));
      assert.equal(await page.evaluate(() => window.client.transport), expected);
      await page.evaluate(() => window.client.close());
    } finally {
      await browser.close();
      link.server.close();
      pages.close();
      gateway.kill("SIGTERM");
    }
  });
}
