// The HTTP transports without a gateway: the SSE parser, the command poster
// (order, batching, retries), and the SSE and long-poll transports against a
// scripted `fetch`.

import { test } from "node:test";
import assert from "node:assert/strict";
import { SseParser, SseTransport } from "../dist/sse.js";
import { CommandPoster, MAX_BATCH_BYTES } from "../dist/http.js";
import { LongPollTransport } from "../dist/longpoll.js";
import { waitFor, sleep } from "../testlib/helpers.mjs";

function parseAll(chunks) {
  const out = [];
  const p = new SseParser(
    (e) => out.push(`${e.type}|${e.id}|${e.data}`),
    (c) => out.push(`:${c}`),
  );
  for (const c of chunks) p.push(c);
  return out;
}

const STREAM =
  "\uFEFFid: 1\r\ndata: {\"push\":\"connected\"}\r\n\r\n" +
  ":\n" +
  "data:no space\ndata:  two spaces\n\n" +
  "event: close\rdata: {\"code\":1000}\r\r" +
  "id: 7\nevent: nothing\n\n" + // no data: not dispatched
  "data\n\n" + // a field without colon: empty data line
  "retry: 1000\nunknown: x\ndata: last\n\n" +
  "data: unterminated";

const EXPECTED = [
  'message|1|{"push":"connected"}',
  ":",
  "message|1|no space\n two spaces",
  'close|1|{"code":1000}',
  "message|7|",
  "message|7|last",
];

test("sse parser: events, comments, CRLF/CR/LF, BOM, multi-line data; an event needs data and an empty line", () => {
  assert.deepEqual(parseAll([STREAM]), EXPECTED);
});

test("sse parser: the same events whatever the chunking (every split point, and one character at a time)", () => {
  for (let i = 0; i <= STREAM.length; i++) {
    assert.deepEqual(parseAll([STREAM.slice(0, i), STREAM.slice(i)]), EXPECTED, `split at ${i}`);
  }
  for (let i = 1; i < STREAM.length; i += 7) {
    assert.deepEqual(parseAll([STREAM.slice(0, i), "", STREAM.slice(i, i + 3), STREAM.slice(i + 3)]), EXPECTED, `three pieces at ${i}`);
  }
  assert.deepEqual(parseAll([...STREAM]), EXPECTED);
  // A CR at the end of a chunk followed by a LF in the next is one line break, not two (no empty line, no early dispatch).
  assert.deepEqual(parseAll(["data: a\r", "\ndata: b\r", "\n\r", "\n"]), ["message||a\nb"]);
});

/** A scripted fetch: `handler(url, init)` answers each request; every request is recorded. */
function fakeFetch(handler) {
  const requests = [];
  const f = async (url, init = {}) => {
    const req = { url: new URL(url), method: init.method ?? "GET", body: init.body, headers: init.headers ?? {}, signal: init.signal, credentials: init.credentials };
    requests.push(req);
    return handler(req, requests.length - 1);
  };
  f.requests = requests;
  return f;
}

const NO_CONTENT = () => new Response(null, { status: 204 });
const json = (status, body) => new Response(JSON.stringify(body), { status, headers: { "content-type": "application/json" } });

/** A streamed response whose chunks the test pushes; it errors when the request is aborted. */
function streamed(signal, headers = { "content-type": "text/event-stream" }) {
  let controller;
  const body = new ReadableStream({
    start(c) {
      controller = c;
    },
  });
  signal?.addEventListener("abort", () => {
    try {
      controller.error(new Error("aborted"));
    } catch {}
  });
  const enc = new TextEncoder();
  return {
    response: new Response(body, { status: 200, headers }),
    push: (text) => controller.enqueue(enc.encode(text)),
    end: () => controller.close(),
    fail: () => controller.error(new TypeError("terminated")),
  };
}

/** A transport listener that records what it is told (`closed` is the list of close events). */
function listener() {
  const l = { frames: [], aliveCount: 0, closedEvents: [] };
  l.frame = (t) => l.frames.push(t);
  l.alive = () => (l.aliveCount += 1);
  l.closed = (e) => l.closedEvents.push(e);
  return l;
}

