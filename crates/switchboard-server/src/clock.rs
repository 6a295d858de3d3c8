//! Wall-clock time as the protocols carry it (Unix milliseconds). A leaf:
//! monotonic deadlines use `Instant` where they are kept.

use std::time::{SystemTime, UNIX_EPOCH};

/// Unix time in milliseconds.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}
