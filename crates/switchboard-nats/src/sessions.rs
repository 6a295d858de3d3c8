//! [`NatsSessions`]: the [`SessionStore`] over JetStream.
//!
//! - Records live in the key-value bucket `<prefix>_sessions`, one key per
//!   session (its connection id); a conditional write is a KV update at the
//!   revision last seen, a removal a purge at that revision. Keys expire
//!   after [`RECORD_AGE`] unless written again (the gateway rewrites a
//!   record well before).
//! - Direct messages go to the stream `<prefix>_session_messages`, subject
//!   `<prefix>.session.<connection id>`, each with its `seq` in the
//!   `Switchboard-Seq` header and `Nats-Msg-Id: <connection id>:<seq>`, so
//!   a message appended twice within the duplicate window is stored once.
//!   The stream keeps the newest `session_messages` per subject, for at most
//!   [`MESSAGE_AGE`].
//!
//! Both are made on first use (again after a failure, at most every
//! [`RETRY`]); without JetStream every call fails `Unavailable`.

use crate::NatsConfig;
use async_nats::jetstream::context::{Context, PublishErrorKind};
use async_nats::jetstream::kv::{self, Operation, UpdateErrorKind};
use async_nats::jetstream::stream::{self, DiscardPolicy, StorageType, Stream};
use async_nats::jetstream::{self as js};
use async_nats::{Client, HeaderMap};
use bytes::Bytes;
use futures_util::{StreamExt as _, TryStreamExt as _};
use parking_lot::Mutex;
use std::time::{Duration, Instant};
use switchboard_backend::{BoxFuture, SessionStore, StoreError, StoredRecord};
use switchboard_proto::cluster::Subjects;

/// How long a record lives without being written again.
pub const RECORD_AGE: Duration = Duration::from_secs(48 * 3600);

/// How long a direct message is kept: longer than the longest session ttl.
pub const MESSAGE_AGE: Duration = Duration::from_secs(25 * 3600);

/// How long after a failure to make the bucket and stream they are tried
/// again.
const RETRY: Duration = Duration::from_secs(5);

/// The header carrying a stored message's `seq`.
const SEQ_HEADER: &str = "Switchboard-Seq";

/// Records reads run at once by [`SessionStore::all`].
const READ_CONCURRENCY: usize = 32;

/// The session store over JetStream (see the module docs).
#[derive(Debug)]
pub struct NatsSessions {
    js: Context,
    subjects: Subjects,
    config: NatsConfig,
    made: tokio::sync::Mutex<Option<(kv::Store, Stream)>>,
    retry_at: Mutex<Option<Instant>>,
}

