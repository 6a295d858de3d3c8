/** Message data: text (`"text"` on the wire) or bytes (`"binary"`, base64 on the wire). */
export type Data = string | Uint8Array;

/** A channel position: the offset of the last message seen in the epoch it belongs to. */
export interface StreamPosition {
  offset: number;
  epoch: string;
}

/** A message of a channel. */
export interface ChannelMessage {
  channel: string;
  offset: number;
  epoch: string;
  data: Data;
}

/** A message to this connection alone (origin or control API). `seq` is its number in the session (absent without sessions). */
export interface DirectMessage {
  seq?: number;
  data: Data;
}

/** A channel member (presence, join, leave). */
export interface Member {
  client: string;
  user?: string;
  info?: unknown;
}

/** Why the gateway refused to resume a session (see docs/sessions.md). */
export interface ResumeError {
  code: string;
  message: string;
}

export interface PublishResult {
  offset: number;
  epoch: string;
}

export interface PresenceResult {
  members: Member[];
  clients: number;
  users: number;
}

export interface Publication {
  offset: number;
  time_ms: number;
  data: Data;
}

export interface HistoryResult {
  epoch: string;
  offset: number;
  publications: Publication[];
  /** Present when the request had `since`. */
  recovered?: boolean;
}

export interface SubscribeResult {
  epoch: string;
  offset: number;
  recovered?: boolean;
  missed?: number;
}

/** Why an established connection ended. */
export type DisconnectReason =
  | { kind: "closed"; code: number; reason: string }
  | { kind: "network"; message: string }
  | { kind: "heartbeat_timeout"; afterMs: number }
  | { kind: "protocol"; message: string };

/**
 * The connection's state:
 *
 * - `disconnected`: not connected (before `connect()`, or waiting for the next attempt);
 * - `connecting`: an attempt is under way (handshake, then the `connected` push);
 * - `connected`: the `connected` push arrived; commands are sent at once;
 * - `closed`: for good (`close()` was called, or a handshake was refused in a way not retried).
 */
export type ClientState = "disconnected" | "connecting" | "connected" | "closed";

/** The minimal WebSocket interface the SDK needs (browsers' WebSocket and the `ws` package both fit). */
export interface WebSocketLike {
  readonly protocol: string;
  readonly readyState: number;
  binaryType: string;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  addEventListener(type: string, listener: (event: any) => void): void;
  removeEventListener(type: string, listener: (event: any) => void): void;
  /** `ws` package only: drop the TCP connection without a close frame. */
  terminate?: () => void;
  /** `ws` package only: EventEmitter interface (used to see pings). */
  on?: (event: string, listener: (...args: any[]) => void) => unknown;
}

export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => WebSocketLike;
