import { Backoff } from "./backoff.js";
import { Emitter } from "./emitter.js";
import { SwitchboardError } from "./errors.js";
import { Subscription, type SubscriptionHandlers, type SubscriptionOwner } from "./subscription.js";
import { StreamTracker, type TrackerEvent } from "./tracker.js";
import { TRANSPORTS, type Transport, type TransportClosed, type TransportName, type TransportOpen } from "./transport.js";
import { PROTOCOL, WebSocketTransport } from "./websocket.js";
import { SseTransport } from "./sse.js";
import { LongPollTransport } from "./longpoll.js";
import type { FetchFunction } from "./http.js";
import type {
  ChannelMessage,
  ClientState,
  Data,
  DirectMessage,
  DisconnectReason,
  HistoryResult,
  Member,
  PresenceResult,
  PublishResult,
  ResumeError,
  StreamPosition,
  SubscribeResult,
  WebSocketConstructor,
} from "./types.js";

export { PROTOCOL };
/** An `ack` is sent once this many direct messages are unacknowledged… */
export const ACK_BATCH = 32;
/** …or this long after the first unacknowledged one. */
export const ACK_DELAY_MS = 500;
/** Added to twice the ping interval before a silent link is declared dead. */
export const HEARTBEAT_SLACK_MS = 5000;
/** Default of `fallbackTimeoutMs`. */
export const FALLBACK_TIMEOUT_MS = 5000;
/** Default of `fallbackRetryMs`: five minutes. */
export const FALLBACK_RETRY_MS = 5 * 60_000;

export interface ClientOptions {
  /**
   * The transports to try, in order (default `["websocket", "sse", "long-poll"]`).
   * An attempt that fails before the `connected` push, or gets none within
   * `fallbackTimeoutMs`, goes on with the next one at once.
   */
  transports?: TransportName[];
  /** How long a transport that is not the last one may take to get the `connected` push before the next is tried (default 5 s). */
  fallbackTimeoutMs?: number;
  /**
   * A client that fell back keeps the transport that worked; its first
   * reconnect after this long tries the earlier ones again (default 5 min).
   */
  fallbackRetryMs?: number;
  /** The WebSocket constructor (default `globalThis.WebSocket`; on Node < 22 pass the `ws` package's). Needed only with the `websocket` transport. */
  WebSocket?: WebSocketConstructor;
  /** The `fetch` of the HTTP transports (default `globalThis.fetch`). */
  fetch?: FetchFunction;
  /**
   * Whether the HTTP transports send cookies (`fetch`'s `credentials`,
   * default `"same-origin"`). `"include"` sends them to a gateway on another
   * site too, for a cookie token; the gateway allows that only for origins
   * in its `allowed-origins`.
   */
  fetchCredentials?: RequestCredentials;
  /** A client token, sent as the `token` query parameter of every handshake (see `tokenIn`). */
  token?: string;
  /**
   * Where a WebSocket carries the token: `"query"` (default: `?token=`) or
   * `"frame"` (an `authenticate` command as the first frame, so that the
   * token stays out of URLs and access logs). The HTTP fallbacks always use
   * the query.
   */
  tokenIn?: "query" | "frame";
  /**
   * Called before each connection attempt, and when the gateway announces the
   * token's expiry (`refresh` push; the result is then sent with `refresh`).
   * Takes precedence over `token`.
   */
  getToken?: () => string | Promise<string>;
  /** Upper bound of the first reconnect delay (default 250 ms). */
  backoffInitialMs?: number;
  /** Largest upper bound of a reconnect delay (default 10 s). */
  backoffMaxMs?: number;
  /** A connection that stayed up this long starts the backoff over (default 5 s). */
  backoffResetAfterMs?: number;
  /** Bound of one attempt: handshake and the `connected` push (default 10 s). */
  connectTimeoutMs?: number;
  /** Bound of every command, waiting for a connection included (default 10 s). */
  commandTimeoutMs?: number;
  /** Commands that may wait for a connection; more fail with `queue_full` (default 1024). */
  maxQueuedCommands?: number;
  /** Listen to `online`, `offline` and `visibilitychange` when `globalThis.addEventListener` exists (default true). */
  browserEvents?: boolean;
}

/** The client-wide events (see README.md). */
export interface ClientEvents {
  /** The state changed. */
  state: (state: ClientState) => void;
  /** The client's first connection is up. */
  connected: (event: { clientId: string; node: string }) => void;
  /** A connection came up over another transport than the previous one (also the first time). Comes before `connected`, `resumed` or `restarted`. */
  transport: (event: { transport: TransportName; previous?: TransportName }) => void;
  /** A transport failed before its `connected` push: the next one is tried at once. */
  fallback: (event: { from: TransportName; to: TransportName; error: SwitchboardError }) => void;
  /** A reconnect resumed the session: same `clientId`, nothing lost. */
  resumed: (event: { clientId: string; node: string }) => void;
  /** A reconnect started a new session: new `clientId`; `error` says why the gateway refused the resume (absent when it keeps no sessions). */
  restarted: (event: { clientId: string; node: string; error?: ResumeError }) => void;
  /** An established connection ended; the next attempt starts in `retryInMs`. */
  disconnected: (event: { reason: DisconnectReason; retryInMs: number }) => void;
  /** An attempt failed in a retryable way. */
  connectFailed: (event: { error: SwitchboardError; retryInMs: number }) => void;
  /** A direct message, exactly once and in order within a session. */
  direct: (message: DirectMessage) => void;
  /** The token expires soon (`refresh` push). With `getToken` the SDK refreshes by itself; otherwise call `refresh(token)`. */
  tokenExpiring: (event: { expiresAtMs: number }) => void;
  /** A refresh done with `getToken` failed. */
  tokenRefreshFailed: (error: unknown) => void;
  /** The server subscribed this connection (also while the client was away: reported after `resumed`). */
  serverSubscribed: (event: { channel: string; epoch: string; offset: number }) => void;
  /** The server unsubscribed this connection from a channel without a client-side Subscription. */
  serverUnsubscribed: (event: { channel: string }) => void;
  /** A message of a channel without a client-side Subscription (server-side subscriptions). */
  message: (message: ChannelMessage) => void;
  join: (event: { channel: string; member: Member }) => void;
  leave: (event: { channel: string; member: Member }) => void;
  /** The client stopped for good (handshake refused in a way not retried). `closed` follows. */
  failed: (error: SwitchboardError) => void;
  /** The client is closed (by `close()` or after `failed`). */
  closed: () => void;
}

