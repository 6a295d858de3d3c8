// What the browser tests share: where the binaries are, free ports, waiting
// for a server, and a headless Chromium.

import { createServer } from "node:net";
import { fileURLToPath } from "node:url";
import path from "node:path";
import { chromium } from "playwright-core";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");

/** Cargo's target directory (honours CARGO_TARGET_DIR). */
export const targetDir = process.env.CARGO_TARGET_DIR ?? path.join(root, "target");

/** A release binary of the workspace. */
export function releaseBin(name) {
  return path.join(targetDir, "release", name);
}

/** The Chromium to drive ($CHROMIUM, else Debian's). */
export const chromiumPath = process.env.CHROMIUM ?? "/usr/bin/chromium";

/** Starts headless Chromium. */
export function launchBrowser() {
  return chromium.launch({
    executablePath: chromiumPath,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic", "--no-first-run"],
  });
}

/** A free loopback port (bound by the OS, then released). */
export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

/** Polls `url` until it answers, for at most `ms`. */
export async function waitForHttp(url, ms) {
  const deadline = Date.now() + ms;
  for (;;) {
    try {
      const r = await fetch(url);
      if (r.ok) return;
    } catch {}
    if (Date.now() > deadline) throw new Error(`${url} did not answer within ${ms} ms`);
    await new Promise((r) => setTimeout(r, 100));
  }
}
