// The admin page: reads only the control API (every figure it shows is
// available to scripts too), with the API key kept in session storage.
"use strict";

const KEY = "switchboard-admin-key";
const POLL_MS = 1000;
const $ = (id) => document.getElementById(id);

/** The control API's answer to `method path`, or an Error with its code. */
async function api(method, path, body) {
  const headers = { authorization: `Bearer ${sessionStorage.getItem(KEY) ?? ""}` };
  if (body !== undefined) headers["content-type"] = "application/json";
  const r = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await r.text();
  const json = text ? JSON.parse(text) : null;
  if (r.status === 401) {
    logout("The key was refused.");
    throw new Error("unauthorized");
  }
  if (!r.ok) {
    const e = new Error(json?.message ?? `HTTP ${r.status}`);
    e.code = json?.code ?? String(r.status);
    e.status = r.status;
    throw e;
  }
  return { status: r.status, body: json };
}

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : String(c));
  return e;
}

const fmt = new Intl.NumberFormat("en", { maximumFractionDigits: 1 });
function num(x) {
  return Number.isFinite(x) ? fmt.format(x) : "–";
}
function bytes(x) {
  if (!Number.isFinite(x)) return "–";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (x >= 1024 && i < units.length - 1) {
    x /= 1024;
    i++;
  }
  return `${fmt.format(x)} ${units[i]}`;
}

// --- login ---

function showLogin(message) {
  $("app").hidden = true;
  $("logout").hidden = true;
  $("login-view").hidden = false;
  $("login-error").textContent = message ?? "";
  $("who").textContent = "";
  $("key").focus();
}

function logout(message) {
  sessionStorage.removeItem(KEY);
  stopPolling();
  // Nothing read with the key stays on the page.
  for (const id of ["totals", "conn-list", "conn-info", "chan-info"]) $(id).replaceChildren();
  $("nodes").tBodies[0].replaceChildren();
  for (const id of ["conn-result", "chan-result", "updated", "error"]) $(id).textContent = "";
  $("conn-close").hidden = true;
  $("chan-publish").hidden = true;
  showLogin(message);
}

async function start() {
  try {
    await api("GET", "/v1/stats");
  } catch (e) {
    if (e.message !== "unauthorized") showLogin(e.message);
    return;
  }
  $("login-view").hidden = true;
  $("app").hidden = false;
  $("logout").hidden = false;
  startPolling();
}

$("login").addEventListener("submit", (ev) => {
  ev.preventDefault();
  sessionStorage.setItem(KEY, $("key").value);
  $("key").value = "";
  start();
});
$("logout").addEventListener("click", () => logout());

// --- live figures ---

let timer = null;
/** Bumped at every login and logout: work begun under an older one is
 *  dropped when it resumes. */
let generation = 0;
/** Per node: the previous sample `{ at, stats }`, for rates. */
const previous = new Map();

function startPolling() {
  stopPolling();
  const gen = generation;
  // One read at a time: the next starts a second after this one ends.
  const loop = async () => {
    await poll(gen);
    if (gen === generation) timer = setTimeout(loop, POLL_MS);
  };
  loop();
}

function stopPolling() {
  generation++;
  if (timer) clearTimeout(timer);
  timer = null;
  previous.clear();
}

const COUNTERS = [
  "messages_in_total",
  "messages_out_total",
  "bytes_in_total",
  "bytes_out_total",
  "origin_requests_total",
  "origin_request_microseconds_total",
];

/** Rates of `s` against the node's previous sample (none for the first
 *  sample, or after the node restarted and its counters began again). */
function rates(node, s, at) {
  const p = previous.get(node);
  previous.set(node, { at, stats: s });
  if (!p) return null;
  const dt = (at - p.at) / 1000;
  if (!(dt > 0) || COUNTERS.some((k) => s[k] < p.stats[k])) return null;
  const d = (k) => (s[k] - p.stats[k]) / dt;
  const requests = s.origin_requests_total - p.stats.origin_requests_total;
  return {
    messagesIn: d("messages_in_total"),
    messagesOut: d("messages_out_total"),
    bytesIn: d("bytes_in_total"),
    bytesOut: d("bytes_out_total"),
    // Mean origin request time over the last interval, in milliseconds.
    originMs: requests > 0
      ? (s.origin_request_microseconds_total - p.stats.origin_request_microseconds_total) / 1000 / requests
      : NaN,
  };
}