interface Call {
  cmd: string;
  fields: Record<string, unknown>;
  retrySafe: boolean;
  resolve: (value: any) => void;
  reject: (error: SwitchboardError) => void;
  timer: ReturnType<typeof setTimeout> | undefined;
  settled: boolean;
  id?: number;
}

interface SubEntry {
  sub: Subscription;
  tracker: StreamTracker;
  /** The gateway confirmed it in the current session. */
  inSession: boolean;
  /** The first subscribe, until confirmed. */
  confirm?: { resolve: (s: Subscription) => void; reject: (e: SwitchboardError) => void; timer: ReturnType<typeof setTimeout> };
}

type Inflight =
  | { kind: "call"; call: Call }
  | { kind: "subscribe"; channel: string; entry: SubEntry }
  | { kind: "serverResubscribe"; channel: string }
  | { kind: "unsubscribe"; channel: string; done?: () => void }
  | { kind: "heartbeat" };

interface Conn {
  transport: Transport;
  name: TransportName;
  /** Its place in `transports`. */
  index: number;
  /** Where the round of attempts it belongs to started in `transports`. */
  roundStart: number;
  /** The token of the round (from `getToken` or `token`). */
  token?: string;
  welcomed: boolean;
  ended: boolean;
  lastRx: number;
  upSince: number;
  pingOutstanding: boolean;
  connectTimer?: ReturnType<typeof setTimeout>;
  heartbeatTimer?: ReturnType<typeof setInterval>;
}

interface Session {
  /** The resume token. */
  token?: string;
  /** The highest direct `seq` received. */
  received: number;
  /** The highest acknowledged (or known to the gateway from a resume). */
  acked: number;
}

interface ConnectedPush {
  push: "connected";
  client: string;
  node: string;
  version?: number;
  ping_interval_ms?: number;
  session?: string;
  session_ttl_ms?: number;
  resumed?: boolean;
  channels?: { channel: string; epoch: string; offset: number }[];
  resume_error?: ResumeError;
}

const noop = () => {};

/** Handshake refusal codes (a `4006` close's reason starts with one) after which trying again later may succeed. */
const RETRYABLE_REFUSALS = new Set([
  "auth_unavailable",
  "origin_unavailable",
  "origin_backlog",
  "node_cut_off",
  "over_capacity",
  "too_many_connections_from_ip",
  "too_many_handshakes",
  "too_many_connections_for_user",
  "draining",
  "handshake_timeout",
]);

/**
 * A client of Switchboard's native protocol. Construct it, attach listeners,
 * then `connect()`. It keeps one connection (a WebSocket, or an HTTP
 * fallback: SSE, long-polling), reconnects with backoff, resumes its
 * session, and recovers its channels (see README.md).
 */
export class SwitchboardClient extends Emitter<ClientEvents> implements SubscriptionOwner {
  private readonly url: string;
  private readonly WS?: WebSocketConstructor;
  private readonly fetchFn?: FetchFunction;
  private readonly transports: TransportName[];
  private readonly opts: Required<Omit<ClientOptions, "WebSocket" | "fetch" | "token" | "getToken" | "transports">>;
  private readonly getToken?: () => string | Promise<string>;
  private token?: string;

  private _state: ClientState = "disconnected";
  private started = false;
  private connectedBefore = false;
  private terminal?: SwitchboardError;
  private conn?: Conn;
  private reconnectTimer?: ReturnType<typeof setTimeout>;
  private readonly backoff: Backoff;
  private nextCommandId = 1;

  private session: Session = { received: 0, acked: 0 };
  private ackTimer?: ReturnType<typeof setTimeout>;
  private _clientId?: string;
  private _node?: string;

  private queue: Call[] = [];
  private inflight = new Map<number, Inflight>();
  private subs = new Map<string, SubEntry>();
  /** Server-side subscriptions and the last position seen of each. */
  private serverSubs = new Map<string, StreamPosition>();
  /** Channels left while disconnected (or whose unsubscribe was lost) that a resumed session may still hold. */
  private leave = new Set<string>();
  /** Channels with an unsubscribe in flight: their messages are dropped. */
  private unsubscribing = new Map<string, number>();

  private firstConnection: Promise<{ clientId: string; node: string }>;
  private resolveFirst!: (v: { clientId: string; node: string }) => void;
  private rejectFirst!: (e: SwitchboardError) => void;
  private browserListeners: [string, () => void][] = [];
  /** Open browser sockets given up without a close frame (see `WebSocketTransport.drop`). */
  private abandoned = new Set<Transport>();
  /** The transport of the last connection that came up. */
  private _transport?: TransportName;
  /** Where the next round of attempts starts in `transports`: the one that worked last. */
  private preferred = 0;
  /** When a round last tried the first transport and settled on a later one. */
  private fellBackAt = 0;