test("command poster: one request in flight, order kept, commands sent meanwhile batched, network errors retried", async () => {
  let inFlight = 0;
  let maxInFlight = 0;
  let fails = 2;
  const accepted = [];
  const f = fakeFetch(async (req) => {
    inFlight += 1;
    maxInFlight = Math.max(maxInFlight, inFlight);
    await sleep(20);
    inFlight -= 1;
    if (req.body.includes('"n":3') && fails > 0) {
      fails -= 1;
      // A network error, then the gateway too busy: both sent again.
      if (fails === 1) throw new TypeError("fetch failed");
      return json(503, { code: "busy", message: "" });
    }
    accepted.push(...req.body.split("\n").map((l) => JSON.parse(l).n));
    return NO_CONTENT();
  });
  const failures = [];
  const p = new CommandPoster(f, "http://gw/ws?session=S", (e) => failures.push(e));
  for (let n = 1; n <= 6; n++) p.send(JSON.stringify({ n }));
  await waitFor(() => accepted.length === 6, 5000, "all accepted");
  await sleep(50);
  assert.deepEqual(accepted, [1, 2, 3, 4, 5, 6]);
  assert.equal(maxInFlight, 1);
  assert.deepEqual(failures, []);
  for (const r of f.requests) {
    assert.equal(r.method, "POST");
    assert.equal(r.url.searchParams.get("session"), "S");
    assert.equal(r.headers["content-type"], "text/plain");
  }
  // The first command went alone; the five sent while it was in flight went together, three times
  // (a network error, a 503), identically.
  const bodies = f.requests.map((r) => r.body);
  assert.equal(bodies[0], '{"n":1}');
  assert.equal(bodies.length, 4);
  assert.deepEqual(new Set(bodies.slice(1)).size, 1);
  assert.equal(bodies[1].split("\n").length, 5);
  p.stop();
});

