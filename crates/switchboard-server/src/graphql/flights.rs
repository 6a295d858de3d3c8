//! One execution per digest and publication: the first caller runs it,
//! later callers (this node's re-execution, other nodes asking the owner)
//! share its result. Results are kept for a while, so a node that asks late
//! still gets the same one instead of a second execution.

use futures_util::future::{BoxFuture, FutureExt, Shared};
use parking_lot::Mutex;
use serde_json::value::RawValue;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A re-execution's payload for subscribers (`None`: nothing to send).
pub(crate) type Update = Option<Arc<RawValue>>;

type Flight = Shared<BoxFuture<'static, Update>>;

/// A digest and a publication.
type Key = (Arc<str>, Box<str>);

/// Most results kept; past it the oldest finished ones go first (one in
/// flight is never dropped: its askers would run it again).
const MAX_KEPT: usize = 10_000;

/// Executions in flight or done lately, by digest and publication.
#[derive(Default)]
pub(crate) struct Flights {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    flights: HashMap<Key, Flight>,
    order: VecDeque<(Instant, Key)>,
}

impl std::fmt::Debug for Flights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flights")
            .field("kept", &self.inner.lock().flights.len())
            .finish()
    }
}

impl Flights {
    /// The result of `digest` for `publication`: shared with whoever asked
    /// first, else made by `run`. Results are kept for `keep` (long enough
    /// for every node asking about one publication).
    pub(crate) async fn once(
        &self,
        digest: &Arc<str>,
        publication: &str,
        keep: Duration,
        run: impl FnOnce() -> BoxFuture<'static, Update>,
    ) -> Update {
        let flight = {
            let mut inner = self.inner.lock();
            let now = Instant::now();
            while let Some((at, key)) = inner.order.front() {
                let done = inner.flights.get(key).is_none_or(|f| f.peek().is_some());
                let old = now.duration_since(*at) > keep || inner.order.len() >= MAX_KEPT;
                if !(old && done) {
                    break;
                }
                let (_, key) = inner.order.pop_front().expect("not empty");
                inner.flights.remove(&key);
            }
            let key = (digest.clone(), Box::<str>::from(publication));
            match inner.flights.get(&key) {
                Some(f) => f.clone(),
                None => {
                    let f = run().shared();
                    inner.flights.insert(key.clone(), f.clone());
                    inner.order.push_back((now, key));
                    f
                }
            }
        };
        flight.await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn one_run_per_digest_and_publication() {
        let flights = Flights::default();
        let runs = Arc::new(AtomicUsize::new(0));
        let d: Arc<str> = "d".into();
        let run = || {
            let runs = runs.clone();
            move || {
                async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    tokio::task::yield_now().await;
                    Some(Arc::from(RawValue::from_string("1".into()).unwrap()))
                }
                .boxed()
            }
        };
        let keep = Duration::from_secs(60);
        let (a, b) = tokio::join!(
            flights.once(&d, "p1", keep, run()),
            flights.once(&d, "p1", keep, run())
        );
        assert_eq!(a.unwrap().get(), "1");
        assert_eq!(b.unwrap().get(), "1");
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        // Late, and for another publication.
        flights.once(&d, "p1", keep, run()).await;
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        flights.once(&d, "p2", keep, run()).await;
        assert_eq!(runs.load(Ordering::SeqCst), 2);
    }
}