  constructor(url: string, options: ClientOptions = {}) {
    super();
    this.url = url;
    const transports = [...(options.transports ?? TRANSPORTS)];
    if (transports.length === 0) throw new TypeError("options.transports is empty");
    for (const t of transports) {
      if (!TRANSPORTS.includes(t)) throw new TypeError(`unknown transport "${t}": one of ${TRANSPORTS.join(", ")}`);
    }
    if (new Set(transports).size !== transports.length) throw new TypeError("options.transports names a transport twice");
    this.transports = transports;
    if (transports.includes("websocket")) {
      const WS = options.WebSocket ?? (globalThis as any).WebSocket;
      if (typeof WS !== "function") {
        throw new TypeError(
          "no WebSocket constructor: pass options.WebSocket (for example the `ws` package's) on Node < 22, or leave \"websocket\" out of options.transports",
        );
      }
      this.WS = WS;
    }
    if (transports.some((t) => t !== "websocket")) {
      const f = options.fetch ?? (globalThis as any).fetch;
      if (typeof f !== "function") throw new TypeError("no fetch function for the HTTP transports: pass options.fetch");
      this.fetchFn = options.fetch ?? ((input, init) => (globalThis as any).fetch(input, init));
    }
    this.token = options.token;
    this.getToken = options.getToken;
    this.opts = {
      fallbackTimeoutMs: options.fallbackTimeoutMs ?? FALLBACK_TIMEOUT_MS,
      fallbackRetryMs: options.fallbackRetryMs ?? FALLBACK_RETRY_MS,
      tokenIn: options.tokenIn ?? "query",
      fetchCredentials: options.fetchCredentials ?? "same-origin",
      backoffInitialMs: options.backoffInitialMs ?? 250,
      backoffMaxMs: options.backoffMaxMs ?? 10_000,
      backoffResetAfterMs: options.backoffResetAfterMs ?? 5_000,
      connectTimeoutMs: options.connectTimeoutMs ?? 10_000,
      commandTimeoutMs: options.commandTimeoutMs ?? 10_000,
      maxQueuedCommands: options.maxQueuedCommands ?? 1024,
      browserEvents: options.browserEvents ?? true,
    };
    this.backoff = new Backoff(this.opts.backoffInitialMs, this.opts.backoffMaxMs);
    this.firstConnection = new Promise((resolve, reject) => {
      this.resolveFirst = resolve;
      this.rejectFirst = reject;
    });
    this.firstConnection.catch(noop);
  }

  /** Where the connection stands. */
  get state(): ClientState {
    return this._state;
  }

  /** The current connection's id (kept by a resumed session), once connected. */
  get clientId(): string | undefined {
    return this._clientId;
  }

  /** The node of the current connection, once connected. */
  get node(): string | undefined {
    return this._node;
  }

  /** The transport of the current connection (of the last one while disconnected); undefined before the first. */
  get transport(): TransportName | undefined {
    return this._transport;
  }

  /**
   * Starts connecting (once; later calls return the same promise), and
   * resolves when the first connection is up. Rejects if the client fails
   * for good or is closed first.
   */
  connect(): Promise<{ clientId: string; node: string }> {
    if (!this.started && this._state !== "closed") {
      this.started = true;
      this.listenToBrowser();
      void this.attempt();
    }
    return this.firstConnection;
  }

  // ---------------------------------------------------------------- commands

  /** Subscribes to `channel`; resolves once the gateway confirmed. `handlers` are attached before anything can be emitted. */
  subscribe(channel: string, handlers: SubscriptionHandlers = {}): Promise<Subscription> {
    if (this._state === "closed") return Promise.reject(this.closedError("subscribe"));
    if (this.subs.has(channel)) {
      return Promise.reject(new SwitchboardError("already_subscribed", `already subscribed to ${channel}`, { command: "subscribe" }));
    }
    const sub = new Subscription(channel, this, handlers);
    const tracker = new StreamTracker();
    sub.positionRef = () => tracker.position;
    const entry: SubEntry = { sub, tracker, inSession: false };
    return new Promise<Subscription>((resolve, reject) => {
      const timer = setTimeout(() => {
        if (this.subs.get(channel) !== entry) return;
        this.subs.delete(channel);
        sub.active = false;
        entry.confirm = undefined;
        // The gateway may have run it: leave it.
        if (this.isConnected()) this.sendUnsubscribe(channel);
        else this.leave.add(channel);
        reject(new SwitchboardError("timeout", `subscribe: no reply within ${this.opts.commandTimeoutMs} ms`, { command: "subscribe" }));
      }, this.opts.commandTimeoutMs);
      entry.confirm = { resolve, reject, timer };
      this.subs.set(channel, entry);
      this.leave.delete(channel);
      if (this.isConnected()) this.sendSubscribe(entry);
    });
  }

  /** Publishes to `channel`. Fails with `connection_lost` if the connection dropped before the reply (it may have been published). */
  async publish(channel: string, data: Data | ArrayBuffer): Promise<PublishResult> {
    const r = await this.call("publish", { channel, ...encodeData(data) }, false);
    return { offset: r.offset, epoch: r.epoch };
  }

  /** Who is subscribed to `channel` (namespaces with `presence`). */
  async presence(channel: string): Promise<PresenceResult> {
    const r = await this.call("presence", { channel }, true);
    return { members: r.members ?? [], clients: r.clients, users: r.users };
  }

  /** The messages `channel` keeps (namespaces with `history-size`): the newest `limit`, or those after `since`. */
  async history(channel: string, options: { since?: StreamPosition; limit?: number } = {}): Promise<HistoryResult> {
    const fields: Record<string, unknown> = { channel };
    if (options.since) fields.since = { offset: options.since.offset, epoch: options.since.epoch };
    if (options.limit !== undefined) fields.limit = options.limit;
    const r = await this.call("history", fields, true);
    const out: HistoryResult = {
      epoch: r.epoch,
      offset: r.offset,
      publications: (r.publications ?? []).map((p: any) => ({ offset: p.offset, time_ms: p.time_ms, data: decodeData(p) })),
    };
    if (typeof r.recovered === "boolean") out.recovered = r.recovered;
    return out;
  }

  /** A message for the origin (a `message` event). Fails with `connection_lost` if the connection dropped before the reply. */
  async send(data: Data | ArrayBuffer): Promise<void> {
    await this.call("send", encodeData(data), false);
  }

  /** An application-level round trip; resolves with its duration in ms. */
  async ping(): Promise<number> {
    const start = Date.now();
    await this.call("ping", {}, true);
    return Date.now() - start;
  }