test("command poster: 413 lowers the batch size; a refusal ends it once; nothing is sent after stop", async () => {
  const limit = 40;
  const f = fakeFetch(async (req) => (req.body.length > limit ? json(413, { code: "payload_too_large", message: "" }) : NO_CONTENT()));
  const failures = [];
  const p = new CommandPoster(f, "http://gw/ws?session=S", (e) => failures.push(e));
  // Held back by a first request, these nine go as one batch, then get split.
  for (let n = 1; n <= 10; n++) p.send(JSON.stringify({ n, pad: "xxxx" }));
  await waitFor(() => f.requests.filter((r) => r.body.length <= limit).length === 10, 5000, "all accepted");
  const accepted = f.requests.filter((r) => r.body.length <= limit).flatMap((r) => r.body.split("\n").map((l) => JSON.parse(l).n));
  assert.deepEqual(accepted, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
  assert.deepEqual(failures, []);

  const g = fakeFetch(async () => json(404, { code: "session_unknown", message: "no such session" }));
  const failed = [];
  const q = new CommandPoster(g, "http://gw/ws?session=S", (e) => failed.push(e));
  q.send("{}");
  q.send("{}");
  await waitFor(() => failed.length === 1, 5000, "failure");
  await sleep(50);
  assert.equal(failed.length, 1);
  assert.equal(failed[0].status, 404);
  assert.match(failed[0].message, /session_unknown/);
  q.send("{}");
  await sleep(20);
  assert.equal(g.requests.length, 1);
  assert.ok(MAX_BATCH_BYTES >= 16 * 1024);
});

test("sse transport: the handshake URL, frames in order, heartbeats, commands after the connected push, close event", async () => {
  let stream;
  const f = fakeFetch(async (req) => {
    if (req.method === "GET") {
      stream = streamed(req.signal);
      return stream.response;
    }
    return NO_CONTENT();
  });
  const l = listener();
  const t = new SseTransport(f, { url: "ws://gw:1/live?app=1", token: "T", resume: { token: "R", received: 4 }, listener: l });
  t.send('{"id":1,"cmd":"ping"}'); // before the connected push: held
  await waitFor(() => stream, 2000, "stream");
  const open = f.requests[0];
  assert.equal(open.url.protocol, "http:");
  assert.equal(open.url.pathname, "/live");
  assert.deepEqual(Object.fromEntries(open.url.searchParams), { app: "1", token: "T", resume: "R", received: "4" });
  assert.equal(open.headers.accept, "text/event-stream");
  assert.equal(open.credentials, "same-origin");
  await sleep(20);
  assert.equal(f.requests.length, 1, "no command before the session is known");
  stream.push('id: 1\ndata: {"push":"connected","client":"c","session":"S1"}\n\n:\n\nid: 2\ndata: {"push":"direct","seq":5');
  stream.push(',"text":"x"}\n\n');
  await waitFor(() => l.frames.length === 2, 2000, "frames");
  assert.deepEqual(l.frames.map((x) => JSON.parse(x).push), ["connected", "direct"]);
  assert.ok(l.aliveCount >= 1);
  await waitFor(() => f.requests.length === 2, 2000, "held command sent");
  const post = f.requests[1];
  assert.equal(post.method, "POST");
  assert.deepEqual(Object.fromEntries(post.url.searchParams), { app: "1", session: "S1" });
  assert.equal(post.body, '{"id":1,"cmd":"ping"}');
  stream.push('event: close\ndata: {"code":4001,"reason":"slow consumer"}\n\n');
  await waitFor(() => l.closedEvents.length === 1, 2000, "closed");
  assert.deepEqual(l.closedEvents[0], { code: 4001, reason: "slow consumer", clean: true });
  t.send("{}");
  await sleep(20);
  assert.equal(f.requests.length, 2);
});

test("sse transport: a stream ending without a close event, or failing, is a lost link; a refusal carries its status", async () => {
  for (const how of ["end", "fail"]) {
    let stream;
    const f = fakeFetch(async (req) => {
      stream = streamed(req.signal);
      return stream.response;
    });
    const l = listener();
    new SseTransport(f, { url: "https://gw/ws", listener: l });
    await waitFor(() => stream, 2000, "stream");
    assert.equal(f.requests[0].url.protocol, "https:");
    stream.push('data: {"push":"connected","client":"c","session":"S"}\n\n');
    await waitFor(() => l.frames.length === 1, 2000, "frame");
    stream[how]();
    await waitFor(() => l.closedEvents.length === 1, 2000, "closed");
    assert.equal(l.closedEvents[0].clean, false);
    assert.equal(l.closedEvents[0].code, undefined);
    assert.ok(l.closedEvents[0].error);
  }
  const refusals = [
    [401, "refused"],
    [403, "refused"],
    [426, "protocol"],
    [503, "protocol"],
  ];
  for (const [status, code] of refusals) {
    const f = fakeFetch(async () => json(status, { code: "x_code", message: "why" }));
    const l = listener();
    new SseTransport(f, { url: "ws://gw/ws", listener: l });
    await waitFor(() => l.closedEvents.length === 1, 2000, "refused");
    assert.equal(l.closedEvents[0].error.code, code, `HTTP ${status}`);
    assert.equal(l.closedEvents[0].error.status, status);
    assert.match(l.closedEvents[0].error.message, /x_code: why/);
  }
});

test("sse transport: drop() aborts the stream without a report; end() sends DELETE ?session=", async () => {
  let stream;
  const f = fakeFetch(async (req) => {
    if (req.method === "GET") {
      stream = streamed(req.signal);
      return stream.response;
    }
    return NO_CONTENT();
  });
  const l = listener();
  const t = new SseTransport(f, { url: "ws://gw/ws", listener: l });
  await waitFor(() => stream, 2000, "stream");
  stream.push('data: {"push":"connected","client":"c","session":"S"}\n\n');
  await waitFor(() => l.frames.length === 1, 2000, "frame");
  assert.equal(t.drop(), false);
  await sleep(20);
  assert.ok(f.requests[0].signal.aborted);
  assert.deepEqual(l.closedEvents, []);

  stream = undefined;
  const l2 = listener();
  const t2 = new SseTransport(f, { url: "ws://gw/ws", listener: l2 });
  await waitFor(() => stream, 2000, "stream");
  stream.push('data: {"push":"connected","client":"c","session":"S2"}\n\n');
  await waitFor(() => l2.frames.length === 1, 2000, "frame");
  await t2.end();
  const del = f.requests.at(-1);
  assert.equal(del.method, "DELETE");
  assert.equal(del.url.searchParams.get("session"), "S2");
  assert.deepEqual(l2.closedEvents, []);
});

test("long-poll transport: open, polls acknowledge cursors, a lost answer (or a 5xx) is asked again with the same cursor, poll_replaced ignored, close", async () => {
  const script = [];
  let polls = 0;
  const f = fakeFetch(async (req) => {
    if (req.method === "POST") return NO_CONTENT();
    if (!req.url.searchParams.has("session")) {
      return json(200, { cursor: 1, pushes: [{ push: "connected", client: "c", session: "S" }, { push: "direct", seq: 1, text: "a" }] });
    }
    polls += 1;
    const step = script.shift();
    if (!step) return new Promise(() => {}); // waits forever (until aborted)
    return step(req);
  });
  script.push(
    () => json(200, { cursor: 2, pushes: [{ push: "direct", seq: 2, text: "b" }] }),
    () => {
      throw new TypeError("fetch failed"); // the answer is lost
    },
    () => json(409, { code: "poll_replaced", message: "" }),
    () => json(504, { code: "node_timeout", message: "" }),
    () => json(200, { cursor: 3, pushes: [] }),
    () => json(200, { cursor: 4, pushes: [{ push: "direct", seq: 3, text: "c" }], close: { code: 4004, reason: "token expired" } }),
  );
  const l = listener();
  const t = new LongPollTransport(f, { url: "wss://gw/live", token: "T", listener: l }, "include");
  t.send('{"id":9,"cmd":"ping"}');
  await waitFor(() => l.closedEvents.length === 1, 5000, "closed");
  const open = f.requests[0];
  assert.equal(open.url.protocol, "https:");
  assert.deepEqual(Object.fromEntries(open.url.searchParams), { token: "T", transport: "long-poll" });
  const cursors = f.requests.filter((r) => r.method === "GET" && r.url.searchParams.has("session")).map((r) => r.url.searchParams.get("cursor"));
  assert.deepEqual(cursors, ["1", "2", "2", "2", "2", "3"]);
  assert.ok(f.requests.every((r) => r.credentials === "include"));
  for (const r of f.requests.slice(1).filter((r) => r.method === "GET")) {
    assert.equal(r.url.searchParams.get("transport"), "long-poll");
    assert.equal(r.url.searchParams.get("session"), "S");
    assert.equal(r.url.searchParams.has("token"), false);
  }
  assert.deepEqual(
    l.frames.map((x) => JSON.parse(x)).map((p) => p.text ?? p.push),
    ["connected", "a", "b", "c"],
  );
  assert.deepEqual(l.closedEvents[0], { code: 4004, reason: "token expired", clean: true });
  const post = f.requests.find((r) => r.method === "POST");
  assert.equal(post.body, '{"id":9,"cmd":"ping"}');
  assert.equal(post.url.searchParams.get("session"), "S");
  assert.equal(polls, 6);
});

test("long-poll transport: bad_cursor, session_suspended, session_ended and session_unknown end it as a lost link", async () => {
  for (const [status, code] of [
    [409, "bad_cursor"],
    [409, "session_suspended"],
    [409, "session_ended"],
    [404, "session_unknown"],
  ]) {
    const f = fakeFetch(async (req) =>
      req.url.searchParams.has("session")
        ? json(status, { code, message: "" })
        : json(200, { cursor: 1, pushes: [{ push: "connected", client: "c", session: "S" }] }),
    );
    const l = listener();
    new LongPollTransport(f, { url: "ws://gw/ws", listener: l });
    await waitFor(() => l.closedEvents.length === 1, 2000, "closed");
    assert.equal(l.closedEvents[0].clean, false);
    assert.equal(l.closedEvents[0].error.status, status);
    assert.match(l.closedEvents[0].error.message, new RegExp(code));
  }
});
