//! Releases that outlive the caller: a guard dropped without `unlock().await`, a session
//! dropped without `close().await`, a cancelled `lock()`.
//!
//! The release runs in a task on the session's runtime, so it completes even when the
//! caller's future was cancelled; each release bounds its own requests and reports its own
//! failures. When that runtime has shut down, the task never runs: the session's keep-alive
//! is gone with it, so the lease's expiry is the release, and a warning says so.

use std::future::Future;

use tokio::runtime::Handle;

/// Spawns `release` on `runtime`. `what` names it in the warning given if it never runs.
pub(crate) fn spawn_release<F>(runtime: &Handle, what: &'static str, release: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    let pending = Pending { what, done: false };
    runtime.spawn(async move {
        release.await;
        pending.finish();
    });
}

/// Warns if dropped before the release ran to completion (its runtime shut down).
struct Pending {
    what: &'static str,
    done: bool,
}

impl Pending {
    fn finish(mut self) {
        self.done = true;
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.done {
            tracing::warn!(
                "{}: no runtime left to run it; the lease's expiry will release instead",
                self.what
            );
        }
    }
}