  /** Replaces the connection's token (and the one later handshakes use); resolves with the new expiry (0: none). */
  async refresh(token: string): Promise<{ expiresAtMs: number }> {
    const r = await this.call("refresh", { token }, true);
    this.token = token;
    return { expiresAtMs: r.expires_at_ms ?? 0 };
  }

  /**
   * Leaves `channel`: a client-side subscription as `sub.unsubscribe()`
   * does, or a server-side one (made by the origin or the control API; the
   * gateway's `unsubscribe` ends those too). Resolves once the gateway
   * confirmed, or at once when disconnected (a resumed session then leaves
   * it).
   */
  unsubscribe(channel: string): Promise<void> {
    if (this._state === "closed") return Promise.reject(this.closedError("unsubscribe"));
    const entry = this.subs.get(channel);
    if (entry) return this.unsubscribeFor(entry.sub);
    this.serverSubs.delete(channel);
    return this.leaveChannel(channel);
  }

  /**
   * Ends the session on purpose and stops for good: a closing handshake
   * (1000) on a WebSocket, `DELETE ?session=` on the HTTP fallbacks.
   * Resolves once done (at most about a second).
   */
  close(): Promise<void> {
    if (this._state === "closed") return Promise.resolve();
    const conn = this.conn;
    this.shutdown(this.closedError("close"));
    this.emit("closed");
    if (!conn) return Promise.resolve();
    return conn.transport.end(1000, "client closed");
  }

  /** @internal Subscription.unsubscribe. */
  unsubscribeFor(sub: Subscription): Promise<void> {
    const entry = this.subs.get(sub.channel);
    sub.active = false;
    if (!entry || entry.sub !== sub) return Promise.resolve();
    this.subs.delete(sub.channel);
    if (entry.confirm) {
      clearTimeout(entry.confirm.timer);
      entry.confirm = undefined;
    }
    return this.leaveChannel(sub.channel);
  }

  /** Sends `unsubscribe` and waits for the reply, or leaves `channel` on the next resume when disconnected. */
  private leaveChannel(channel: string): Promise<void> {
    if (!this.isConnected()) {
      this.leave.add(channel);
      return Promise.resolve();
    }
    return new Promise<void>((resolve, reject) => {
      const timer = setTimeout(
        () => reject(new SwitchboardError("timeout", `unsubscribe: no reply within ${this.opts.commandTimeoutMs} ms`, { command: "unsubscribe" })),
        this.opts.commandTimeoutMs,
      );
      this.sendUnsubscribe(channel, () => {
        clearTimeout(timer);
        resolve();
      });
    });
  }

  // -------------------------------------------------------------- connecting

  private setState(state: ClientState): void {
    if (this._state === state) return;
    this._state = state;
    this.emit("state", state);
  }

  private isClosed(): boolean {
    return this._state === "closed";
  }

  private isConnected(): boolean {
    return this._state === "connected" && this.conn !== undefined && this.conn.welcomed && !this.conn.ended;
  }

  /** A round of attempts: the transports from the preferred one on, each tried once, until one gets its `connected` push. */
  private async attempt(): Promise<void> {
    this.reconnectTimer = undefined;
    if (this.isClosed()) return;
    this.setState("connecting");
    let token = this.token;
    if (this.getToken) {
      try {
        token = await this.getToken();
        this.token = token;
      } catch (e) {
        if (this.isClosed()) return;
        this.retryLater(new SwitchboardError("protocol", `getToken failed: ${errorMessage(e)}`));
        return;
      }
      if (this.isClosed()) return;
    }
    let start = this.preferred;
    if (start > 0 && Date.now() - this.fellBackAt >= this.opts.fallbackRetryMs) start = 0;
    this.open(start, start, token);
  }

  /** Opens `transports[index]`. */
  private open(index: number, roundStart: number, token: string | undefined): void {
    const name = this.transports[index];
    const conn: Conn = {
      transport: undefined as unknown as Transport,
      name,
      index,
      roundStart,
      token,
      welcomed: false,
      ended: false,
      lastRx: Date.now(),
      upSince: 0,
      pingOutstanding: false,
    };
    const tokenInFrame = name === "websocket" && this.opts.tokenIn === "frame";
    const open: TransportOpen = {
      url: this.url,
      listener: {
        frame: (text) => this.onFrame(conn, text),
        alive: () => {
          if (!conn.ended) conn.lastRx = Date.now();
        },
        closed: (event) => this.onTransportClosed(conn, event),
      },
    };
    if (token && !tokenInFrame) open.token = token;
    if (this.session.token) open.resume = { token: this.session.token, received: this.session.received };
    try {
      conn.transport = this.createTransport(name, open);
    } catch (e) {
      this.fail(new SwitchboardError("protocol", `cannot open a ${name} connection: ${errorMessage(e)}`));
      return;
    }
    this.conn = conn;
    if (tokenInFrame && token) {
      // The first frame. On a resumed session the gateway needs none and answers it `bad_command`, which nothing waits for.
      conn.transport.send(JSON.stringify({ id: this.nextId(), cmd: "authenticate", token }));
    }
    const last = index === this.transports.length - 1;
    const timeoutMs = last ? this.opts.connectTimeoutMs : Math.min(this.opts.fallbackTimeoutMs, this.opts.connectTimeoutMs);
    conn.connectTimer = setTimeout(() => {
      this.attemptFailed(conn, new SwitchboardError("timeout", `no \`connected\` push over ${name} within ${timeoutMs} ms`));
    }, timeoutMs);
  }

  private createTransport(name: TransportName, open: TransportOpen): Transport {
    switch (name) {
      case "websocket":
        return new WebSocketTransport(this.WS!, open);
      case "sse":
        return new SseTransport(this.fetchFn!, open, this.opts.fetchCredentials);
      case "long-poll":
        return new LongPollTransport(this.fetchFn!, open, this.opts.fetchCredentials);
    }
  }

