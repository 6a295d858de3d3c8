//! A channel's replica on a node of a cluster: the task that watches the
//! channel on the bus while the node has subscribers of it, and the
//! completion of subscribers that had to wait for the log.
//!
//! The watcher reads the channel's position from the log once its interest
//! is registered (so nothing published afterwards can slip by), then fans
//! out each message the bus brings in offset order: an old one (its own
//! publish coming back, or one already read) is dropped, the next one goes
//! out, and one further ahead means some went missing on the way, so they
//! are read from the log first. Only the watcher advances the replica's
//! offset, so every subscriber of the node sees the channel's messages
//! contiguous and in order.
//!
//! A waiting subscriber reads the log after its `since` (if any) while the
//! messages fanned out meanwhile collect in its buffer; then, under the
//! channel lock, it gets the read messages and the buffered ones it has not
//! got, in offset order, and its acknowledgement, and becomes an ordinary
//! subscriber: no gap and no duplicate at the seam.

use super::{
    fanout, member_push, message_json, tell_natives, BusLink, Channel, Channels, Kept, State,
};
use crate::bus::{BusError, BusEvent, LogEntry, LogRead};
use crate::conn::{Conn, Outgoing};
use crate::frames;
use crate::metrics::Metrics;
use futures_util::StreamExt;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchboard_backend::BoxFuture;
use switchboard_proto::native::{Push, StreamPosition, SubscribeResult};

/// How long a waiting subscriber waits for the replica to catch up with
/// what it read from the log before it is answered anyway.
const CATCH_UP: Duration = Duration::from_secs(2);

/// First and longest pause between tries while the bus is unavailable.
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// Starts watching `ch` on the bus; the pending subscribers are completed
/// once its position is known. `None` when the node is shutting down.
pub(super) fn watch(link: &BusLink, ch: &Arc<Channel>) -> Option<tokio::task::AbortHandle> {
    let s = Shared::of(link)?;
    Some(tokio::spawn(watch_channel(s, ch.clone())).abort_handle())
}

/// Completes the pending subscriber `ticket` of a synced replica.
pub(super) fn complete_later(link: &BusLink, ch: &Arc<Channel>, ticket: u64) {
    if let Some(s) = Shared::of(link) {
        tokio::spawn(complete(s, ch.clone(), ticket));
    }
}

/// What a replica's tasks use: the node's channels and metrics.
struct Shared {
    channels: Arc<Channels>,
    metrics: Arc<Metrics>,
}

impl Shared {
    /// `None` once the node is gone.
    fn of(link: &BusLink) -> Option<Arc<Self>> {
        Some(Arc::new(Self {
            channels: link.channels.upgrade()?,
            metrics: link.metrics.clone(),
        }))
    }
}

/// Calls `f` until it succeeds, pausing longer after each failure.
async fn retry<'a, T>(
    what: &str,
    channel: &str,
    mut f: impl FnMut() -> BoxFuture<'a, Result<T, BusError>>,
) -> T {
    let mut pause = RETRY_FIRST;
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) => {
                tracing::warn!(channel, error = %e, "channel bus: {what} failed; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(RETRY_MAX);
            }
        }
    }
}

/// What to do with a message the bus brought.
#[derive(Debug, PartialEq)]
enum Step {
    /// Already fanned out (or read): drop it.
    Old,
    /// The next one: fan it out.
    Next,
    /// Messages are missing before it: read the log after this position.
    Gap(StreamPosition),
}

fn next_step(st: &State, epoch: &str, offset: u64) -> Step {
    if *st.epoch == *epoch {
        if offset <= st.offset {
            Step::Old
        } else if offset == st.offset + 1 {
            Step::Next
        } else {
            Step::Gap(StreamPosition {
                offset: st.offset,
                epoch: epoch.to_owned(),
            })
        }
    } else if offset == 1 {
        // The log started over (everything expired) or this is the first.
        Step::Next
    } else {
        Step::Gap(StreamPosition {
            offset: 0,
            epoch: String::new(),
        })
    }
}

/// Moves the replica to another epoch, before its first message.
fn reset(st: &mut State, epoch: &str) {
    st.epoch = epoch.into();
    st.offset = 0;
    st.history.clear();
}

