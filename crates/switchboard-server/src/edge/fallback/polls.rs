//! A long-poll session's answers (docs/fallbacks.md#long-polling): the
//! poll waiting, the cursor of each answer, the last answer kept until a
//! poll acknowledges it, and what a poll acknowledging a given cursor gets.

use super::events;
use super::Poll;
use bytes::Bytes;
use tokio::time::Instant;

/// The polls of one long-poll session.
pub(crate) struct Polls {
    /// The poll waiting for pushes, if any.
    pub(crate) waiting: Option<Poll>,
    /// Since when no poll has been waiting.
    pub(crate) idle_since: Instant,
    /// The cursor of the last answer.
    cursor: u64,
    /// The last answer's body, until a poll acknowledges it.
    last: Option<Bytes>,
    /// The cursor of the last answer that carried something: a poll
    /// acknowledging any cursor from it on has lost nothing.
    full: u64,
    /// When the last answer carried something: the cursor of the one that
    /// did before it. A poll acknowledging a cursor from there up to the
    /// last answer's has not got the last answer (only empty ones came
    /// between): it gets it again.
    repeat_from: u64,
}

/// What a new poll gets.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum PollVerdict {
    /// It waits for the next answer.
    Wait,
    /// The last answer, again (it was lost).
    Repeat(Bytes),
    /// Its cursor is not one this session answered (`409 bad_cursor`).
    BadCursor(String),
}

impl Polls {
    /// A session whose opening request `first` waits for its first answer.
    pub(crate) fn new(first: Poll) -> Self {
        Self {
            waiting: Some(first),
            idle_since: Instant::now(),
            cursor: 0,
            last: None,
            full: 0,
            repeat_from: 0,
        }
    }

    /// A poll acknowledging `cursor` has come.
    pub(crate) fn verdict(&mut self, cursor: u64) -> PollVerdict {
        self.idle_since = Instant::now();
        let now = self.cursor;
        if cursor == now || (cursor < now && cursor >= self.full) {
            // The last answer arrived, or every answer since the client's
            // cursor was empty (a forwarding node acknowledged them on its
            // behalf, say): nothing is missing, and nothing kept.
            self.last = None;
            return PollVerdict::Wait;
        }
        if let (true, Some(last)) = (
            self.full == now && (self.repeat_from..now).contains(&cursor),
            &self.last,
        ) {
            return PollVerdict::Repeat(last.clone());
        }
        PollVerdict::BadCursor(format!(
            "expected cursor {now} (or {} to repeat the last answer)",
            now.saturating_sub(1)
        ))
    }

    /// The next answer, with `pushes` and the connection's `close` (JSON),
    /// kept until acknowledged.
    pub(crate) fn answer(&mut self, pushes: &[Bytes], close: Option<&str>) -> Bytes {
        self.cursor += 1;
        if !pushes.is_empty() || close.is_some() {
            self.repeat_from = self.full;
            self.full = self.cursor;
        }
        let body = events::batch(self.cursor, pushes, close);
        self.last = Some(body.clone());
        self.idle_since = Instant::now();
        body
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn polls() -> Polls {
        Polls {
            waiting: None,
            idle_since: Instant::now(),
            cursor: 0,
            last: None,
            full: 0,
            repeat_from: 0,
        }
    }

    fn push() -> Vec<Bytes> {
        vec![Bytes::from_static(b"{\"push\":\"direct\",\"seq\":1}")]
    }

    #[tokio::test]
    async fn each_answer_is_acknowledged_or_repeated() {
        let mut p = polls();
        let first = p.answer(&push(), None); // 1: connected
        assert_eq!(
            p.verdict(0),
            PollVerdict::Repeat(first.clone()),
            "lost: again"
        );
        assert_eq!(p.verdict(1), PollVerdict::Wait);
        let second = p.answer(&push(), None); // 2
        assert_eq!(p.verdict(1), PollVerdict::Repeat(second));
        assert_eq!(p.verdict(2), PollVerdict::Wait);
        // Acknowledged: no longer kept, an old cursor is refused.
        assert!(matches!(p.verdict(1), PollVerdict::BadCursor(_)));
        assert!(matches!(p.verdict(7), PollVerdict::BadCursor(_)));
    }

    #[tokio::test]
    async fn empty_answers_need_no_acknowledgement() {
        let mut p = polls();
        p.answer(&push(), None); // 1
        p.answer(&[], None); // 2, empty
        p.answer(&[], None); // 3, empty
                             // A client still at 1 missed nothing.
        assert_eq!(p.verdict(1), PollVerdict::Wait);
        assert_eq!(p.cursor, 3);
        // Then an answer with pushes after empty ones, lost: a client at 1
        // (or 3, or 4) gets it again, one at 0 (it never had 1) does not.
        p.answer(&[], None); // 4, empty
        let full = p.answer(&push(), None); // 5
        for c in [1, 3, 4] {
            assert_eq!(
                p.verdict(c),
                PollVerdict::Repeat(full.clone()),
                "cursor {c}"
            );
        }
        assert!(matches!(p.verdict(0), PollVerdict::BadCursor(_)));
        assert_eq!(p.verdict(5), PollVerdict::Wait);
    }

    #[tokio::test]
    async fn a_close_counts_as_content() {
        let mut p = polls();
        p.answer(&[], None);
        let last = p.answer(&[], Some("{\"code\":1000,\"reason\":\"\"}"));
        assert_eq!(p.verdict(1), PollVerdict::Repeat(last));
    }
}
