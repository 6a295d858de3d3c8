// The pure parts: the stream tracker (dedup, gaps) and the backoff.

import { test } from "node:test";
import assert from "node:assert/strict";
import { Backoff } from "../dist/index.js";
import { StreamTracker } from "../dist/tracker.js";

const msg = (offset, epoch = "e") => ({ channel: "chat:a", offset, epoch, data: `m${offset}` });
const show = (e) =>
  e.type === "message"
    ? `${e.message.offset}@${e.message.epoch}`
    : e.type === "gap"
      ? `gap ${e.last.offset}@${e.last.epoch}->${e.resumed.offset}@${e.resumed.epoch}`
      : `subscribed ${e.recovered} ${e.missed}`;

function run(f) {
  const out = [];
  f((e) => out.push(show(e)));
  return out;
}

test("tracker: first subscribe holds early messages, then drops duplicates", () => {
  const t = new StreamTracker();
  assert.equal(t.beginSubscribe(), undefined);
  assert.deepEqual(run((emit) => t.onMessage(msg(11), emit)), []);
  assert.deepEqual(
    run((emit) => t.onSubscribed({ epoch: "e", offset: 10 }, emit)),
    ["subscribed undefined undefined", "11@e"],
  );
  assert.deepEqual(run((emit) => [12, 12, 9, 13].forEach((o) => t.onMessage(msg(o), emit))), ["12@e", "13@e"]);
});

test("tracker: a resubscribe replays from the position; recovered:false and epoch changes are gaps", () => {
  const t = new StreamTracker();
  t.beginSubscribe();
  run((emit) => t.onSubscribed({ epoch: "e", offset: 5 }, emit));
  t.connectionLost();
  assert.deepEqual(t.beginSubscribe(), { offset: 5, epoch: "e" });
  assert.deepEqual(
    run((emit) => {
      t.onMessage(msg(6), emit);
      t.onMessage(msg(7), emit);
      t.onSubscribed({ epoch: "e", offset: 7, recovered: true, missed: 2 }, emit);
    }),
    ["subscribed true 2", "6@e", "7@e"],
  );
  t.connectionLost();
  t.beginSubscribe();
  assert.deepEqual(run((emit) => t.onSubscribed({ epoch: "e", offset: 30, recovered: false }, emit)), [
    "subscribed false undefined",
    "gap 7@e->30@e",
  ]);
  assert.deepEqual(run((emit) => t.onMessage(msg(4, "f"), emit)), ["gap 30@e->3@f", "4@f"]);
  // "Recovered" but the replay stops short of the reply's offset: reported, not hidden.
  t.connectionLost();
  t.beginSubscribe();
  assert.deepEqual(run((emit) => t.onSubscribed({ epoch: "f", offset: 6, recovered: true, missed: 2 }, emit)), [
    "subscribed true 2",
    "gap 4@f->6@f",
  ]);
});

test("backoff: full jitter under an exponential ceiling capped at the maximum, reset", () => {
  let r = 0.999999;
  const b = new Backoff(250, 10_000, () => r);
  const ceilings = Array.from({ length: 8 }, () => b.next() + 1);
  assert.deepEqual(ceilings, [250, 500, 1000, 2000, 4000, 8000, 10_000, 10_000]);
  r = 0;
  assert.equal(b.next(), 0);
  b.reset();
  r = 0.5;
  assert.equal(b.next(), 125);
});
