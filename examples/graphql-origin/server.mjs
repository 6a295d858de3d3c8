// A GraphQL origin for Switchboard (docs/graphql.md): a counter and chat
// rooms, with queries, mutations and subscriptions, executed by graphql-js.
//
// The origin stays stateless towards clients: it holds no socket and no
// subscription. The gateway runs every operation, subscriptions included,
// as an ordinary POST to /graphql. A subscription is answered like a query
// (its current state) plus `extensions.switchboard.subscription` saying which
// trigger keys change it; after each mutation this origin publishes those
// keys to the gateway's control API, and the gateway re-executes the
// subscriptions that depend on them.
//
//   PORT=4000 SWITCHBOARD_CONTROL=http://127.0.0.1:8081 node server.mjs
//
// Routes:
//   POST /graphql  GraphQL over HTTP (the gateway's --graphql-endpoint)
//   POST /events   the gateway's webhooks (--origin): accepts every `connect`
//                  with ack_payload {"hello": <user>}, refuses it when the
//                  connection_init payload has "refuse": true
//   GET  /stats    executions counted per subscription digest (or per
//                  operation name, for queries and mutations), for tests
//   POST /reset    forgets the counted executions and the requests and
//                  events kept for tests (not the state)
//   GET  /events   the webhook events received lately, for tests
//   GET  /requests the GraphQL requests received lately, for tests
//
// Env: PORT (4000), SWITCHBOARD_CONTROL (http://127.0.0.1:8081),
// SWITCHBOARD_API_KEY (sent as a Bearer token when set), ORIGIN_SECRET (the
// gateway's --origin-secret: every request must then be signed).

import { createHash, createHmac, timingSafeEqual } from "node:crypto";
import { createServer } from "node:http";
import { buildSchema, execute, getOperationAST, parse, validate } from "graphql";

const PORT = Number(process.env.PORT ?? 4000);
const CONTROL = (process.env.SWITCHBOARD_CONTROL ?? "http://127.0.0.1:8081").replace(/\/$/, "");
const API_KEY = process.env.SWITCHBOARD_API_KEY;
const SECRET = process.env.ORIGIN_SECRET;
const MAX_BODY = 1 << 20;

const schema = buildSchema(`
  type Message { id: Int!, room: String!, text: String! }
  type Query { counter: Int!, messages(room: String!): [Message!]! }
  type Mutation { increment(by: Int = 1): Int!, send(room: String!, text: String!): Message! }
  type Subscription { counter: Int!, messages(room: String!): [Message!]! }
`);

// The state. A real origin keeps it in its database.
let counter = 0;
let nextId = 1;
const rooms = new Map(); // room -> [Message]

// Root resolvers. graphql-js's `execute` runs a subscription operation's
// fields with these resolvers like a query's, which is what Switchboard wants:
// the current result. Each resolver notes the trigger key of what it read
// (for subscriptions) or changed (for mutations) in the context.
const root = {
  counter: (_args, ctx) => (ctx.keys.add("counter"), counter),
  messages: ({ room }, ctx) => (ctx.keys.add(`room:${room}`), rooms.get(room) ?? []),
  increment: ({ by }, ctx) => (ctx.keys.add("counter"), (counter += by)),
  send: ({ room, text }, ctx) => {
    const message = { id: nextId++, room, text };
    if (!rooms.has(room)) rooms.set(room, []);
    rooms.get(room).push(message);
    ctx.keys.add(`room:${room}`);
    return message;
  },
};

// Executions counted for the tests: per digest for subscriptions, per
// operation name (or type) for queries and mutations.
let stats = { executions: {}, triggered: {}, total: 0 };
const events = []; // the last webhook events, newest last
const requests = []; // the last GraphQL requests ({body, headers}), newest last

function remember(list, item) {
  list.push(item);
  if (list.length > 500) list.shift();
}

/** Hex SHA-256 of the operation's query, variables and operation name. Two
 * subscriptions get the same digest exactly when their results are always the
 * same: here nothing depends on who asks (every result is public), so the
 * caller's identity is left out and every client subscribed to
 * `messages(room: "lobby")` with the same query shares one execution per
 * trigger. An origin whose resolvers filter by user would add the user id
 * (extensions.switchboard.user_id) here. */
function digestOf({ query, variables, operationName }) {
  return createHash("sha256")
    .update(JSON.stringify([query, variables ?? {}, operationName ?? null]))
    .digest("hex");
}

