import { Emitter } from "./emitter.js";
import type { SwitchboardError } from "./errors.js";
import type { ChannelMessage, Member, StreamPosition } from "./types.js";

/** The events of a {@link Subscription}. */
export interface SubscriptionEvents {
  /**
   * The gateway confirmed the subscription: first (`recovered` absent), and
   * again after every reconnect (`recovered: true`, the `missed` messages
   * follow; or `recovered: false`, a `gap` follows).
   */
  subscribed: (event: { epoch: string; offset: number; recovered?: boolean; missed?: number }) => void;
  /** A message, each exactly once, in increasing offsets. */
  message: (message: ChannelMessage) => void;
  /** Recovery was impossible: the messages after `last` up to `resumed` are lost. */
  gap: (event: { last: StreamPosition; resumed: StreamPosition }) => void;
  /** Someone subscribed to the channel (namespaces with `join-leave`). */
  join: (member: Member) => void;
  /** Someone left the channel (namespaces with `join-leave`). */
  leave: (member: Member) => void;
  /** The server ended the subscription (control API, origin). No event follows. */
  unsubscribed: () => void;
  /** A resubscribe after a reconnect was refused, or the client failed for good. No event follows. */
  failed: (error: SwitchboardError) => void;
}

/** Listeners to attach before the subscribe is sent, so that no event is missed. */
export type SubscriptionHandlers = Partial<SubscriptionEvents>;

/** What a Subscription needs from its client. */
export interface SubscriptionOwner {
  unsubscribeFor(sub: Subscription): Promise<void>;
}

/** A client-side subscription to one channel (see `SwitchboardClient.subscribe`). */
export class Subscription extends Emitter<SubscriptionEvents> {
  /** False once unsubscribed (by you or the server) or failed. */
  active = true;
  /** @internal */
  positionRef: () => StreamPosition | undefined = () => undefined;

  constructor(
    readonly channel: string,
    private readonly owner: SubscriptionOwner,
    handlers: SubscriptionHandlers = {},
  ) {
    super();
    for (const key of Object.keys(handlers) as (keyof SubscriptionEvents)[]) {
      const handler = handlers[key];
      if (handler) this.on(key, handler as SubscriptionEvents[typeof key]);
    }
  }

  /** The last position delivered (or where the subscription started). */
  get position(): StreamPosition | undefined {
    const p = this.positionRef();
    return p ? { ...p } : undefined;
  }

  /** Leaves the channel and waits for the gateway (at once when disconnected: a resume then leaves it). */
  unsubscribe(): Promise<void> {
    return this.owner.unsubscribeFor(this);
  }

  /** @internal */
  dispatch<K extends keyof SubscriptionEvents>(event: K, ...args: Parameters<SubscriptionEvents[K]>): void {
    if (event === "unsubscribed" || event === "failed") this.active = false;
    this.emit(event, ...args);
  }
}
