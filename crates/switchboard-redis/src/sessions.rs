//! [`RedisSessions`]: the [`SessionStore`] over Redis.
//!
//! - **Records** are the fields of one hash, `{<prefix>}:sessions` (field:
//!   the connection id, value: `<revision> <record>`). Revisions come from
//!   the counter `{<prefix>}:sessions:rev`, so a record removed and written
//!   again never gets back an old revision. Conditional writes and removals
//!   are Lua scripts, checked and applied atomically.
//! - **Messages** are a stream per session, `<prefix>:smsg:{<id>}`, whose
//!   entry ids are the `seq`s: an append skips any `seq` not above the
//!   newest stored, keeps the newest `session-outbox-messages` (`MAXLEN`),
//!   and the key expires 25 hours after the last append (a session's ttl
//!   is at most 24 hours).

use crate::connect::Redis;
use crate::keys::Keys;
use crate::RedisConfig;
use bytes::Bytes;
use redis::{AsyncCommands, Value};
use switchboard_backend::{BoxFuture, SessionStore, StoreError, StoredRecord};

/// How long a session's messages outlive its last append.
const MESSAGES_TTL_MS: u64 = 25 * 3600 * 1000;

/// Records read per `HSCAN` round by [`SessionStore::all`].
const SCAN_BATCH: usize = 1_000;

const PUT: &str = r"
local cur = redis.call('HGET', KEYS[1], ARGV[1])
local rev = 0
if cur then rev = tonumber(string.match(cur, '^(%d+) ')) end
if ARGV[3] ~= '' and tonumber(ARGV[3]) ~= rev then return -1 end
local next = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[1], ARGV[1], next .. ' ' .. ARGV[2])
return next
";

const REMOVE: &str = r"
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur then return 1 end
if tonumber(string.match(cur, '^(%d+) ')) ~= tonumber(ARGV[2]) then return -1 end
redis.call('HDEL', KEYS[1], ARGV[1])
return 1
";

const APPEND: &str = r"
local last = 0
local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #newest > 0 then last = tonumber(string.match(newest[1][1], '^(%d+)')) end
for i = 2, #ARGV - 1, 2 do
  local seq = tonumber(ARGV[i])
  if seq > last then
    redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[1], seq .. '-0', 'p', ARGV[i + 1])
    last = seq
  end
end
redis.call('PEXPIRE', KEYS[1], ARGV[#ARGV])
return last
";

/// The session store over Redis; see the module docs.
#[derive(Debug)]
pub struct RedisSessions {
    redis: Redis,
    keys: Keys,
    max_messages: u32,
    put: redis::Script,
    remove: redis::Script,
    append: redis::Script,
}

fn down(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// A stored value: its revision and record.
fn parse(id: String, value: &[u8]) -> Option<StoredRecord> {
    let at = value.iter().position(|b| *b == b' ')?;
    let revision = std::str::from_utf8(&value[..at]).ok()?.parse().ok()?;
    Some(StoredRecord {
        id,
        record: Bytes::copy_from_slice(&value[at + 1..]),
        revision,
    })
}

impl RedisSessions {
    /// The store of the cluster `config` names, over `redis`.
    pub fn new(redis: Redis, config: &RedisConfig) -> Self {
        Self {
            redis,
            keys: Keys::new(&config.prefix),
            max_messages: config.session_messages.max(1),
            put: redis::Script::new(PUT),
            remove: redis::Script::new(REMOVE),
            append: redis::Script::new(APPEND),
        }
    }
}

impl SessionStore for RedisSessions {
    fn put(
        &self,
        id: &str,
        record: Bytes,
        expected: Option<u64>,
    ) -> BoxFuture<'_, Result<u64, StoreError>> {
        let id = id.to_owned();
        Box::pin(async move {
            let mut conn = self.redis.conn();
            let revision: i64 = self
                .put
                .key(self.keys.sessions())
                .key(self.keys.session_revisions())
                .arg(&id)
                .arg(record.as_ref())
                .arg(expected.map(|e| e.to_string()).unwrap_or_default())
                .invoke_async(&mut conn)
                .await
                .map_err(down)?;
            if revision < 0 {
                return Err(StoreError::Conflict);
            }
            Ok(revision as u64)
        })
    }

    fn get(&self, id: &str) -> BoxFuture<'_, Result<Option<StoredRecord>, StoreError>> {
        let id = id.to_owned();
        Box::pin(async move {
            let mut conn = self.redis.conn();
            let value: Option<Vec<u8>> =
                conn.hget(self.keys.sessions(), &id).await.map_err(down)?;
            Ok(value.and_then(|v| parse(id, &v)))
        })
    }

    fn all(&self) -> BoxFuture<'_, Result<Vec<StoredRecord>, StoreError>> {
        Box::pin(async move {
            let mut conn = self.redis.conn();
            let mut records = Vec::new();
            let mut cursor = 0u64;
            loop {
                let (next, fields): (u64, Vec<(String, Vec<u8>)>) = redis::cmd("HSCAN")
                    .arg(self.keys.sessions())
                    .arg(cursor)
                    .arg("COUNT")
                    .arg(SCAN_BATCH)
                    .query_async(&mut conn)
                    .await
                    .map_err(down)?;
                records.extend(fields.into_iter().filter_map(|(id, v)| parse(id, &v)));
                if next == 0 {
                    break;
                }
                cursor = next;
            }
            // HSCAN may return a field twice.
            records.sort_by(|a, b| a.id.cmp(&b.id));
            records.dedup_by(|a, b| a.id == b.id);
            Ok(records)
        })
    }

    fn remove(&self, id: &str, expected: u64) -> BoxFuture<'_, Result<(), StoreError>> {
        let id = id.to_owned();
        Box::pin(async move {
            let mut conn = self.redis.conn();
            let removed: i64 = self
                .remove
                .key(self.keys.sessions())
                .arg(&id)
                .arg(expected)
                .invoke_async(&mut conn)
                .await
                .map_err(down)?;
            if removed < 0 {
                return Err(StoreError::Conflict);
            }
            let _: () = conn
                .del(self.keys.session_messages(&id))
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
            if messages.is_empty() {
                return Ok(());
            }
            let mut conn = self.redis.conn();
            let mut call = self.append.key(self.keys.session_messages(&id));
            call.arg(self.max_messages);
            for (seq, push) in &messages {
                call.arg(*seq).arg(push.as_ref());
            }
            call.arg(MESSAGES_TTL_MS);
            let _: i64 = call.invoke_async(&mut conn).await.map_err(down)?;
            Ok(())
        })
    }

    fn losses(&self) -> u64 {
        self.redis.losses()
    }

    fn messages(&self, id: &str) -> BoxFuture<'_, Result<Vec<(u64, Bytes)>, StoreError>> {
        let id = id.to_owned();
        Box::pin(async move {
            let mut conn = self.redis.conn();
            let entries: Vec<(String, Vec<(String, Value)>)> = redis::cmd("XRANGE")
                .arg(self.keys.session_messages(&id))
                .arg("-")
                .arg("+")
                .query_async(&mut conn)
                .await
                .map_err(down)?;
            Ok(entries
                .into_iter()
                .filter_map(|(entry, fields)| {
                    let seq = entry.split('-').next()?.parse().ok()?;
                    let push = fields.into_iter().find_map(|(name, value)| match value {
                        Value::BulkString(b) if name == "p" => Some(Bytes::from(b)),
                        _ => None,
                    })?;
                    Some((seq, push))
                })
                .collect())
        })
    }
}
