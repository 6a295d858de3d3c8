// The example origins of examples/redis-origin (worker.mjs with ioredis,
// worker.py with redis-py), each against a real redis-server and the
// release gateway started with `--origin redis`: a connection is accepted
// (the worker's user id applies) or refused with the worker's status and
// reason, every client message comes back as the worker's echo, through
// the control stream, in order; and a second worker started after the first
// was killed takes over. Run with `npm test` (its pretest installs the
// workers' dependencies: ioredis, and redis-py in .venv).

import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createServer } from "node:net";
import { fileURLToPath } from "node:url";
import path from "node:path";
import WebSocket from "ws";

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, "../..");
const targetDir = process.env.CARGO_TARGET_DIR ?? path.join(root, "target");
const gatewayBin = path.join(targetDir, "release", "switchboard");
const examples = path.join(root, "examples", "redis-origin");
const python = path.join(here, ".venv", "bin", "python3");
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function freePort() {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

/** Starts a child whose output is kept (shown when a test fails). */
function start(cmd, args, opts = {}) {
  const child = spawn(cmd, args, { stdio: ["ignore", "pipe", "pipe"], ...opts });
  child.output = "";
  child.stdout.on("data", (d) => (child.output += d));
  child.stderr.on("data", (d) => (child.output += d));
  return child;
}

async function waitFor(what, ms, check) {
  const deadline = Date.now() + ms;
  for (;;) {
    try {
      if (await check()) return;
    } catch {}
    if (Date.now() > deadline) throw new Error(`${what} not within ${ms} ms`);
    await sleep(50);
  }
}

/** Opens a WebSocket; resolves with it and a queue of its text messages, or rejects with the refusal's status and body. */
function open(url) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url);
    const queue = [];
    ws.on("message", (data) => queue.push(String(data)));
    ws.once("open", () => resolve({ ws, queue }));
    ws.once("unexpected-response", (_req, res) => {
      let body = "";
      res.on("data", (d) => (body += d));
      res.on("end", () => reject(Object.assign(new Error(`refused ${res.statusCode}`), { status: res.statusCode, body })));
    });
    ws.once("error", reject);
  });
}

async function cluster(t) {
  const redisPort = await freePort();
  const redis = start("redis-server", ["--port", String(redisPort), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]);
  t.after(() => redis.kill("SIGKILL"));
  const url = `redis://127.0.0.1:${redisPort}/0`;
  const [listen, control] = [await freePort(), await freePort()];
  const gateway = start(gatewayBin, [
    "serve", "--redis", url, "--redis-prefix", "ex", "--origin", "redis", "--origin-timeout", "2s",
    "--listen", `127.0.0.1:${listen}`, "--control-listen", `127.0.0.1:${control}`, "--node-id", "a",
  ]);
  t.after(() => gateway.kill("SIGKILL"));
  await waitFor("the gateway", 10_000, async () => (await fetch(`http://127.0.0.1:${control}/v1/stats`)).ok);
  return { url, ws: `ws://127.0.0.1:${listen}`, gateway };
}

for (const [name, cmd, file] of [["node", process.execPath, "worker.mjs"], ["python", python, "worker.py"]]) {
  test(`the ${name} example worker answers connects and echoes messages, and another takes over`, async (t) => {
    const { url, ws: base, gateway } = await cluster(t);
    const env = { ...process.env, REDIS_URL: url, PREFIX: "ex" };
    let worker = start(cmd, [path.join(examples, file)], { env: { ...env, WORKER: "w1" }, cwd: examples });
    t.after(() => worker.kill("SIGKILL"));
    try {
      await waitFor(`${file} started`, 20_000, () => worker.output.includes("reading"));

      const refused = await open(`${base}/forbidden`).then(() => null, (e) => e);
      assert.equal(refused?.status, 403, `refused: ${refused}`);
      assert.match(refused.body, /not here/);

      const { ws, queue } = await open(`${base}/chat`);
      for (let i = 1; i <= 20; i++) ws.send(`m${i}`);
      await waitFor("20 echoes", 10_000, () => queue.length >= 20);
      assert.deepEqual(queue, Array.from({ length: 20 }, (_, i) => `echo: m${i + 1}`));

      // The first worker dies; a second one carries on.
      worker.kill("SIGKILL");
      worker = start(cmd, [path.join(examples, file)], { env: { ...env, WORKER: "w2" }, cwd: examples });
      await waitFor(`${file} restarted`, 20_000, () => worker.output.includes("reading"));
      ws.send("after");
      await waitFor("the echo after the restart", 10_000, () => queue.length >= 21);
      assert.equal(queue[20], "echo: after");
      ws.close();
    } catch (e) {
      console.error(`--- ${file}:\n${worker.output}\n--- gateway:\n${gateway.output.slice(-4000)}`);
      throw e;
    }
  });
}
