export { SwitchboardClient, PROTOCOL, ACK_BATCH, ACK_DELAY_MS, HEARTBEAT_SLACK_MS, FALLBACK_TIMEOUT_MS, FALLBACK_RETRY_MS } from "./client.js";
export { TRANSPORTS } from "./transport.js";
export type { TransportName } from "./transport.js";
export type { FetchFunction } from "./http.js";
export type { ClientOptions, ClientEvents } from "./client.js";
export { Subscription } from "./subscription.js";
export type { SubscriptionEvents, SubscriptionHandlers } from "./subscription.js";
export { SwitchboardError } from "./errors.js";
export type { LocalErrorCode } from "./errors.js";
export { Backoff } from "./backoff.js";
export type {
  ChannelMessage,
  ClientState,
  Data,
  DirectMessage,
  DisconnectReason,
  HistoryResult,
  Member,
  PresenceResult,
  Publication,
  PublishResult,
  ResumeError,
  StreamPosition,
  SubscribeResult,
  WebSocketConstructor,
  WebSocketLike,
} from "./types.js";
