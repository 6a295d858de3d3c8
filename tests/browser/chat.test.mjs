// The chat demo in a real browser: headless Chromium pages, phone-sized,
// join with the name field and talk through the gateway; the member list
// follows joins and leaves, and a late joiner gets the earlier messages.
// Proves the page, the gateway's handshake with a browser's WebSocket, the
// origin's webhooks and control API pushes, end to end.
//
// Needs: target/release/chat (cargo build --release -p switchboard-examples)
// and Chromium (apt-get install chromium). Run: npm ci && node --test

import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync, mkdirSync } from "node:fs";
import path from "node:path";
import { chromiumPath, freePort, launchBrowser, releaseBin, targetDir, waitForHttp } from "./helpers.mjs";

const chatBin = releaseBin("chat");

/** Opens the chat page on a phone-sized screen, joins as `name` through the
 * name field, and waits until it is connected. */
async function join(browser, url, name) {
  const page = await browser.newPage({ viewport: { width: 390, height: 740 } });
  page.on("dialog", (d) => { throw new Error(`unexpected dialog: ${d.message()}`); });
  await page.goto(url);
  await page.fill("#name", name);
  await page.click("#join-button");
  await page.locator("#status", { hasText: "connected through Switchboard" }).waitFor({ timeout: 10_000 });
  await page.locator("#log .system", { hasText: `welcome, ${name}` }).waitFor({ timeout: 10_000 });
  return page;
}

/** The names in a page's member list, once it shows exactly `count`. */
async function members(page, count) {
  await page.locator("#members li").nth(count - 1).waitFor({ timeout: 10_000 });
  await page.waitForFunction((n) => document.querySelectorAll("#members li").length === n, count, { timeout: 10_000 });
  return page.locator("#members li").allTextContents();
}

test("two browsers chat through the gateway", { timeout: 60_000 }, async () => {
  assert.ok(existsSync(chatBin), `${chatBin} missing: cargo build --release -p switchboard-examples`);
  assert.ok(existsSync(chromiumPath), `${chromiumPath} missing: apt-get install chromium`);
  const [origin, ws, control] = [await freePort(), await freePort(), await freePort()];
  const chat = spawn(
    chatBin,
    ["--origin-listen", `127.0.0.1:${origin}`, "--listen", `127.0.0.1:${ws}`, "--control-listen", `127.0.0.1:${control}`],
    { stdio: ["ignore", "inherit", "inherit"] },
  );
  const browser = await launchBrowser();
  try {
    const url = `http://127.0.0.1:${origin}/`;
    await waitForHttp(url, 10_000);
    const ann = await join(browser, url, "ann");
    const bob = await join(browser, url, "bob");
    await ann.locator("#log .system", { hasText: "bob joined" }).waitFor({ timeout: 10_000 });
    // The page fits a phone: the viewport tag is there and nothing is wider
    // than the screen.
    assert.ok(await ann.locator('meta[name="viewport"]').count());
    assert.ok(await ann.evaluate(() => document.documentElement.scrollWidth <= window.innerWidth));
    assert.deepEqual(await members(ann, 2), ["ann", "bob"]);
    assert.deepEqual(await members(bob, 2), ["ann", "bob"]);

    await bob.fill("#text", "hello from bob");
    await bob.click("#send");
    for (const page of [ann, bob]) {
      const line = page.locator("#log .chat", { hasText: "hello from bob" });
      await line.waitFor({ timeout: 10_000 });
      assert.equal(await line.locator(".name").textContent(), "bob");
    }

    const shots = path.join(targetDir, "browser");
    mkdirSync(shots, { recursive: true });
    await ann.screenshot({ path: path.join(shots, "chat.png") });

    // A late joiner gets what was said before, marked as earlier; a second
    // "ann" gets a name of her own.
    const late = await join(browser, url, "ann");
    const said = late.locator("#log .chat.history", { hasText: "hello from bob" });
    await said.waitFor({ timeout: 10_000 });
    assert.equal(await said.locator(".name").textContent(), "bob");
    await late.locator("#log .divider", { hasText: "1 earlier message above" }).waitFor({ timeout: 10_000 });
    assert.deepEqual(await members(late, 3), ["ann", "ann-2", "bob"]);
    await late.close();

    // Bob leaves: the origin gets his disconnect and tells Ann.
    await bob.close();
    await ann.locator("#log .system", { hasText: "bob left" }).waitFor({ timeout: 10_000 });
    assert.deepEqual(await members(ann, 1), ["ann"]);
  } finally {
    await browser.close();
    chat.kill("SIGTERM");
  }
});
