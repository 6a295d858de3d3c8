import type { ChannelMessage, StreamPosition, SubscribeResult } from "./types.js";

/** What a client-side subscription reports (see `Subscription`). */
export type TrackerEvent =
  | { type: "subscribed"; epoch: string; offset: number; recovered?: boolean; missed?: number }
  | { type: "message"; message: ChannelMessage }
  | { type: "gap"; last: StreamPosition; resumed: StreamPosition };

/**
 * Per-channel stream bookkeeping, as the Rust SDK's `StreamTracker`: the
 * position handed to the application, what to ask for when resubscribing
 * (`since`), and which messages to drop so that each is delivered once, in
 * order.
 *
 * - The position is the last `(offset, epoch)` delivered, or, before any
 *   message, where the subscription started (the subscribe reply's offset).
 * - Every (re)subscribe is sent with `since` = the position. Messages that
 *   arrive before its reply (the gateway's replay) are held until the reply,
 *   so that `subscribed` comes first.
 * - A message is delivered only if it is newer than the position in the same
 *   epoch. A message of another epoch, or a reply saying recovery was
 *   impossible, produces a `gap` and moves the position to the new stream,
 *   except from offset 0 to the first message of an epoch.
 */
export class StreamTracker {
  position: StreamPosition | undefined;
  /** While a subscribe is in flight: the `since` it was sent with (null: none). */
  private awaiting: StreamPosition | null | undefined;
  private held: ChannelMessage[] = [];

  /** A subscribe is being sent: returns the `since` to send with it. */
  beginSubscribe(): StreamPosition | undefined {
    this.held = [];
    const since = this.position ? { ...this.position } : undefined;
    this.awaiting = since ?? null;
    return since;
  }

  /** The connection dropped: the next subscribe replays from the same position. */
  connectionLost(): void {
    this.awaiting = undefined;
    this.held = [];
  }

  onMessage(message: ChannelMessage, emit: (e: TrackerEvent) => void): void {
    if (this.awaiting !== undefined) this.held.push(message);
    else this.deliver(message, emit);
  }

  onSubscribed(reply: SubscribeResult, emit: (e: TrackerEvent) => void): void {
    const since = this.awaiting ?? null;
    this.awaiting = undefined;
    const held = this.held;
    this.held = [];
    const start: StreamPosition = { offset: reply.offset, epoch: reply.epoch };
    if (since === null) {
      emit({ type: "subscribed", epoch: reply.epoch, offset: reply.offset });
      this.position = { ...start };
    } else {
      const sameEpoch = since.epoch === reply.epoch || (since.offset === 0 && since.epoch === "");
      const nothingMissed = sameEpoch && since.offset >= reply.offset;
      if (nothingMissed || (sameEpoch && reply.recovered === true)) {
        emit({ type: "subscribed", epoch: reply.epoch, offset: reply.offset, recovered: true, missed: reply.missed ?? 0 });
      } else {
        emit({ type: "subscribed", epoch: reply.epoch, offset: reply.offset, recovered: false });
        emit({ type: "gap", last: since, resumed: { ...start } });
        this.position = { ...start };
      }
    }
    for (const m of held) this.deliver(m, emit);
    // The replay must reach the reply's offset; if it did not, say so rather than deliver a hole.
    const pos = this.position;
    if (pos && pos.epoch === start.epoch && pos.offset < start.offset) {
      emit({ type: "gap", last: { ...pos }, resumed: { ...start } });
      this.position = { ...start };
    }
  }

  private deliver(message: ChannelMessage, emit: (e: TrackerEvent) => void): void {
    const pos = this.position;
    if (pos) {
      if (pos.epoch === message.epoch) {
        if (message.offset <= pos.offset) return; // already delivered
      } else if (!(pos.offset === 0 && message.offset === 1)) {
        emit({
          type: "gap",
          last: { ...pos },
          resumed: { offset: Math.max(0, message.offset - 1), epoch: message.epoch },
        });
      }
    }
    this.position = { offset: message.offset, epoch: message.epoch };
    emit({ type: "message", message });
  }
}
