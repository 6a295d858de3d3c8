//! Per-channel stream bookkeeping: the position the application has seen,
//! what to ask for when resubscribing, and which messages to drop.
//!
//! This is the part of the SDK that turns "at least once, possibly with
//! overlaps" (a reconnect replays from the last known position, and a
//! message may arrive both live and replayed) into "exactly once, in order".
//! It is pure state, driven by the connection task, so it is tested here in
//! isolation:
//!
//! - The *position* is the last `(offset, epoch)` delivered to the
//!   application — or, before any message, where the subscription started
//!   (the subscribe reply's `offset`).
//! - Every (re)subscribe is sent with `since` = the position. Messages
//!   arriving before its reply (the gateway's replay) are held until the
//!   reply, so that the [`SubscriptionEvent::Subscribed`] event comes first.
//! - A message is delivered only if it is newer than the position in the same
//!   epoch; anything at or below it is a duplicate and dropped. A message of
//!   another epoch, or a reply saying recovery was impossible, produces a
//!   [`SubscriptionEvent::Gap`] and moves the position to the new stream —
//!   except from a position with offset 0 (nothing seen; in a cluster, a
//!   channel without messages yet answers the epoch `""`) to the first
//!   message of an epoch, where nothing can have been missed.

use crate::event::{ChannelMessage, SubscriptionEvent};
use switchboard_proto::native::{StreamPosition, SubscribeResult};

/// The stream state of one client-side subscription.
#[derive(Debug, Clone, Default)]
pub(crate) struct StreamTracker {
    /// Last delivered position (or the subscription's starting point).
    position: Option<StreamPosition>,
    /// While a subscribe is in flight: the `since` it was sent with.
    awaiting: Option<Option<StreamPosition>>,
    /// Messages that arrived before the reply of the subscribe in flight.
    held: Vec<ChannelMessage>,
}

impl StreamTracker {
    /// The last delivered position (or where the subscription started).
    #[cfg(test)]
    pub(crate) fn position(&self) -> Option<&StreamPosition> {
        self.position.as_ref()
    }

    /// A subscribe is being sent on a fresh connection: returns the `since`
    /// to send with it.
    pub(crate) fn begin_subscribe(&mut self) -> Option<StreamPosition> {
        self.held.clear();
        let since = self.position.clone();
        self.awaiting = Some(since.clone());
        since
    }

    /// The connection dropped: whatever was held is replayed by the next
    /// subscribe, which starts from the same position.
    pub(crate) fn connection_lost(&mut self) {
        self.awaiting = None;
        self.held.clear();
    }

    /// A message of this channel arrived.
    pub(crate) fn on_message(
        &mut self,
        message: ChannelMessage,
        emit: &mut impl FnMut(SubscriptionEvent),
    ) {
        if self.awaiting.is_some() {
            self.held.push(message);
        } else {
            self.deliver(message, emit);
        }
    }

    /// The gateway accepted the subscribe in flight.
    pub(crate) fn on_subscribed(
        &mut self,
        reply: &SubscribeResult,
        emit: &mut impl FnMut(SubscriptionEvent),
    ) {
        let since = self.awaiting.take().flatten();
        let held = std::mem::take(&mut self.held);
        let start = StreamPosition {
            offset: reply.offset,
            epoch: reply.epoch.clone(),
        };
        let subscribed = |recovered, missed| SubscriptionEvent::Subscribed {
            epoch: reply.epoch.clone(),
            offset: reply.offset,
            recovered,
            missed,
        };
        match since {
            None => {
                emit(subscribed(None, None));
                self.position = Some(start.clone());
            }
            Some(since) => {
                // From "nothing seen of no epoch yet" the gateway replays an
                // epoch from its start.
                let same_epoch = since.epoch == reply.epoch || is_start(&since);
                let nothing_missed = same_epoch && since.offset >= reply.offset;
                if nothing_missed || (same_epoch && reply.recovered == Some(true)) {
                    let missed = reply.missed.unwrap_or(0);
                    emit(subscribed(Some(true), Some(missed)));
                } else {
                    emit(subscribed(Some(false), None));
                    emit(SubscriptionEvent::Gap {
                        last: since,
                        resumed: start.clone(),
                    });
                    self.position = Some(start.clone());
                }
            }
        }
        for message in held {
            self.deliver(message, emit);
        }
        // The replay must reach the reply's offset; if the gateway said
        // "recovered" but sent less, say so rather than deliver a hole.
        if let Some(pos) = &self.position {
            if pos.epoch == start.epoch && pos.offset < start.offset {
                emit(SubscriptionEvent::Gap {
                    last: pos.clone(),
                    resumed: start.clone(),
                });
                self.position = Some(start);
            }
        }
    }