async function poll(gen) {
  try {
    const { body: nodes } = await api("GET", "/v1/nodes");
    if (gen !== generation) return;
    const at = Date.now();
    const rows = await Promise.all(
      nodes.nodes.map(async (n) => {
        try {
          const { body: s } = await api("GET", `/v1/stats?node=${encodeURIComponent(n.node)}`);
          return { n, s, r: rates(n.node, s, at) };
        } catch (e) {
          return { n, error: e.message };
        }
      }),
    );
    if (gen !== generation) return;
    render(rows);
    const self = nodes.nodes.find((n) => n.self);
    $("who").textContent = self ? `node ${self.node}` : "";
    $("updated").textContent = `updated ${new Date(at).toLocaleTimeString()}`;
    $("error").textContent = "";
  } catch (e) {
    if (gen === generation && e.message !== "unauthorized") {
      $("error").textContent = `Cannot read the cluster: ${e.message}`;
    }
  }
}

function render(rows) {
  const sum = (f) => rows.reduce((a, x) => a + (x.s ? f(x) : 0), 0);
  const known = rows.filter((x) => x.r);
  const rate = (k) => (known.length ? known.reduce((a, x) => a + x.r[k], 0) : NaN);
  const cards = [
    ["nodes", num(rows.length)],
    ["connections (WebSocket)", num(sum((x) => x.s.connections))],
    ["messages in/s", num(rate("messagesIn"))],
    ["messages out/s", num(rate("messagesOut"))],
    ["bytes in/s", bytes(rate("bytesIn"))],
    ["bytes out/s", bytes(rate("bytesOut"))],
    ["origin queue", num(sum((x) => x.s.origin_queue_depth))],
    ["slow-consumer closes", num(sum((x) => x.s.slow_consumer_closes_total))],
    ["channels", num(sum((x) => x.s.channels))],
    ["subscriptions", num(sum((x) => x.s.subscriptions))],
  ];
  $("totals").replaceChildren(
    ...cards.map(([k, v]) => el("div", { class: "card", "data-figure": k }, el("div", { class: "v" }, v), el("div", { class: "k" }, k))),
  );
  $("nodes").tBodies[0].replaceChildren(
    ...rows.map(({ n, s, r, error }) => {
      if (!s) return el("tr", {}, el("td", {}, n.node), el("td", { colspan: "9", class: "error" }, error));
      const cell = (v) => el("td", { class: "num" }, v);
      return el(
        "tr",
        { "data-node": n.node },
        el("td", {}, n.self ? `${n.node} (this node)` : n.node),
        cell(num(s.connections)),
        cell(num(r?.messagesIn)),
        cell(num(r?.messagesOut)),
        cell(bytes(r?.bytesIn)),
        cell(bytes(r?.bytesOut)),
        cell(num(s.origin_queue_depth)),
        cell(r && Number.isFinite(r.originMs) ? `${num(r.originMs)} ms` : "–"),
        cell(num(s.slow_consumer_closes_total)),
        el("td", {}, s.draining ? "draining" : "serving"),
      );
    }),
  );
}

// --- connection inspector ---

function definitionList(entries) {
  return el("dl", {}, ...entries.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
}

let inspected = null;

async function inspectConnection(id) {
  const gen = generation;
  inspected = null;
  $("conn-close").hidden = true;
  $("conn-info").replaceChildren();
  try {
    const { body: c } = await api("GET", `/v1/connections/${encodeURIComponent(id)}`);
    if (gen !== generation) return;
    inspected = c.id;
    $("conn-info").replaceChildren(
      definitionList([
        ["id", c.id],
        ["node", c.node],
        ["user", c.user_id ?? "–"],
        ["remote address", c.remote_addr],
        ["path", c.path],
        ["subprotocol", c.subprotocol ?? "– (raw)"],
        ["compression", c.compression ? "permessage-deflate" : "none"],
        ["connected at", c.connected_at],
        ["channels", c.channels.length ? c.channels.join(", ") : "none"],
        ["messages in / out", `${num(c.messages_in)} / ${num(c.messages_out)}`],
        ["bytes in / out", `${bytes(c.bytes_in)} / ${bytes(c.bytes_out)}`],
        ["queued for it", bytes(c.outbound_queued_bytes)],
        ["metadata", c.metadata === undefined || c.metadata === null ? "–" : el("pre", {}, JSON.stringify(c.metadata, null, 2))],
      ]),
    );
    $("conn-close").hidden = false;
  } catch (e) {
    $("conn-result").textContent = e.status === 404 ? `No open connection ${id}.` : e.message;
  }
}

$("conn-find").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  $("conn-result").textContent = "";
  $("conn-list").replaceChildren();
  const id = $("conn-id").value.trim();
  const user = $("conn-user").value.trim();
  if (id) return inspectConnection(id);
  if (!user) return;
  try {
    const { body } = await api("GET", `/v1/connections?user_id=${encodeURIComponent(user)}`);
    const missing = body.unanswered?.length
      ? `Not answered by ${body.unanswered.join(", ")}: their connections are missing. `
      : "";
    $("conn-result").textContent = missing;
    if (!body.connections.length) {
      $("conn-result").textContent = `${missing}User ${user} has no open connection${missing ? " on the nodes that answered" : ""}.`;
      return;
    }
    $("conn-list").replaceChildren(
      el("p", {}, `${body.connections.length} connection(s) of ${user}: `,
        ...body.connections.flatMap((c, i) => [
          i ? ", " : "",
          el("a", { class: "pick", onclick: () => inspectConnection(c.id) }, c.id),
        ])),
    );
    if (body.connections.length === 1) inspectConnection(body.connections[0].id);
  } catch (e) {
    $("conn-result").textContent = e.message;
  }
});