  private onTransportClosed(conn: Conn, event: TransportClosed): void {
    if (conn.ended) return;
    if (conn.welcomed) {
      const reason: DisconnectReason =
        event.code !== undefined
          ? { kind: "closed", code: event.code, reason: event.reason }
          : { kind: "network", message: event.error?.message ?? event.reason };
      this.lost(conn, reason);
      return;
    }
    let error = event.error;
    if (!error && (event.code === 4005 || event.code === 4006)) {
      // The `authenticate` flow: the reason starts with the code an HTTP refusal would carry.
      const code = /^[a-z_]+/.exec(event.reason)?.[0] ?? "";
      error = new SwitchboardError(RETRYABLE_REFUSALS.has(code) ? "protocol" : "refused", `authentication refused (${event.code}): ${event.reason}`);
    }
    error ??= new SwitchboardError("protocol", `the connection closed before the \`connected\` push (code ${event.code ?? "none"})`);
    this.attemptFailed(conn, error, event.unreachable === true);
  }

  /**
   * An attempt that did not get its `connected` push: the next transport, or
   * the next round after a backoff, or the end. An HTTP transport that could
   * not reach the host at all (`unreachable`) ends the round: the network is
   * down, and the next transport would only land by chance on a network that
   * just came back, and be kept for `fallbackRetryMs`.
   */
  private attemptFailed(conn: Conn, error: SwitchboardError, unreachable = false): void {
    if (conn.ended) return;
    this.endConn(conn);
    this.dropConn(conn);
    const next = conn.index + 1 < this.transports.length && !(unreachable && conn.name !== "websocket") ? conn.index + 1 : undefined;
    if (this.isTerminal(conn, error, next !== undefined)) {
      this.fail(error);
      return;
    }
    if (next !== undefined) {
      this.emit("fallback", { from: conn.name, to: this.transports[next], error });
      if (!this.isClosed()) this.open(next, conn.roundStart, conn.token);
      return;
    }
    this.preferred = 0; // nothing worked: the next round starts from the first transport again
    this.retryLater(error);
  }

  /**
   * Whether a failed attempt ends the client: a refusal (`refused`: 401,
   * 403, other 4xx but 408/429/426; a refused `authenticate`) or a gateway
   * without the native protocol. A WebSocket refused with another status
   * than 401 falls back instead when a transport follows: a proxy may be
   * what refused the upgrade.
   */
  private isTerminal(conn: Conn, error: SwitchboardError, more: boolean): boolean {
    if (error.code === "unsupported_protocol") return true;
    if (error.code !== "refused") return false;
    if (conn.name === "websocket" && more && error.status !== undefined && error.status !== 401) return false;
    return true;
  }

  private retryLater(error: SwitchboardError): void {
    const retryInMs = this.backoff.next();
    this.setState("disconnected");
    this.emit("connectFailed", { error, retryInMs });
    this.schedule(retryInMs);
  }

  private schedule(delayMs: number): void {
    if (this.isClosed()) return;
    clearTimeout(this.reconnectTimer);
    this.reconnectTimer = setTimeout(() => void this.attempt(), delayMs);
  }

  /** Stops listening to a connection and its timers. */
  private endConn(conn: Conn): void {
    conn.ended = true;
    clearTimeout(conn.connectTimer);
    clearInterval(conn.heartbeatTimer);
    if (this.conn === conn) this.conn = undefined;
  }

  /**
   * Gives a connection up without ending its session (see
   * `WebSocketTransport.drop`): a browser socket that must stay open is kept
   * until it closes by itself, a new session starts, or `close()`.
   */
  private dropConn(conn: Conn): void {
    const transport = conn.transport;
    if (transport.drop(() => this.abandoned.delete(transport))) this.abandoned.add(transport);
  }

  /**
   * Closes the browser sockets given up earlier: once a new session started
   * (theirs is not ours any more), or on `close()`.
   */
  private closeAbandoned(): void {
    for (const transport of this.abandoned) void transport.end(1000, "superseded");
    this.abandoned.clear();
  }

  /** An established connection ended. */
  private lost(conn: Conn, reason: DisconnectReason): void {
    if (conn.ended) return;
    const upFor = Date.now() - conn.upSince;
    this.endConn(conn);
    this.dropConn(conn);
    this.connectionLost();
    if (upFor >= this.opts.backoffResetAfterMs) this.backoff.reset();
    const retryInMs = this.backoff.next();
    this.setState("disconnected");
    this.emit("disconnected", { reason, retryInMs });
    this.schedule(retryInMs);
  }

  // ------------------------------------------------------------ a connection

  private onFrame(conn: Conn, data: string): void {
    if (conn.ended) return;
    conn.lastRx = Date.now();
    conn.pingOutstanding = false;
    let frame: any;
    try {
      frame = JSON.parse(data);
    } catch {
      return;
    }
    if (frame === null || typeof frame !== "object") return;
    if (!conn.welcomed) {
      if (frame.push === "connected" && typeof frame.client === "string") this.welcome(conn, frame as ConnectedPush);
      else this.attemptFailed(conn, new SwitchboardError("protocol", "the first frame was not the `connected` push"));
      return;
    }
    if (typeof frame.push === "string") this.onPush(frame);
    else if (typeof frame.id === "number") this.onReply(frame.id, frame);
    // An error without an id answers a frame that was not a command: nothing waits for it.
  }

