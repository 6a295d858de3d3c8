// An origin for Switchboard over Redis Streams (`--origin redis`), in
// Node.js with ioredis: it accepts connections (refusing paths under
// /forbidden), and answers every client message with an echo sent through
// the control stream. Run several: they share the work through the consumer
// group, and one that crashes leaves its entries to the others (claimed
// after 30 s).
//
//     npm install ioredis
//     REDIS_URL=redis://127.0.0.1:6379/0 node worker.mjs
//
// Environment: REDIS_URL, PREFIX (--redis-prefix, default switchboard),
// PARTITIONS (--redis-event-partitions, default 1), WORKER (this consumer's
// name, default host-pid). See docs/origin.md, "The origin over Redis Streams".

import Redis from "ioredis";
import os from "node:os";

const PREFIX = process.env.PREFIX ?? "switchboard";
const PARTITIONS = Number(process.env.PARTITIONS ?? 1);
const WORKER = process.env.WORKER ?? `${os.hostname()}-${process.pid}`;
const GROUP = "origin";
const CLAIM_AFTER_MS = 30_000;

const redis = new Redis(process.env.REDIS_URL ?? "redis://127.0.0.1:6379/0");
const decisions = `${PREFIX}:decisions`;
const events = Array.from({ length: PARTITIONS }, (_, k) => `${PREFIX}:events:${k}`);
const streams = [decisions, ...events];
for (const stream of streams) {
  await redis.xgroup("CREATE", stream, GROUP, "0", "MKSTREAM").catch((e) => {
    if (!String(e).includes("BUSYGROUP")) throw e;
  });
}

// An entry's fields, [name, value, name, value, …], as an object.
const fieldsOf = (list) => {
  const fields = {};
  for (let i = 0; i < list.length; i += 2) fields[list[i]] = list[i + 1];
  return fields;
};

// Answers one `connect` (or `publish`, `subscribe`) on its reply channel.
async function decide(fields) {
  const event = JSON.parse(fields.batch).events[0];
  if (Number(fields.deadline_ms) < Date.now()) return; // refused already
  let answer;
  if (event.type === "connect" && event.path.startsWith("/forbidden")) {
    answer = { id: event.id, status: 403, reason: "not here" };
  } else if (event.type === "connect") {
    answer = { id: event.id, status: 200, answer: { user_id: "node-user" } };
  } else {
    answer = { id: event.id, status: 200 };
  }
  await redis.publish(fields.reply, JSON.stringify(answer));
}

// Handles one batch of events, in order.
async function handle(fields) {
  for (const event of JSON.parse(fields.batch).events) {
    if (event.type === "message" && event.text !== undefined) {
      const command = { op: "send", connection_id: event.connection_id, text: `echo: ${event.text}` };
      await redis.xadd(`${PREFIX}:control`, "*", "command", JSON.stringify(command));
    } else if (event.type === "disconnect") {
      console.log(`${event.connection_id} left`);
    }
  }
}

async function processEntry(stream, id, list) {
  const fields = fieldsOf(list);
  if (stream === decisions) await decide(fields);
  else await handle(fields);
  await redis.xack(stream, GROUP, id);
}

console.log(`worker ${WORKER} reading ${streams.join(", ")}`);
for (;;) {
  // What a crashed worker read and never acknowledged.
  for (const stream of streams) {
    const [, claimed] = await redis.xautoclaim(stream, GROUP, WORKER, CLAIM_AFTER_MS, "0-0", "COUNT", 100);
    for (const [id, list] of claimed) await processEntry(stream, id, list);
  }
  const found = await redis.xreadgroup(
    "GROUP", GROUP, WORKER, "COUNT", 100, "BLOCK", 1000,
    "STREAMS", ...streams, ...streams.map(() => ">"),
  );
  for (const [stream, entries] of found ?? []) {
    for (const [id, list] of entries) await processEntry(stream, id, list);
  }
}