/** Runs one GraphQL-over-HTTP request body; returns [status, answer]. */
async function graphql(body) {
  const { query, variables, operationName } = body ?? {};
  if (typeof query !== "string") return [400, { errors: [{ message: "a query string is required" }] }];
  let document;
  try {
    document = parse(query);
  } catch (e) {
    return [200, { errors: [e.toJSON()] }];
  }
  const invalid = validate(schema, document);
  if (invalid.length) return [200, { errors: invalid.map((e) => e.toJSON()) }];
  const operation = getOperationAST(document, operationName);
  if (!operation) return [200, { errors: [{ message: "no operation to run (give operationName)" }] }];

  const ctx = { keys: new Set() };
  const result = await execute({ schema, document, rootValue: root, contextValue: ctx, variableValues: variables, operationName });
  const answer = { data: result.data ?? null };
  if (result.errors) answer.errors = result.errors.map((e) => e.toJSON());
  // `extensions.switchboard` of the request is the gateway's: `trigger` is
  // the key that caused a re-execution (null for a client's operation).
  const trigger = body.extensions?.switchboard?.trigger ?? null;

  if (operation.operation === "subscription" && ctx.keys.size > 0) {
    const digest = digestOf(body);
    count(digest, trigger);
    answer.extensions = { switchboard: { subscription: { triggers: [...ctx.keys], digest } } };
  } else {
    count(operationName ?? operation.name?.value ?? operation.operation, trigger);
  }
  if (operation.operation === "mutation" && ctx.keys.size > 0) {
    // Published before the mutation's answer, so that a client holding the
    // answer knows its subscriptions are on their way.
    await publish([...ctx.keys]);
  }
  return [200, answer];
}

function count(key, trigger) {
  stats.executions[key] = (stats.executions[key] ?? 0) + 1;
  if (trigger !== null) stats.triggered[key] = (stats.triggered[key] ?? 0) + 1;
  stats.total += 1;
}

/** POST /v1/graphql/triggers on the gateway's control API. */
async function publish(triggers) {
  const headers = { "content-type": "application/json" };
  if (API_KEY) headers.authorization = `Bearer ${API_KEY}`;
  try {
    const res = await fetch(`${CONTROL}/v1/graphql/triggers`, { method: "POST", headers, body: JSON.stringify({ triggers }) });
    if (res.status !== 202) console.error(`publishing ${triggers} answered ${res.status}: ${await res.text()}`);
  } catch (e) {
    console.error(`publishing ${triggers} failed: ${e.message}`);
  }
}

/** The gateway's webhooks (docs/origin.md). Answers [status, body]. */
function webhook(body) {
  for (const event of body.events ?? []) remember(events, event);
  const connect = (body.events ?? []).find((e) => e.type === "connect");
  if (!connect) return [200, {}]; // disconnect, keepalive, …: nothing to do
  const init = connect.init_payload; // the connection_init payload (GraphQL clients)
  if (init?.refuse === true) return [403, { reason: "refused by example" }];
  const named = typeof init?.user === "string" ? init.user : undefined;
  const user = connect.user_id ?? named ?? "anonymous";
  return [200, { ...(named && !connect.user_id ? { user_id: named } : {}), ack_payload: { hello: user } }];
}

/** Checks X-Switchboard-Timestamp and X-Switchboard-Signature (docs/origin.md). */
function signed(req, raw) {
  const ts = String(req.headers["x-switchboard-timestamp"] ?? "");
  const sig = String(req.headers["x-switchboard-signature"] ?? "");
  if (!/^[0-9]{1,15}$/.test(ts) || Math.abs(Date.now() / 1000 - Number(ts)) > 300) return false;
  if (!/^v1=[0-9a-fA-F]{64}$/.test(sig)) return false;
  const want = createHmac("sha256", SECRET).update(`${ts}.`).update(raw).digest();
  return timingSafeEqual(Buffer.from(sig.slice(3), "hex"), want);
}

function send(res, status, body) {
  const text = JSON.stringify(body);
  res.writeHead(status, { "content-type": "application/json", "content-length": Buffer.byteLength(text) });
  res.end(text);
}

const server = createServer(async (req, res) => {
  const url = new URL(req.url, "http://origin");
  const route = `${req.method} ${url.pathname}`;
  if (route === "GET /stats") return send(res, 200, stats);
  if (route === "POST /reset") {
    stats = { executions: {}, triggered: {}, total: 0 };
    requests.length = events.length = 0;
    return send(res, 200, stats);
  }
  if (route === "GET /events") return send(res, 200, { events });
  if (route === "GET /requests") return send(res, 200, { requests });
  if (route !== "POST /graphql" && route !== "POST /events") return send(res, 404, { error: "not found" });

  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > MAX_BODY) return send(res, 413, { error: "body too large" });
    chunks.push(chunk);
  }
  const raw = Buffer.concat(chunks);
  if (SECRET && !signed(req, raw)) return send(res, 401, { reason: "bad signature" });
  let body;
  try {
    body = JSON.parse(raw.toString("utf8"));
  } catch {
    return send(res, 400, { errors: [{ message: "the body is not JSON" }] });
  }
  if (route === "POST /graphql") remember(requests, { body, headers: req.headers });
  try {
    const [status, answer] = route === "POST /graphql" ? await graphql(body) : webhook(body);
    send(res, status, answer);
  } catch (e) {
    console.error(e);
    send(res, 500, { error: String(e.message) });
  }
});

server.listen(PORT, "127.0.0.1", () => console.log(`graphql origin on http://127.0.0.1:${server.address().port}/graphql`));
for (const signal of ["SIGINT", "SIGTERM"]) process.on(signal, () => process.exit(0));