  private welcome(conn: Conn, push: ConnectedPush): void {
    conn.welcomed = true;
    conn.upSince = Date.now();
    clearTimeout(conn.connectTimer);
    const clientId = push.client;
    const node = push.node ?? "";
    const resumed = push.resumed === true;
    this._clientId = clientId;
    this._node = node;
    const previous = this._transport;
    this._transport = conn.name;
    this.preferred = conn.index;
    if (conn.roundStart === 0 && conn.index > 0) this.fellBackAt = Date.now();
    if (resumed) {
      // The gateway forgot what it re-sends after `received`.
      this.session.acked = this.session.received;
    } else {
      this.newSession();
      this.closeAbandoned();
    }
    this.session.token = push.session;
    this.setState("connected");
    if (previous !== conn.name) {
      const event: { transport: TransportName; previous?: TransportName } = { transport: conn.name };
      if (previous) event.previous = previous;
      this.emit("transport", event);
    }
    if (resumed) this.emit("resumed", { clientId, node });
    else if (this.connectedBefore) {
      const event: { clientId: string; node: string; error?: ResumeError } = { clientId, node };
      if (push.resume_error) event.error = { code: push.resume_error.code, message: push.resume_error.message };
      this.emit("restarted", event);
    } else this.emit("connected", { clientId, node });
    if (!this.connectedBefore) {
      this.connectedBefore = true;
      this.resolveFirst({ clientId, node });
    }
    if (conn.ended) return; // a listener closed the client
    // Resubscribe first, so that queued publishes to those channels come back to us; then flush the queue.
    if (resumed) this.resumeChannels(push.channels ?? []);
    else for (const entry of [...this.subs.values()]) this.sendSubscribe(entry);
    const queued = this.queue;
    this.queue = [];
    for (const call of queued) this.sendCall(call);
    this.startHeartbeat(conn, push.ping_interval_ms ?? 0);
  }

  /** A new session (the first, or after a resume was refused): nothing of the old one holds any more. */
  private newSession(): void {
    clearTimeout(this.ackTimer);
    this.ackTimer = undefined;
    this.session = { received: 0, acked: 0 };
    this.serverSubs.clear();
    this.leave.clear();
    for (const entry of this.subs.values()) entry.inSession = false;
  }

  /**
   * Gets a resumed session's channels flowing again: each parked one is
   * subscribed again with `since` (the client's own position, or where the
   * session stood); client-side subscriptions the session no longer holds
   * were removed by the server meanwhile; channels it holds that the client
   * does not know are server-side subscriptions made meanwhile; channels the
   * client left meanwhile are left.
   */
  private resumeChannels(channels: { channel: string; epoch: string; offset: number }[]): void {
    const listed = new Set(channels.map((c) => c.channel));
    for (const channel of [...this.subs.keys()].sort()) {
      const entry = this.subs.get(channel)!;
      if (entry.inSession && !listed.has(channel)) this.serverUnsubscribed(channel);
      else this.sendSubscribe(entry);
    }
    for (const channel of [...this.serverSubs.keys()].sort()) {
      if (!listed.has(channel)) {
        this.serverSubs.delete(channel);
        this.emit("serverUnsubscribed", { channel });
      }
    }
    const left = this.leave;
    this.leave = new Set();
    for (const { channel, epoch, offset } of channels) {
      if (this.subs.has(channel)) continue;
      if (left.has(channel)) {
        this.sendUnsubscribe(channel);
        continue;
      }
      let since = this.serverSubs.get(channel);
      if (!since) {
        since = { offset, epoch };
        this.serverSubs.set(channel, since);
        this.emit("serverSubscribed", { channel, epoch, offset });
      }
      const id = this.nextId();
      this.inflight.set(id, { kind: "serverResubscribe", channel });
      this.sendFrame({ id, cmd: "subscribe", channel, since: { offset: since.offset, epoch: since.epoch } });
    }
  }

  private startHeartbeat(conn: Conn, pingIntervalMs: number): void {
    if (!(pingIntervalMs > 0)) return;
    const deadAfter = 2 * pingIntervalMs + HEARTBEAT_SLACK_MS;
    const tick = Math.max(50, Math.min(pingIntervalMs / 2, 5000));
    conn.heartbeatTimer = setInterval(() => {
      if (conn.ended) return;
      const idle = Date.now() - conn.lastRx;
      if (idle >= deadAfter) {
        this.lost(conn, { kind: "heartbeat_timeout", afterMs: deadAfter });
      } else if (idle >= pingIntervalMs && !conn.pingOutstanding) {
        // Browsers do not show the gateway's pings: a `ping` command proves the link instead.
        this.sendHeartbeat(conn);
      }
    }, tick);
  }

  private sendHeartbeat(conn: Conn): void {
    conn.pingOutstanding = true;
    const id = this.nextId();
    this.inflight.set(id, { kind: "heartbeat" });
    this.sendFrame({ id, cmd: "ping" });
  }

  private nextId(): number {
    const id = this.nextCommandId;
    this.nextCommandId = id >= Number.MAX_SAFE_INTEGER ? 1 : id + 1;
    return id;
  }

  private sendFrame(frame: Record<string, unknown>): void {
    const conn = this.conn;
    if (!conn || conn.ended) return;
    try {
      conn.transport.send(JSON.stringify(frame));
    } catch (e) {
      this.lost(conn, { kind: "network", message: errorMessage(e) });
    }
  }

  private sendSubscribe(entry: SubEntry): void {
    const channel = entry.sub.channel;
    const since = entry.tracker.beginSubscribe();
    const id = this.nextId();
    this.inflight.set(id, { kind: "subscribe", channel, entry });
    this.sendFrame(since ? { id, cmd: "subscribe", channel, since } : { id, cmd: "subscribe", channel });
  }

  private sendUnsubscribe(channel: string, done?: () => void): void {
    const id = this.nextId();
    this.unsubscribing.set(channel, (this.unsubscribing.get(channel) ?? 0) + 1);
    this.inflight.set(id, { kind: "unsubscribe", channel, done });
    this.sendFrame({ id, cmd: "unsubscribe", channel });
  }

