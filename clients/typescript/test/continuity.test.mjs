// Continuity on each transport, as the issue asks: 1,000 numbered direct
// messages and 1,000 numbered channel messages while the connection is cut
// 10 times through a TCP proxy; every one arrives exactly once and in
// order, with the same client id, over WebSocket, SSE and long-polling.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { startGateway, startProxy, newClient, waitFor, sleep, sendDirect, publish } from "../testlib/helpers.mjs";

let gw;
before(async () => {
  // History enough for every message published while a client is away.
  gw = await startGateway(["--namespace", "cont:history-size=5000,subscribe"]);
});
after(async () => {
  await gw?.stop();
});

const N = 1000;
const DROPS = 10;
const range = (n, f) => Array.from({ length: n }, (_, i) => f(i + 1));

for (const transport of ["websocket", "sse", "long-poll"]) {
  test(`${transport}: ${N} directs and ${N} channel messages across ${DROPS} drops, each once and in order`, { timeout: 120_000 }, async () => {
    const proxy = await startProxy(gw.port);
    const { client, events } = newClient(proxy.url, { transports: [transport] });
    const directs = [];
    const messages = [];
    const gaps = [];
    client.on("direct", (m) => directs.push(m));
    try {
      const { clientId } = await client.connect();
      assert.equal(client.transport, transport);
      const channel = `cont:${transport}`;
      await client.subscribe(channel, { message: (m) => messages.push(m), gap: (g) => gaps.push(g) });
      for (let i = 1; i <= N; i++) {
        if (i % (N / DROPS) === N / DROPS / 2) {
          // A drop with messages in flight, once the last one is over.
          await waitFor(() => client.state === "connected", 15_000, "connected");
          proxy.cut();
        }
        assert.equal((await sendDirect(gw, clientId, `d${i}`)).status, 200);
        assert.equal((await publish(gw, channel, `m${i}`)).status, 200);
      }
      await waitFor(() => directs.length >= N && messages.length >= N, 60_000, `${N} directs and ${N} channel messages`);
      await sleep(300); // nothing more (no duplicate) may come
      assert.deepEqual(directs.map((m) => [m.seq, m.data]), range(N, (i) => [i, `d${i}`]));
      assert.deepEqual(messages.map((m) => m.data), range(N, (i) => `m${i}`));
      const offsets = messages.map((m) => m.offset);
      assert.deepEqual(offsets, [...offsets].sort((a, b) => a - b), "in offset order");
      assert.deepEqual(gaps, []);
      assert.equal(client.clientId, clientId, "the same session throughout");
      assert.equal(events.filter((e) => e.name === "restarted").length, 0);
    } finally {
      await client.close();
      await proxy.close();
    }
  });
}