    /// Delivers `message` unless it is a duplicate, and advances the position.
    fn deliver(&mut self, message: ChannelMessage, emit: &mut impl FnMut(SubscriptionEvent)) {
        match &self.position {
            // Already delivered.
            Some(pos) if pos.epoch == message.epoch && message.offset <= pos.offset => return,
            Some(pos) if pos.epoch == message.epoch => {}
            // Nothing seen yet, and this starts its epoch: nothing missed.
            Some(pos) if pos.offset == 0 && message.offset == 1 => {}
            Some(pos) => emit(SubscriptionEvent::Gap {
                last: pos.clone(),
                resumed: StreamPosition {
                    offset: message.offset.saturating_sub(1),
                    epoch: message.epoch.clone(),
                },
            }),
            None => {}
        }
        self.position = Some(message.position());
        emit(SubscriptionEvent::Message(message));
    }
}

/// The position of a subscription to a channel that had no messages (and,
/// in a cluster, no epoch yet).
fn is_start(p: &StreamPosition) -> bool {
    p.offset == 0 && p.epoch.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_proto::origin::Payload;

    fn msg(offset: u64, epoch: &str) -> ChannelMessage {
        ChannelMessage {
            channel: "chat:a".into(),
            offset,
            epoch: epoch.into(),
            data: Payload::Text(format!("m{offset}")),
        }
    }

    fn pos(offset: u64, epoch: &str) -> StreamPosition {
        StreamPosition {
            offset,
            epoch: epoch.into(),
        }
    }

    fn reply(
        offset: u64,
        epoch: &str,
        recovered: Option<bool>,
        missed: Option<u64>,
    ) -> SubscribeResult {
        SubscribeResult {
            epoch: epoch.into(),
            offset,
            recovered,
            missed,
        }
    }

    /// Runs `f` with an emitter and returns what it emitted, messages shown
    /// as their offsets.
    fn run(
        t: &mut StreamTracker,
        f: impl FnOnce(&mut StreamTracker, &mut dyn FnMut(SubscriptionEvent)),
    ) -> Vec<String> {
        let mut out = Vec::new();
        f(t, &mut |e| out.push(e));
        out.into_iter()
            .map(|e| match e {
                SubscriptionEvent::Message(m) => format!("{}@{}", m.offset, m.epoch),
                SubscriptionEvent::Subscribed {
                    recovered, missed, ..
                } => format!("subscribed {recovered:?} {missed:?}"),
                SubscriptionEvent::Gap { last, resumed } => format!(
                    "gap {}@{} -> {}@{}",
                    last.offset, last.epoch, resumed.offset, resumed.epoch
                ),
                other => format!("{other:?}"),
            })
            .collect()
    }

    fn subscribe_ok(t: &mut StreamTracker, r: SubscribeResult) -> Vec<String> {
        run(t, |t, e| t.on_subscribed(&r, &mut |ev| e(ev)))
    }

    fn messages(t: &mut StreamTracker, ms: &[(u64, &str)]) -> Vec<String> {
        run(t, |t, e| {
            for (o, ep) in ms {
                t.on_message(msg(*o, ep), &mut |ev| e(ev));
            }
        })
    }

    #[test]
    fn first_subscribe_starts_at_the_reply_and_drops_duplicates() {
        let mut t = StreamTracker::default();
        assert_eq!(t.begin_subscribe(), None);
        assert_eq!(
            subscribe_ok(&mut t, reply(10, "e", None, None)),
            ["subscribed None None"]
        );
        assert_eq!(t.position(), Some(&pos(10, "e")));
        assert_eq!(
            messages(
                &mut t,
                &[(11, "e"), (12, "e"), (12, "e"), (9, "e"), (13, "e")]
            ),
            ["11@e", "12@e", "13@e"]
        );
        assert_eq!(t.position(), Some(&pos(13, "e")));
    }

    #[test]
    fn messages_before_the_first_reply_are_held_then_filtered() {
        let mut t = StreamTracker::default();
        t.begin_subscribe();
        assert!(
            messages(&mut t, &[(5, "e"), (6, "e")]).is_empty(),
            "held until the reply"
        );
        assert_eq!(
            subscribe_ok(&mut t, reply(5, "e", None, None)),
            ["subscribed None None", "6@e"],
            "5 predates the subscription"
        );
    }

    #[test]
    fn resubscribe_recovers_from_the_last_delivered_position() {
        let mut t = StreamTracker::default();
        t.begin_subscribe();
        subscribe_ok(&mut t, reply(0, "e", None, None));
        messages(&mut t, &[(1, "e"), (2, "e"), (3, "e")]);
        t.connection_lost();
        assert_eq!(t.begin_subscribe(), Some(pos(3, "e")));
        // The replay (4, 5) arrives before the reply; a live duplicate of 3
        // sneaks in too. Nothing is delivered before the reply.
        assert!(messages(&mut t, &[(3, "e"), (4, "e"), (5, "e")]).is_empty());
        assert_eq!(
            subscribe_ok(&mut t, reply(5, "e", Some(true), Some(2))),
            ["subscribed Some(true) Some(2)", "4@e", "5@e"]
        );
        assert_eq!(messages(&mut t, &[(5, "e"), (6, "e")]), ["6@e"]);
    }

    #[test]
    fn a_connection_lost_mid_replay_replays_again_from_the_same_position() {
        let mut t = StreamTracker::default();
        t.begin_subscribe();
        subscribe_ok(&mut t, reply(7, "e", None, None));
        messages(&mut t, &[(8, "e")]);
        t.connection_lost();
        assert_eq!(t.begin_subscribe(), Some(pos(8, "e")));
        messages(&mut t, &[(9, "e"), (10, "e")]); // held, then lost
        t.connection_lost();
        assert_eq!(
            t.begin_subscribe(),
            Some(pos(8, "e")),
            "held messages were never delivered"
        );
        messages(&mut t, &[(9, "e"), (10, "e"), (11, "e")]);
        assert_eq!(
            subscribe_ok(&mut t, reply(11, "e", Some(true), Some(3))),
            ["subscribed Some(true) Some(3)", "9@e", "10@e", "11@e"]
        );
    }

    #[test]
    fn unrecoverable_resubscribe_reports_a_gap_and_moves_on() {
        let mut t = StreamTracker::default();
        t.begin_subscribe();
        subscribe_ok(&mut t, reply(0, "e", None, None));
        messages(&mut t, &[(1, "e"), (2, "e")]);
        t.connection_lost();
        assert_eq!(t.begin_subscribe(), Some(pos(2, "e")));
        assert_eq!(
            subscribe_ok(&mut t, reply(50, "e", Some(false), None)),
            ["subscribed Some(false) None", "gap 2@e -> 50@e"]
        );
        assert_eq!(messages(&mut t, &[(50, "e"), (51, "e")]), ["51@e"]);
        // A new epoch (e.g. the channel's history was reset) is a gap too.
        t.connection_lost();
        t.begin_subscribe();
        assert_eq!(
            subscribe_ok(&mut t, reply(3, "f", Some(true), Some(0))),
            ["subscribed Some(false) None", "gap 51@e -> 3@f"],
            "`recovered` across epochs is not believed"
        );
        assert_eq!(messages(&mut t, &[(4, "f")]), ["4@f"]);
    }

    #[test]
    fn nothing_missed_is_not_a_gap_even_if_unrecovered() {
        let mut t = StreamTracker::default();
        t.begin_subscribe();
        subscribe_ok(&mut t, reply(4, "e", None, None));
        t.connection_lost();
        t.begin_subscribe();
        assert_eq!(
            subscribe_ok(&mut t, reply(4, "e", Some(false), None)),
            ["subscribed Some(true) Some(0)"]
        );
    }

    #[test]
    fn a_short_replay_is_reported_not_papered_over() {
        let mut t = StreamTracker::default();
        t.begin_subscribe();
        subscribe_ok(&mut t, reply(1, "e", None, None));
        t.connection_lost();
        t.begin_subscribe();
        messages(&mut t, &[(2, "e")]);
        assert_eq!(
            subscribe_ok(&mut t, reply(4, "e", Some(true), Some(3))),
            ["subscribed Some(true) Some(3)", "2@e", "gap 2@e -> 4@e"]
        );
        assert_eq!(messages(&mut t, &[(4, "e"), (5, "e")]), ["5@e"]);
    }

    #[test]
    fn the_first_epoch_of_an_empty_channel_is_not_a_gap() {
        // Live: the channel had no messages, then its first one.
        let mut t = StreamTracker::default();
        t.begin_subscribe();
        subscribe_ok(&mut t, reply(0, "", None, None));
        assert_eq!(messages(&mut t, &[(1, "e"), (2, "e")]), ["1@e", "2@e"]);
        // Recovered from before the first one.
        let mut t = StreamTracker::default();
        t.begin_subscribe();
        subscribe_ok(&mut t, reply(0, "", None, None));
        t.connection_lost();
        assert_eq!(t.begin_subscribe(), Some(pos(0, "")));
        messages(&mut t, &[(1, "e"), (2, "e")]);
        assert_eq!(
            subscribe_ok(&mut t, reply(2, "e", Some(true), Some(2))),
            ["subscribed Some(true) Some(2)", "1@e", "2@e"]
        );
        // But a later start of another epoch is still a gap.
        assert_eq!(
            messages(&mut t, &[(3, "e"), (1, "f")]),
            ["3@e", "gap 3@e -> 0@f", "1@f"]
        );
    }

    #[test]
    fn a_live_epoch_change_is_a_gap() {
        let mut t = StreamTracker::default();
        t.begin_subscribe();
        subscribe_ok(&mut t, reply(9, "e", None, None));
        assert_eq!(
            messages(&mut t, &[(10, "e"), (1, "f"), (2, "f")]),
            ["10@e", "gap 10@e -> 0@f", "1@f", "2@f"]
        );
    }
}