  private call(cmd: string, fields: Record<string, unknown>, retrySafe: boolean): Promise<any> {
    if (this._state === "closed") return Promise.reject(this.closedError(cmd));
    return new Promise((resolve, reject) => {
      const call: Call = { cmd, fields, retrySafe, resolve, reject, timer: undefined, settled: false };
      call.timer = setTimeout(() => {
        if (call.settled) return;
        call.settled = true;
        this.queue = this.queue.filter((c) => c !== call);
        if (call.id !== undefined) this.inflight.delete(call.id);
        reject(new SwitchboardError("timeout", `${cmd}: no reply within ${this.opts.commandTimeoutMs} ms`, { command: cmd }));
      }, this.opts.commandTimeoutMs);
      if (this.isConnected()) {
        this.sendCall(call);
      } else if (this.queue.length >= this.opts.maxQueuedCommands) {
        this.settle(call, new SwitchboardError("queue_full", `${this.opts.maxQueuedCommands} commands already wait for a connection`, { command: cmd }));
      } else {
        this.queue.push(call);
      }
    });
  }

  private sendCall(call: Call): void {
    if (call.settled) return;
    const id = this.nextId();
    call.id = id;
    this.inflight.set(id, { kind: "call", call });
    this.sendFrame({ id, cmd: call.cmd, ...call.fields });
  }

  private settle(call: Call, error: SwitchboardError | null, value?: unknown): void {
    if (call.settled) return;
    call.settled = true;
    clearTimeout(call.timer);
    if (error) call.reject(error);
    else call.resolve(value);
  }

  private onReply(id: number, frame: any): void {
    const inflight = this.inflight.get(id);
    if (!inflight) return;
    this.inflight.delete(id);
    const error = frame.error
      ? (command: string) => new SwitchboardError(String(frame.error.code), String(frame.error.message ?? ""), { command })
      : undefined;
    switch (inflight.kind) {
      case "call":
        if (error) this.settle(inflight.call, error(inflight.call.cmd));
        else this.settle(inflight.call, null, frame.result ?? {});
        break;
      case "subscribe":
        this.onSubscribeReply(inflight.channel, inflight.entry, error?.("subscribe"), frame.result);
        break;
      case "serverResubscribe":
        if (error && this.serverSubs.delete(inflight.channel)) {
          this.emit("serverUnsubscribed", { channel: inflight.channel });
        }
        break;
      case "unsubscribe": {
        const n = (this.unsubscribing.get(inflight.channel) ?? 1) - 1;
        if (n > 0) this.unsubscribing.set(inflight.channel, n);
        else this.unsubscribing.delete(inflight.channel);
        inflight.done?.();
        break;
      }
      case "heartbeat":
        break;
    }
  }

  private onSubscribeReply(channel: string, entry: SubEntry, error: SwitchboardError | undefined, result: any): void {
    if (this.subs.get(channel) !== entry) return; // unsubscribed or given up meanwhile
    if (error) {
      this.subs.delete(channel);
      entry.sub.active = false;
      if (entry.confirm) {
        clearTimeout(entry.confirm.timer);
        entry.confirm.reject(error);
        entry.confirm = undefined;
      } else {
        entry.sub.dispatch("failed", error);
      }
      return;
    }
    entry.inSession = true;
    const reply: SubscribeResult = { epoch: String(result?.epoch ?? ""), offset: Number(result?.offset ?? 0) };
    if (typeof result?.recovered === "boolean") reply.recovered = result.recovered;
    if (typeof result?.missed === "number") reply.missed = result.missed;
    const confirm = entry.confirm;
    entry.confirm = undefined;
    if (confirm) {
      clearTimeout(confirm.timer);
      confirm.resolve(entry.sub);
    }
    entry.tracker.onSubscribed(reply, (e) => this.dispatchTracker(entry, e));
  }

  private dispatchTracker(entry: SubEntry, e: TrackerEvent): void {
    switch (e.type) {
      case "subscribed": {
        const ev: { epoch: string; offset: number; recovered?: boolean; missed?: number } = { epoch: e.epoch, offset: e.offset };
        if (e.recovered !== undefined) ev.recovered = e.recovered;
        if (e.missed !== undefined) ev.missed = e.missed;
        entry.sub.dispatch("subscribed", ev);
        break;
      }
      case "message":
        entry.sub.dispatch("message", e.message);
        break;
      case "gap":
        entry.sub.dispatch("gap", { last: e.last, resumed: e.resumed });
        break;
    }
  }

  /** The server ended the client-side subscription to `channel`. */
  private serverUnsubscribed(channel: string): void {
    const entry = this.subs.get(channel);
    if (!entry) return;
    this.subs.delete(channel);
    if (entry.confirm) {
      clearTimeout(entry.confirm.timer);
      entry.confirm.reject(new SwitchboardError("protocol", "the server unsubscribed the channel before confirming it", { command: "subscribe" }));
      entry.confirm = undefined;
    }
    entry.sub.dispatch("unsubscribed");
  }

  private onPush(push: any): void {
    switch (push.push) {
      case "message": {
        const message: ChannelMessage = { channel: push.channel, offset: push.offset, epoch: push.epoch, data: decodeData(push) };
        const entry = this.subs.get(message.channel);
        if (entry) {
          entry.tracker.onMessage(message, (e) => this.dispatchTracker(entry, e));
        } else if (!this.unsubscribing.has(message.channel)) {
          // A server-side subscription: its position is kept for a resume, and what a resume replays twice is dropped.
          const last = this.serverSubs.get(message.channel);
          if (last && last.epoch === message.epoch && message.offset <= last.offset) return;
          this.serverSubs.set(message.channel, { offset: message.offset, epoch: message.epoch });
          this.emit("message", message);
        }
        break;
      }
      case "join":
      case "leave": {
        const entry = this.subs.get(push.channel);
        if (entry) entry.sub.dispatch(push.push, push.member);
        else if (!this.unsubscribing.has(push.channel)) this.emit(push.push, { channel: push.channel, member: push.member });
        break;
      }
      case "subscribed":
        if (!this.subs.has(push.channel)) {
          this.leave.delete(push.channel);
          this.serverSubs.set(push.channel, { offset: push.offset, epoch: push.epoch });
        }
        this.emit("serverSubscribed", { channel: push.channel, epoch: push.epoch, offset: push.offset });
        break;
      case "unsubscribed":
        if (this.subs.has(push.channel)) this.serverUnsubscribed(push.channel);
        else if (!this.unsubscribing.has(push.channel)) {
          this.serverSubs.delete(push.channel);
          this.emit("serverUnsubscribed", { channel: push.channel });
        }
        break;
      case "direct":
        this.onDirect(push);
        break;
      case "refresh":
        this.emit("tokenExpiring", { expiresAtMs: push.expires_at_ms });
        if (this.getToken) {
          const getToken = this.getToken;
          void (async () => {
            try {
              await this.refresh(await getToken());
            } catch (e) {
              this.emit("tokenRefreshFailed", e);
            }
          })();
        }
        break;
      default:
        break; // a push this version does not know (or a second `connected`)
    }
  }

