// What the browser tests share: where the binaries are, free ports, waiting
// for a server, and a headless Chromium.

import { createServer, connect as tcpConnect } from "node:net";
import { spawn } from "node:child_process";
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

/**
 * A TCP proxy on `port` to `target` whose `cut()` destroys every connection
 * through it. With `refuseUpgrades`, WebSocket is broken in front of the
 * gateway, as behind some corporate proxies: an upgrade request is answered
 * 400 and plain HTTP passes. With `bufferEventStreams` too, the answer to a
 * request that accepts `text/event-stream` is held back for good, as by a
 * proxy that buffers whole responses.
 */
export function cuttableProxy(port, target, { refuseUpgrades = false, bufferEventStreams = false } = {}) {
  const open = new Set();
  const track = (s) => {
    open.add(s);
    s.on("close", () => open.delete(s));
    s.on("error", () => {});
  };
  const server = createServer((client) => {
    track(client);
    client.once("data", (first) => {
      if (refuseUpgrades && /^upgrade:\s*websocket/im.test(first.toString("latin1"))) {
        client.end("HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        return;
      }
      const upstream = tcpConnect(target, "127.0.0.1");
      track(upstream);
      upstream.write(first);
      client.pipe(upstream);
      if (bufferEventStreams && /^accept:[^\r\n]*text\/event-stream/im.test(first.toString("latin1"))) {
        // A buffering proxy: the event stream's answer never comes through.
        upstream.on("data", () => {});
      } else {
        upstream.pipe(client);
      }
    });
  });
  return new Promise((resolve) =>
    server.listen(port, "127.0.0.1", () =>
      resolve({
        server,
        cut() {
          for (const s of open) s.destroy();
        },
      }),
    ),
  );
}

/** Starts the release gateway on `listen` and `control` with `args` more (logs at warn). */
export function spawnGateway(listen, control, args) {
  return spawn(
    releaseBin("switchboard"),
    ["serve", "--listen", `127.0.0.1:${listen}`, "--control-listen", `127.0.0.1:${control}`, "--log-level", "warn", ...args],
    { stdio: ["ignore", "inherit", "inherit"] },
  );
}
