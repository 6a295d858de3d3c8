// A plain EventSource in a real browser (docs/fallbacks.md): a page on
// another origin opens `new EventSource(url?channel=…)` and nothing else.
// The test cuts the connection again and again through a TCP proxy; the
// browser reconnects by itself, sends Last-Event-ID, and the page ends with
// every channel message exactly once and in order. A stream whose position
// cannot be recovered gets a `recovery-failed` event.
//
// Needs: target/release/switchboard and Chromium. Run: npm ci && node --test

import { test } from "node:test";
import assert from "node:assert/strict";
import { createServer as createHttpServer } from "node:http";
import { existsSync } from "node:fs";
import { chromiumPath, cuttableProxy, freePort, launchBrowser, releaseBin, spawnGateway, waitForHttp } from "./helpers.mjs";

const gatewayBin = releaseBin("switchboard");

async function publish(control, channel, text) {
  const r = await fetch(`http://127.0.0.1:${control}/v1/channels/${channel}/messages`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ text }),
  });
  assert.equal(r.status, 200, await r.text());
}

test("a plain EventSource recovers exactly the missed messages by itself", { timeout: 90_000 }, async () => {
  assert.ok(existsSync(gatewayBin), `${gatewayBin} missing: cargo build --release -p switchboard`);
  assert.ok(existsSync(chromiumPath), `${chromiumPath} missing: apt-get install chromium`);
  const [listen, control, web, via] = [await freePort(), await freePort(), await freePort(), await freePort()];
  const gateway = spawnGateway(listen, control, [
    "--namespace", "news:history-size=1000,subscribe",
    "--allowed-origins", `http://127.0.0.1:${web}`,
  ]);
  // The page comes from another origin than the gateway's: CORS applies.
  const pages = createHttpServer((_, res) => {
    res.writeHead(200, { "content-type": "text/html" });
    res.end("<!doctype html><title>feed</title>");
  });
  await new Promise((r) => pages.listen(web, "127.0.0.1", r));
  const link = await cuttableProxy(via, listen);
  const browser = await launchBrowser();
  try {
    await waitForHttp(`http://127.0.0.1:${control}/readyz`, 10_000);
    const page = await browser.newPage();
    page.on("pageerror", (e) => {
      throw e;
    });
    await page.goto(`http://127.0.0.1:${web}/`);
    await page.evaluate((url) => {
      window.seen = { data: [], ids: [], opens: 0, failed: [] };
      const es = new EventSource(url);
      es.onopen = () => window.seen.opens++;
      es.onmessage = (e) => {
        window.seen.data.push(e.data);
        window.seen.ids.push(e.lastEventId);
      };
      es.addEventListener("recovery-failed", (e) => window.seen.failed.push(JSON.parse(e.data)));
      es.addEventListener("subscribed", () => (window.seen.subscribed = true));
      window.es = es;
    }, `http://127.0.0.1:${via}/feed?channel=news%3Alive`);
    await page.waitForFunction(() => window.seen.subscribed === true, null, { timeout: 10_000 });

    const N = 40;
    for (let i = 1; i <= N; i++) {
      if (i % 10 === 0) {
        // Cut a live stream: the previous reconnect is done.
        await page.waitForFunction((k) => window.seen.opens >= k && window.es.readyState === 1, i / 10, {
          timeout: 15_000,
        });
        link.cut();
      }
      await publish(control, "news:live", `m${i}`);
      await new Promise((r) => setTimeout(r, 30));
    }
    await page.waitForFunction((n) => window.seen.data.length >= n, N, { timeout: 30_000 });
    const seen = await page.evaluate(() => window.seen);
    assert.deepEqual(seen.data, Array.from({ length: N }, (_, i) => `m${i + 1}`), "every message once, in order");
    assert.ok(seen.opens >= 5, `the browser reconnected by itself (${seen.opens} opens)`);
    assert.deepEqual(seen.failed, []);
    const offsets = seen.ids.map((id) => Number(id.split(":")[1]));
    assert.deepEqual(offsets, Array.from({ length: N }, (_, i) => i + 1), "ids are the positions");

    // A position the gateway never had: said so, then live.
    await page.evaluate((url) => {
      window.stale = { failed: [], data: [] };
      const es = new EventSource(url);
      es.addEventListener("recovery-failed", (e) => window.stale.failed.push(JSON.parse(e.data)));
      es.onmessage = (e) => window.stale.data.push(e.data);
    }, `http://127.0.0.1:${via}/feed?channel=news%3Alive&last_event_id=gone%3A3`);
    await page.waitForFunction(() => window.stale.failed.length === 1, null, { timeout: 10_000 });
    await publish(control, "news:live", "after");
    await page.waitForFunction(() => window.stale.data.length === 1, null, { timeout: 10_000 });
    const stale = await page.evaluate(() => window.stale);
    assert.equal(stale.failed[0].channel, "news:live");
    assert.equal(stale.failed[0].offset, N);
    assert.deepEqual(stale.data, ["after"]);
  } finally {
    await browser.close();
    link.server.close();
    pages.close();
    gateway.kill("SIGTERM");
  }
});