fn down(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// A conditional write that found another revision is a conflict.
fn conflict_or_down(e: kv::UpdateError) -> StoreError {
    match e.kind() {
        UpdateErrorKind::WrongLastRevision => StoreError::Conflict,
        _ => down(e),
    }
}

impl NatsSessions {
    /// The store for the cluster on `client` with `config`.
    pub fn new(client: Client, config: NatsConfig) -> Self {
        Self {
            js: js::new(client),
            subjects: Subjects::new(&config.prefix),
            config,
            made: tokio::sync::Mutex::new(None),
            retry_at: Mutex::new(None),
        }
    }

    /// The bucket and the stream, made on first use.
    async fn made(&self) -> Result<(kv::Store, Stream), StoreError> {
        let mut made = self.made.lock().await;
        if let Some(m) = made.as_ref() {
            return Ok(m.clone());
        }
        if self.retry_at.lock().is_some_and(|t| Instant::now() < t) {
            return Err(StoreError::Unavailable(
                "JetStream was not available for the session store".into(),
            ));
        }
        let r = tokio::time::timeout(self.config.request_timeout * 2, self.make()).await;
        match r {
            Ok(Ok(m)) => {
                *made = Some(m.clone());
                Ok(m)
            }
            other => {
                let why = match other {
                    Ok(Err(e)) => e.to_string(),
                    _ => "timed out".into(),
                };
                let first = self
                    .retry_at
                    .lock()
                    .replace(Instant::now() + RETRY)
                    .is_none();
                if first {
                    tracing::warn!(error = %why, "no JetStream for the session store: sessions live only on their node until it is there");
                }
                Err(StoreError::Unavailable(why))
            }
        }
    }

    async fn make(&self) -> Result<(kv::Store, Stream), StoreError> {
        let bucket = self.subjects.session_bucket();
        let replicas = self.config.channel_log_replicas;
        // Made as a stream directly (see `cluster.rs` on NATS before 2.10).
        let records = stream::Config {
            name: format!("KV_{bucket}"),
            subjects: vec![format!("$KV.{bucket}.>")],
            description: Some("Switchboard: sessions' records".into()),
            max_messages_per_subject: 1,
            max_age: RECORD_AGE,
            discard: DiscardPolicy::New,
            allow_rollup: true,
            allow_direct: true,
            num_replicas: replicas,
            ..Default::default()
        };
        if self.js.get_key_value(&bucket).await.is_err() {
            self.js.get_or_create_stream(records).await.map_err(down)?;
        }
        let store = self.js.get_key_value(&bucket).await.map_err(down)?;
        let messages = stream::Config {
            name: self.subjects.session_stream(),
            subjects: vec![self.subjects.session_messages_all()],
            description: Some("Switchboard: sessions' direct messages".into()),
            max_messages_per_subject: i64::from(self.config.session_messages.max(1)),
            max_age: MESSAGE_AGE,
            duplicate_window: Duration::from_secs(120),
            storage: StorageType::File,
            discard: DiscardPolicy::Old,
            allow_direct: true,
            num_replicas: replicas,
            ..Default::default()
        };
        let stream = self.js.get_or_create_stream(messages).await.map_err(down)?;
        Ok((store, stream))
    }

    async fn record(
        &self,
        store: &kv::Store,
        id: &str,
    ) -> Result<Option<StoredRecord>, StoreError> {
        let entry = store.entry(id).await.map_err(down)?;
        Ok(entry
            .filter(|e| e.operation == Operation::Put)
            .map(|e| StoredRecord {
                id: id.to_owned(),
                record: e.value,
                revision: e.revision,
            }))
    }
}

impl SessionStore for NatsSessions {
    fn put(
        &self,
        id: &str,
        record: Bytes,
        expected: Option<u64>,
    ) -> BoxFuture<'_, Result<u64, StoreError>> {
        let id = id.to_owned();
        Box::pin(async move {
            let (store, _) = self.made().await?;
            match expected {
                None => store.put(&id, record).await.map_err(down),
                // None yet (a removed one may have left its marker).
                Some(0) => store.create(&id, record).await.map_err(|e| match e.kind() {
                    kv::CreateErrorKind::AlreadyExists => StoreError::Conflict,
                    _ => down(e),
                }),
                Some(revision) => store
                    .update(&id, record, revision)
                    .await
                    .map_err(conflict_or_down),
            }
        })
    }

    fn get(&self, id: &str) -> BoxFuture<'_, Result<Option<StoredRecord>, StoreError>> {
        let id = id.to_owned();
        Box::pin(async move {
            let (store, _) = self.made().await?;
            self.record(&store, &id).await
        })
    }

    fn all(&self) -> BoxFuture<'_, Result<Vec<StoredRecord>, StoreError>> {
        Box::pin(async move {
            let (store, _) = self.made().await?;
            let keys: Vec<String> = store
                .keys()
                .await
                .map_err(down)?
                .try_collect()
                .await
                .map_err(down)?;
            let store = &store;
            let records: Vec<Result<Option<StoredRecord>, StoreError>> =
                futures_util::stream::iter(keys)
                    .map(|k| async move { self.record(store, &k).await })
                    .buffer_unordered(READ_CONCURRENCY)
                    .collect()
                    .await;
            let mut all = Vec::with_capacity(records.len());
            for r in records {
                all.extend(r?);
            }
            Ok(all)
        })
    }

    fn remove(&self, id: &str, expected: u64) -> BoxFuture<'_, Result<(), StoreError>> {
        let id = id.to_owned();
        Box::pin(async move {
            let (store, stream) = self.made().await?;
            store
                .purge_expect_revision(&id, Some(expected))
                .await
                .map_err(conflict_or_down)?;
            stream
                .purge()
                .filter(self.subjects.session_messages(&id))
                .await
                .map_err(down)?;
            Ok(())
        })
    }

    fn append(
        &self,
        id: &str,
        messages: Vec<(u64, Bytes)>,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        let id = id.to_owned();
        Box::pin(async move {
            self.made().await?;
            let subject = self.subjects.session_messages(&id);
            // Sent in order, then their acknowledgements awaited.
            let mut acks = Vec::with_capacity(messages.len());
            for (seq, push) in messages {
                let mut headers = HeaderMap::new();
                headers.insert(SEQ_HEADER, seq.to_string().as_str());
                headers.insert("Nats-Msg-Id", format!("{id}:{seq}").as_str());
                let ack = self
                    .js
                    .publish_with_headers(subject.clone(), headers, push)
                    .await
                    .map_err(|e| match e.kind() {
                        PublishErrorKind::MaxPayloadExceeded => StoreError::TooLarge(e.to_string()),
                        _ => down(e),
                    })?;
                acks.push(ack);
            }
            for ack in acks {
                ack.await.map_err(down)?;
            }
            Ok(())
        })
    }

    fn messages(&self, id: &str) -> BoxFuture<'_, Result<Vec<(u64, Bytes)>, StoreError>> {
        let subject = self.subjects.session_messages(id);
        Box::pin(async move {
            let (_, stream) = self.made().await?;
            let mut out: Vec<(u64, Bytes)> = Vec::new();
            let mut from = 1;
            loop {
                let m = match stream
                    .direct_get_next_for_subject(&subject, Some(from))
                    .await
                {
                    Ok(m) => m,
                    Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => break,
                    Err(e) => return Err(down(e)),
                };
                from = m.sequence + 1;
                let seq = m
                    .headers
                    .get(SEQ_HEADER)
                    .and_then(|v| v.as_str().parse::<u64>().ok())
                    .ok_or_else(|| down(format!("message {} has no seq", m.sequence)))?;
                out.push((seq, m.payload));
            }
            out.sort_by_key(|(seq, _)| *seq);
            out.dedup_by_key(|(seq, _)| *seq);
            Ok(out)
        })
    }
}