  private onDirect(push: any): void {
    const message: DirectMessage = { data: decodeData(push) };
    if (typeof push.seq === "number") {
      const seq = push.seq;
      if (seq <= this.session.received) return; // received twice (a resume re-sends what was not acknowledged)
      this.session.received = seq;
      message.seq = seq;
      if (this.session.received - this.session.acked >= ACK_BATCH) this.sendAck();
      else if (this.ackTimer === undefined) this.ackTimer = setTimeout(() => this.sendAck(), ACK_DELAY_MS);
    }
    this.emit("direct", message);
  }

  /** Acknowledges every direct message received, if any is not yet. `ack` has an id but no reply. */
  private sendAck(): void {
    clearTimeout(this.ackTimer);
    this.ackTimer = undefined;
    if (!this.isConnected() || this.session.received <= this.session.acked) return;
    this.session.acked = this.session.received;
    this.sendFrame({ id: this.nextId(), cmd: "ack", seq: this.session.received });
  }

  /** Settles what was in flight on a connection that is gone. */
  private connectionLost(): void {
    const again: [number, Call][] = [];
    for (const [id, inflight] of this.inflight) {
      switch (inflight.kind) {
        case "call":
          if (inflight.call.retrySafe) again.push([id, inflight.call]);
          else
            this.settle(
              inflight.call,
              new SwitchboardError("connection_lost", `${inflight.call.cmd}: the connection dropped before the reply (it may have run)`, {
                command: inflight.call.cmd,
              }),
            );
          break;
        case "unsubscribe":
          // A new session does not have the subscription; a resumed one is told to leave it.
          this.leave.add(inflight.channel);
          inflight.done?.();
          break;
        default:
          break;
      }
    }
    this.inflight.clear();
    again.sort((a, b) => a[0] - b[0]);
    this.queue = [...again.map(([, c]) => c), ...this.queue];
    this.unsubscribing.clear();
    clearTimeout(this.ackTimer);
    this.ackTimer = undefined;
    for (const entry of this.subs.values()) entry.tracker.connectionLost();
  }

  private closedError(command: string): SwitchboardError {
    return this.terminal ?? new SwitchboardError("closed", "the client is closed", { command });
  }

  /** Stops for good after a terminal handshake refusal. */
  private fail(error: SwitchboardError): void {
    this.terminal = error;
    this.shutdown(error);
    this.emit("failed", error);
    this.emit("closed");
  }

  /** Settles everything with `error` and stops (the socket is closed by the caller). */
  private shutdown(error: SwitchboardError): void {
    this.setState("closed");
    clearTimeout(this.reconnectTimer);
    this.reconnectTimer = undefined;
    clearTimeout(this.ackTimer);
    this.ackTimer = undefined;
    if (this.conn) this.endConn(this.conn);
    this.closeAbandoned();
    for (const [type, fn] of this.browserListeners) (globalThis as any).removeEventListener?.(type, fn);
    this.browserListeners = [];
    for (const call of this.queue) this.settle(call, error);
    this.queue = [];
    for (const inflight of this.inflight.values()) {
      if (inflight.kind === "call") this.settle(inflight.call, error);
      else if (inflight.kind === "unsubscribe") inflight.done?.();
    }
    this.inflight.clear();
    for (const entry of this.subs.values()) {
      if (entry.confirm) {
        clearTimeout(entry.confirm.timer);
        entry.confirm.reject(error);
      } else if (error.code !== "closed") {
        entry.sub.dispatch("failed", error);
      }
      entry.sub.active = false;
    }
    this.subs.clear();
    this.rejectFirst(error);
  }

  /** Browsers: reconnect at once when back online or visible; probe the link when going offline. */
  private listenToBrowser(): void {
    const g = globalThis as any;
    if (!this.opts.browserEvents || typeof g.addEventListener !== "function") return;
    const now = () => {
      if (this._state === "disconnected" && this.reconnectTimer !== undefined) {
        clearTimeout(this.reconnectTimer);
        this.backoff.reset();
        void this.attempt();
      } else if (this.conn?.welcomed && !this.conn.ended && !this.conn.pingOutstanding) {
        this.sendHeartbeat(this.conn);
      }
    };
    const visibility = () => {
      if (g.document?.visibilityState === "visible") now();
    };
    const offline = () => {
      if (this.conn?.welcomed && !this.conn.ended && !this.conn.pingOutstanding) this.sendHeartbeat(this.conn);
    };
    this.browserListeners = [
      ["online", now],
      ["offline", offline],
      ["visibilitychange", visibility],
    ];
    for (const [type, fn] of this.browserListeners) g.addEventListener(type, fn);
  }
}

function errorMessage(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

function encodeData(data: Data | ArrayBuffer): { text: string } | { binary: string } {
  if (typeof data === "string") return { text: data };
  const bytes = data instanceof Uint8Array ? data : new Uint8Array(data);
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    s += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  return { binary: btoa(s) };
}

function decodeData(frame: { text?: unknown; binary?: unknown }): Data {
  if (typeof frame.text === "string") return frame.text;
  if (typeof frame.binary === "string") {
    const s = atob(frame.binary);
    const bytes = new Uint8Array(s.length);
    for (let i = 0; i < s.length; i++) bytes[i] = s.charCodeAt(i);
    return bytes;
  }
  return "";
}