async fn watch_channel(s: Arc<Shared>, ch: Arc<Channel>) {
    let bus = &s.channels.link.get().expect("replicas are clustered").bus;
    let m = &s.metrics;
    let mut events = retry("watch", &ch.name, || bus.watch(&ch.name)).await;
    // The newest message too: how long ago the position last moved.
    let tail = retry("reading the position", &ch.name, || {
        bus.read(&ch.ns, &ch.name, None, Some(1))
    })
    .await;
    let age = tail.entries.last().map_or(Duration::ZERO, |e| {
        Duration::from_millis(crate::clock::now_ms().saturating_sub(e.time_ms))
    });
    let waiting: Vec<u64> = {
        let mut st = ch.state.lock();
        reset(&mut st, &tail.epoch);
        st.offset = tail.offset;
        st.moved_at = Some(Instant::now().checked_sub(age).unwrap_or_else(Instant::now));
        st.synced = true;
        st.pending.iter().map(|p| p.ticket).collect()
    };
    for ticket in waiting {
        tokio::spawn(complete(s.clone(), ch.clone(), ticket));
    }
    while let Some(event) = events.next().await {
        let joined = matches!(event, BusEvent::Join(_));
        match event {
            BusEvent::Message { epoch, entry } => {
                m.bus_received.inc();
                let gap = {
                    let mut st = ch.state.lock();
                    match next_step(&st, &epoch, entry.offset) {
                        Step::Old => None,
                        Step::Next if *st.epoch != *epoch && st.held_within(ch.ns.history_ttl) => {
                            // The log started over under a position this
                            // node held within history-ttl, so it did not
                            // expire: the bus lost it, and the end of the
                            // old epoch may never have reached this node.
                            lost(&s, &ch, &mut st, &epoch, entry);
                            None
                        }
                        Step::Next => {
                            if *st.epoch != *epoch {
                                reset(&mut st, &epoch);
                            }
                            fanout(&ch, &mut st, entry.offset, entry.time_ms, entry.data, m);
                            None
                        }
                        Step::Gap(since) => Some((since, entry)),
                    }
                };
                if let Some((since, entry)) = gap {
                    fill(&s, &ch, since, &epoch, entry).await;
                }
            }
            BusEvent::Join(member) | BusEvent::Leave(member) if ch.ns.join_leave => {
                let st = ch.state.lock();
                tell_natives(&st, &member_push(&ch.name, member, joined), m);
            }
            BusEvent::Join(_) | BusEvent::Leave(_) => {}
        }
    }
}

/// Reads the messages after `since` from the log and fans them out, up to
/// and including `entry` (the one that showed the gap).
async fn fill(s: &Shared, ch: &Channel, since: StreamPosition, epoch: &str, entry: LogEntry) {
    let bus = &s.channels.link.get().expect("replicas are clustered").bus;
    let m = &s.metrics;
    m.bus_gap_fills.inc();
    // While the bus is unreachable nothing arrives anyway: wait for it.
    let read = retry("reading a gap", &ch.name, || {
        bus.read(&ch.ns, &ch.name, Some(&since), None)
    })
    .await;
    let mut st = ch.state.lock();
    match read {
        // A complete read of another epoch than the one this node held a
        // position in lately: the old epoch's end is gone with its log.
        r if r.complete && (*st.epoch == *r.epoch || !st.held_within(ch.ns.history_ttl)) => {
            if *st.epoch != *r.epoch {
                reset(&mut st, &r.epoch);
            }
            for e in r.entries {
                if e.offset == st.offset + 1 {
                    fanout(ch, &mut st, e.offset, e.time_ms, e.data, m);
                }
            }
            if *st.epoch == *epoch && entry.offset == st.offset + 1 {
                fanout(ch, &mut st, entry.offset, entry.time_ms, entry.data, m);
            }
        }
        _ => lost(s, ch, &mut st, epoch, entry),
    }
}

/// Messages went missing and the log no longer has them: native
/// subscribers are unsubscribed (an `unsubscribed` push, and a leave for the
/// others), so they subscribe again and learn plainly that they cannot
/// recover; the replica goes on from `entry`.
fn lost(s: &Shared, ch: &Channel, st: &mut State, epoch: &str, entry: LogEntry) {
    let m = &s.metrics;
    m.bus_lost.inc();
    tracing::warn!(
        channel = %ch.name,
        offset = entry.offset,
        "channel messages were lost before this node got them; unsubscribing its native subscribers"
    );
    let natives: Vec<Arc<Conn>> = st
        .subscribers
        .values()
        .filter(|c| c.native)
        .cloned()
        .collect();
    let push = frames::push_frame(&Push::Unsubscribed {
        channel: ch.name.to_string(),
    });
    for c in natives {
        s.channels.forget(&c, |x| x.name == ch.name);
        s.channels.drop_subscriber(ch, st, &c, m);
        c.push(push.clone(), m);
    }
    reset(st, epoch);
    st.offset = entry.offset - 1;
    fanout(ch, st, entry.offset, entry.time_ms, entry.data, m);
}

