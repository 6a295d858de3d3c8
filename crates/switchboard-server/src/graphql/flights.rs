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

/// How long a publication's result is kept for late askers.
const KEEP: Duration = Duration::from_secs(60);
/// Most results kept.
const MAX_KEPT: usize = 100_000;

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
    /// first, else made by `run`.
    pub(crate) async fn once(
        &self,
        digest: &Arc<str>,
        publication: &str,
        run: impl FnOnce() -> BoxFuture<'static, Update>,
    ) -> Update {
        let flight = {
            let mut inner = self.inner.lock();
            let now = Instant::now();
            while inner
                .order
                .front()
                .is_some_and(|(at, _)| now.duration_since(*at) > KEEP)
                || inner.order.len() >= MAX_KEPT
            {
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
        let (a, b) = tokio::join!(flights.once(&d, "p1", run()), flights.once(&d, "p1", run()));
        assert_eq!(a.unwrap().get(), "1");
        assert_eq!(b.unwrap().get(), "1");
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        // Late, and for another publication.
        flights.once(&d, "p1", run()).await;
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        flights.once(&d, "p2", run()).await;
        assert_eq!(runs.load(Ordering::SeqCst), 2);
    }
}
