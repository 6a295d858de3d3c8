/**
 * Every failure the SDK reports is a {@link SwitchboardError}. `code` is either
 * a protocol error code of `switchboard.v1` (`bad_channel`,
 * `unknown_namespace`, `permission_denied`, `history_disabled`, …: see
 * docs/protocol.md) or one of the SDK's own codes below.
 */
export type LocalErrorCode =
  /** No reply within `commandTimeout` (waiting for a connection included). */
  | "timeout"
  /** A `publish` or `send` was in flight when the connection dropped: it may or may not have run. */
  | "connection_lost"
  /** Too many commands wait for a connection (`maxQueuedCommands`). */
  | "queue_full"
  /** The client was closed (or failed for good). */
  | "closed"
  /** The channel name is not `namespace:name` (checked locally, nothing sent). */
  | "invalid_channel"
  /** This client already has a Subscription to the channel. */
  | "already_subscribed"
  /** The handshake was refused with an HTTP status that is not retried (4xx other than 408/429). */
  | "refused"
  /** The gateway did not select the `switchboard.v1` subprotocol. */
  | "unsupported_protocol"
  /** An unreadable frame or answer. */
  | "protocol";

export class SwitchboardError extends Error {
  /** The protocol's error code, or one of {@link LocalErrorCode}. */
  readonly code: string;
  /** The command that failed, when there is one. */
  readonly command?: string;
  /** The HTTP status of a refused handshake (`refused`), when known. */
  readonly status?: number;

  constructor(code: string, message: string, extra: { command?: string; status?: number } = {}) {
    super(message);
    this.name = "SwitchboardError";
    this.code = code;
    if (extra.command !== undefined) this.command = extra.command;
    if (extra.status !== undefined) this.status = extra.status;
  }
}