/// Completes the pending subscriber `ticket`: reads the log after its
/// `since`, waits (bounded) for the replica to catch up with the read, then
/// [`finish`]es it.
async fn complete(s: Arc<Shared>, ch: Arc<Channel>, ticket: u64) {
    let bus = &s.channels.link.get().expect("replicas are clustered").bus;
    let since = {
        let st = ch.state.lock();
        match st.pending.iter().find(|p| p.ticket == ticket) {
            Some(p) => p.since.clone(),
            None => return,
        }
    };
    let read = match &since {
        Some(since) => match bus.read(&ch.ns, &ch.name, Some(since), None).await {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(channel = %ch.name, error = %e, "channel bus: recovery read failed");
                None
            }
        },
        None => None,
    };
    let deadline = Instant::now() + CATCH_UP;
    loop {
        {
            let mut st = ch.state.lock();
            let behind = read
                .as_ref()
                .is_some_and(|r| r.complete && *st.epoch == *r.epoch && st.offset < r.offset);
            if !behind || Instant::now() >= deadline {
                finish(&s.channels, &ch, &mut st, ticket, read, &s.metrics);
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Gives a pending subscriber the messages it missed and its
/// acknowledgement, and makes it an ordinary subscriber.
fn finish(
    channels: &Channels,
    ch: &Channel,
    st: &mut State,
    ticket: u64,
    read: Option<LogRead>,
    m: &Metrics,
) {
    let Some(i) = st.pending.iter().position(|p| p.ticket == ticket) else {
        return;
    };
    let mut p = st.pending.swap_remove(i);
    // Ended: its `unsubscribe_all` took its list (this channel included)
    // and removes it from the channel once it has this state's lock. If the
    // flag is not seen yet, that removal still comes after this insert.
    if p.conn.ended.load(Relaxed) {
        return;
    }
    let mut result = SubscribeResult {
        epoch: st.epoch.to_string(),
        offset: st.offset,
        recovered: None,
        missed: None,
    };
    // With `since` and a complete read of the same epoch: what was read,
    // then what the replica holds or buffered, contiguous up to its offset.
    let mut recovered: Option<Vec<Arc<Outgoing>>> = None;
    if let (Some(since), Some(r)) = (&p.since, read) {
        if r.complete && *r.epoch == *st.epoch {
            let mut sent = since.offset;
            let mut out = Vec::new();
            for e in r.entries {
                if e.offset == sent + 1 && e.offset <= st.offset {
                    let json = message_json(&ch.name, &st.epoch, e.offset, &e.data);
                    out.push(Arc::new(Outgoing::publication(e.data, json)));
                    sent = e.offset;
                }
            }
            for k in st.history.iter().chain(p.buffer.iter()) {
                if k.offset == sent + 1 {
                    out.push(k.msg.clone());
                    sent = k.offset;
                }
            }
            if sent == st.offset || since.offset > st.offset {
                recovered = Some(out);
            }
        }
    }
    if p.since.is_some() {
        result.recovered = Some(recovered.is_some());
    }
    match recovered {
        Some(missed) => {
            let n = missed.len() as u64;
            p.conn.send_all(missed.iter().map(|o| &**o), m);
            m.deliveries.inc_by(n);
            result.missed = Some(n);
            channels.acknowledge(ch, st, &p.conn, p.ack, &result, !p.rejoin, m);
        }
        None => {
            // Live from the first message that arrived while it waited.
            if let Some(first) = p.buffer.first() {
                result.offset = first.offset - 1;
            }
            channels.acknowledge(ch, st, &p.conn, p.ack, &result, !p.rejoin, m);
            p.conn.send_all(p.buffer.iter().map(|k: &Kept| &*k.msg), m);
            m.deliveries.inc_by(p.buffer.len() as u64);
        }
    }
    st.subscribers.insert(p.conn.key, p.conn.clone());
    if !p.rejoin {
        m.subscriptions.inc();
    }
    if let Some(done) = p.done.take() {
        let _ = done.send(result);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(epoch: &str, offset: u64) -> State {
        let mut st = State::new(epoch.into(), true);
        st.offset = offset;
        st
    }

    #[test]
    fn messages_are_dropped_fanned_out_or_fill_a_gap() {
        let st = at("e", 5);
        assert_eq!(next_step(&st, "e", 5), Step::Old);
        assert_eq!(next_step(&st, "e", 3), Step::Old);
        assert_eq!(next_step(&st, "e", 6), Step::Next);
        assert_eq!(
            next_step(&st, "e", 9),
            Step::Gap(StreamPosition {
                offset: 5,
                epoch: "e".into()
            })
        );
        // A new epoch from its start, or a replica that has seen nothing.
        assert_eq!(next_step(&st, "f", 1), Step::Next);
        assert_eq!(next_step(&at("", 0), "f", 1), Step::Next);
        assert_eq!(
            next_step(&st, "f", 4),
            Step::Gap(StreamPosition {
                offset: 0,
                epoch: String::new()
            })
        );
    }
}
