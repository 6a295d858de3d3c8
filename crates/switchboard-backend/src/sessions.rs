//! The session store: sessions kept where every node of the cluster can read
//! them, so that a session outlives the node holding it, as the
//! [`SessionStore`] trait.
//!
//! A session is two things here, both keyed by its connection id:
//!
//! - its **record**: what the gateway needs to adopt it (resume token, user,
//!   channels, counters, the node holding it), opaque bytes to the store,
//!   one value per session with a revision. Each write names the revision
//!   its writer last saw, so a node that lost a session to another (which
//!   took it over while the first was cut off) cannot overwrite it.
//! - its **messages**: the direct messages it was sent, numbered by the
//!   gateway (`seq`), each the `direct` push as written to the client. A
//!   message appended twice under one `seq` is kept once. The store keeps
//!   at most the newest `session-outbox-messages` of a session (older ones
//!   were acknowledged or dropped by the gateway too).
//!
//! The holder writes a session's record when it starts, changes its
//! channels, is suspended or resumed, and appends each direct message before
//! the control API answers for it. When a node is lost, the node that
//! reports it reads the records the lost node held ([`SessionStore::all`]),
//! each one's messages, and adopts the sessions. The gateway side is the
//! server crate's `sessions::replica`.

use crate::BoxFuture;
use bytes::Bytes;

/// Why the store could not do something.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The store is unreachable or failed.
    #[error("the session store is unavailable: {0}")]
    Unavailable(String),
    /// Another writer wrote the record since the revision given.
    #[error("the session record was written by another node")]
    Conflict,
    /// A message is larger than the store takes (NATS: `max_payload`); it
    /// is not stored, and trying again would not help.
    #[error("too large for the session store: {0}")]
    TooLarge(String),
}

/// A session's record as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    /// The connection id.
    pub id: String,
    /// The record (JSON written by the gateway).
    pub record: Bytes,
    /// Its revision, for the next conditional write.
    pub revision: u64,
}

/// Sessions' records and direct messages, shared by the nodes of a cluster.
pub trait SessionStore: Send + Sync + std::fmt::Debug + 'static {
    /// Writes session `id`'s record. With `expected`, only if the record is
    /// still at that revision, `Some(0)` meaning that there is none yet
    /// ([`StoreError::Conflict`] otherwise); without, whatever is there.
    /// Returns the new revision.
    fn put(
        &self,
        id: &str,
        record: Bytes,
        expected: Option<u64>,
    ) -> BoxFuture<'_, Result<u64, StoreError>>;

    /// Session `id`'s record, if it has one.
    fn get(&self, id: &str) -> BoxFuture<'_, Result<Option<StoredRecord>, StoreError>>;

    /// Every session's record (a lost node's sessions are among them).
    fn all(&self) -> BoxFuture<'_, Result<Vec<StoredRecord>, StoreError>>;

    /// Forgets session `id`, record and messages, if its record is still at
    /// revision `expected` (the session ended on the node that wrote it).
    fn remove(&self, id: &str, expected: u64) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Appends direct messages of session `id`, `(seq, push)`, in order;
    /// returns once they are stored. A `seq` stored before is not stored
    /// again.
    fn append(
        &self,
        id: &str,
        messages: Vec<(u64, Bytes)>,
    ) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Session `id`'s stored direct messages, by ascending `seq`.
    fn messages(&self, id: &str) -> BoxFuture<'_, Result<Vec<(u64, Bytes)>, StoreError>>;

    /// How many times the store found that it had lost what it held (a
    /// Redis restarted without its data). Each change makes every holder
    /// write its sessions again, records and messages. A store that cannot
    /// lose its data, or cannot tell, answers 0.
    fn losses(&self) -> u64 {
        0
    }
}