$("conn-close").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  if (!inspected) return;
  const q = new URLSearchParams({ code: $("close-code").value });
  const reason = $("close-reason").value;
  if (reason) q.set("reason", reason);
  try {
    await api("DELETE", `/v1/connections/${encodeURIComponent(inspected)}?${q}`);
    $("conn-result").textContent = `Closing ${inspected} with ${$("close-code").value}.`;
    $("conn-close").hidden = true;
  } catch (e) {
    $("conn-result").textContent = e.message;
  }
});

// --- channel inspector ---

let channel = null;

async function inspectChannel(name) {
  const gen = generation;
  channel = null;
  $("chan-publish").hidden = true;
  $("chan-info").replaceChildren();
  const path = `/v1/channels/${encodeURIComponent(name)}`;
  const optional = (p) => p.then((r) => r.body, (e) => ({ error: e }));
  const [list, presence, history] = await Promise.all([
    api("GET", "/v1/channels").then((r) => r.body),
    optional(api("GET", `${path}/presence`)),
    optional(api("GET", `${path}/messages?limit=20`)),
  ]);
  if (gen !== generation) return;
  const summary = list.channels.find((c) => c.channel === name);
  const parts = [
    definitionList([
      ["channel", name],
      ["on this node", summary ? `epoch ${summary.epoch}, offset ${summary.offset}, ${summary.subscribers} subscriber(s), ${summary.kept} kept` : "no state here"],
      ["presence", presence.error ? presence.error.message : `${presence.clients} connection(s), ${presence.users} user(s)`],
    ]),
  ];
  if (!presence.error && presence.members.length) {
    parts.push(
      el("table", { id: "chan-members" },
        el("thead", {}, el("tr", {}, el("th", {}, "Member"), el("th", {}, "User"))),
        el("tbody", {}, ...presence.members.map((m) => el("tr", {}, el("td", {}, el("a", { class: "pick", onclick: () => inspectConnection(m.client) }, m.client)), el("td", {}, m.user ?? "–"))))),
    );
  }
  if (history.error) {
    parts.push(el("p", {}, `History: ${history.error.message}`));
  } else {
    parts.push(
      el("h3", {}, `Recent history (epoch ${history.epoch}, offset ${history.offset})`),
      el("table", { id: "chan-history" },
        el("thead", {}, el("tr", {}, el("th", {}, "Offset"), el("th", {}, "Time"), el("th", {}, "Message"))),
        el("tbody", {}, ...history.publications.slice().reverse().map((p) =>
          el("tr", {}, el("td", { class: "num" }, p.offset), el("td", {}, new Date(p.time_ms).toLocaleTimeString()),
            el("td", {}, p.text ?? `(binary, base64) ${p.binary}`))))),
    );
  }
  $("chan-info").replaceChildren(...parts);
  // Publishing goes to the channel shown, and only once it is shown.
  channel = name;
  $("chan-publish").hidden = false;
}

$("chan-find").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  $("chan-result").textContent = "";
  try {
    await inspectChannel($("chan-name").value.trim());
  } catch (e) {
    $("chan-result").textContent = e.message;
  }
});

$("chan-publish").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  if (!channel) return;
  try {
    const { body } = await api("POST", `/v1/channels/${encodeURIComponent(channel)}/messages`, { text: $("chan-text").value });
    $("chan-result").textContent = `Published at offset ${body.offset} (epoch ${body.epoch}).`;
    $("chan-text").value = "";
    await inspectChannel(channel);
  } catch (e) {
    $("chan-result").textContent = e.message;
  }
});

if (sessionStorage.getItem(KEY)) start();
else showLogin();
