import type { SwitchboardError } from "./errors.js";

/**
 * The ways to reach the gateway, in the order the client tries them by
 * default: a WebSocket, then the HTTP fallbacks of docs/fallbacks.md.
 */
export type TransportName = "websocket" | "sse" | "long-poll";

/** Every transport the SDK speaks, in the default order of preference. */
export const TRANSPORTS: readonly TransportName[] = ["websocket", "sse", "long-poll"];

/** How a transport ended. */
export interface TransportClosed {
  /**
   * The close code: the gateway's (a close frame, an SSE `event: close`, a
   * long-poll `close`) when `clean`, or what the platform reported (a
   * WebSocket's 1006) when the link was lost. Absent when there is none.
   */
  code?: number;
  reason: string;
  /** True when the gateway closed the connection on purpose (it sent a close with `code`). */
  clean: boolean;
  /** Why the transport failed: before its first frame, an HTTP refusal (`refused`, with `status`), a network error…; after it, a lost link. */
  error?: SwitchboardError;
  /**
   * An HTTP transport's opening request got no answer at all (the host could
   * not be reached, or a browser refused it): the network is down, not this
   * transport, so another HTTP transport would fail the same way.
   */
  unreachable?: boolean;
}

/** What a transport reports to the protocol logic above it. Nothing is reported after `end()` or `drop()`. */
export interface TransportListener {
  /** One native frame: the JSON text of a push or a reply, in the order the gateway sent them. */
  frame(text: string): void;
  /** Proof of life that is not a frame: a WebSocket ping, an SSE heartbeat comment, an empty poll answer. */
  alive(): void;
  /** The transport ended by itself (reported once). */
  closed(event: TransportClosed): void;
}

/** Where and how to open a transport: one connection attempt. */
export interface TransportOpen {
  /** The client's URL as given (`ws:`, `wss:`, `http:` or `https:`). */
  url: string;
  /** The client token, for the `token` query parameter (absent: none, or sent another way). */
  token?: string;
  /** The session to resume (`resume` and `received` query parameters). */
  resume?: { token: string; received: number };
  listener: TransportListener;
}

/**
 * One connection to the gateway that carries the native protocol: frames
 * in (through the listener), command text out. The protocol logic
 * (sessions, acknowledgements, channels, commands, heartbeats) lives in
 * `SwitchboardClient`, above this interface.
 */
export interface Transport {
  readonly name: TransportName;
  /** Sends one native command (its JSON text). Commands reach the gateway in the order sent. */
  send(text: string): void;
  /**
   * Ends the connection and its session on purpose (a close frame with
   * `code`, or `DELETE ?session=`). Resolves once done, within about a second.
   */
  end(code?: number, reason?: string): Promise<void>;
  /**
   * Gives the connection up without ending its session, so that it can be
   * resumed. Returns true when something had to stay open (a browser
   * WebSocket cannot be dropped without a close frame, which would end the
   * session): then `gone` is called once it closes by itself, and `end()`
   * closes it for good.
   */
  drop(gone?: () => void): boolean;
}

/** Maps a URL given to the client to the scheme a transport uses (`ws`↔`http`, `wss`↔`https`). */
export function withScheme(url: string, family: "ws" | "http"): URL {
  const u = new URL(url);
  const secure = u.protocol === "wss:" || u.protocol === "https:";
  if (family === "ws") u.protocol = secure ? "wss:" : "ws:";
  else u.protocol = secure ? "https:" : "http:";
  return u;
}

/** The URL of a handshake: the client's URL plus `token`, `resume` and `received`. */
export function handshakeUrl(open: TransportOpen, family: "ws" | "http"): URL {
  const u = withScheme(open.url, family);
  if (open.token) u.searchParams.set("token", open.token);
  if (open.resume) {
    u.searchParams.set("resume", open.resume.token);
    u.searchParams.set("received", String(open.resume.received));
  }
  return u;
}

/** Statuses after which trying again (later, or with another transport) may succeed. */
export function retryableStatus(status: number): boolean {
  return status >= 500 || status === 408 || status === 429;
}
