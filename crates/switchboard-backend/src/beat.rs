//! [`BeatThread`]: a thread of its own for a cluster backend's membership.
//!
//! A node's heartbeats prove to the others that it is alive, and their
//! return renews its [`Lease`](crate::Lease). If they ran on the node's
//! runtime, they would wait behind whatever client work is queued there (a
//! connect storm, a fan-out to every socket), and on a machine short of CPU
//! a busy but healthy node would be declared lost and fence itself. On
//! their own thread they do not queue behind client work, and a thread that
//! mostly sleeps is run promptly by the kernel when it wakes, however busy
//! the node's worker threads are. A backend runs there the heartbeat sender,
//! the listener and the judge of the others' silence, over a connection to
//! its bus of their own (made from the thread, so its I/O runs there too);
//! commands, channel traffic and everything else the node does stay on the
//! node's runtime and main connection (one thread would not keep up with a
//! busy channel's traffic).

use crate::Node;
use std::future::Future;
use std::sync::Arc;
use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// A single-threaded tokio runtime on a thread of its own, running until
/// dropped. Spawn on it with [`BeatThread::handle`].
#[derive(Debug)]
pub struct BeatThread {
    handle: Handle,
    /// Dropped to stop the runtime.
    _stop: oneshot::Sender<()>,
}

impl BeatThread {
    /// Starts the thread (named `name`: Linux shows 15 bytes of it) and
    /// its runtime, with I/O and time enabled.
    pub fn start(name: &str) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                // Runs the spawned tasks until the owner goes; they are
                // dropped with the runtime.
                let _ = runtime.block_on(stopped);
            })?;
        Ok(Self {
            handle,
            _stop: stop,
        })
    }

    /// The runtime's handle, to spawn tasks on the thread.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Runs `work` on the thread and waits for its output. Whatever `work`
    /// spawns (a client's connection task, say) lives on the thread too.
    ///
    /// # Panics
    ///
    /// If `work` panics, or the thread has stopped.
    pub async fn run<F>(&self, work: F) -> F::Output
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match self.handle.spawn(work).await {
            Ok(output) => output,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => panic!("the beat thread stopped: {e}"),
        }
    }
}

/// Fences `node` ([`Node::fence`]) on `work`, the node's runtime, and waits:
/// closing the node's connections is node work, not the beat thread's.
/// `None` if that runtime is shutting down.
pub async fn fence_on(work: &Handle, node: Arc<dyn Node>) -> Option<usize> {
    match work.spawn(async move { node.fence().await }).await {
        Ok(closed) => Some(closed),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn work_runs_on_the_named_thread_while_the_callers_runtime_is_busy() {
        let beats = BeatThread::start("beat-test").unwrap();
        let name = beats
            .run(async { std::thread::current().name().map(str::to_owned) })
            .await;
        assert_eq!(name.as_deref(), Some("beat-test"));
        // A task spawned from the thread stays there.
        let inner = beats
            .run(async {
                tokio::spawn(async { std::thread::current().name().map(str::to_owned) })
                    .await
                    .unwrap()
            })
            .await;
        assert_eq!(inner.as_deref(), Some("beat-test"));
        // A timer on the thread fires while this (single-threaded) test
        // runtime is blocked.
        let (tx, rx) = std::sync::mpsc::channel();
        beats.handle().spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            tx.send(()).unwrap();
        });
        assert!(rx.recv_timeout(std::time::Duration::from_secs(5)).is_ok());
    }

    #[tokio::test]
    async fn dropping_it_stops_its_tasks() {
        let beats = BeatThread::start("beat-test").unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        beats.handle().spawn(async move {
            let _keep = tx;
            std::future::pending::<()>().await;
        });
        drop(beats);
        // The task is dropped with the runtime, and its sender with it.
        let closed = tokio::time::timeout(std::time::Duration::from_secs(5), rx).await;
        assert!(matches!(closed, Ok(Err(_))));
    }
}
