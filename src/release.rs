//! Releases that outlive the caller: a guard dropped without `unlock().await`, a session
//! dropped without `close().await`.
//!
//! The release runs in a task on the runtime the guard or session was created on, with its
//! own deadline, so it completes even when the caller's future was cancelled. When that
//! runtime has shut down, the task never runs: the lease's expiry is then the release, and
//! a warning says so.

use std::future::Future;
use std::time::Duration;

use tokio::runtime::Handle;

use crate::error::Result;

/// Spawns `release` on `runtime`, cut off after `deadline`. `what` names it in logs.
pub(crate) fn spawn_release<F>(runtime: &Handle, deadline: Duration, what: &'static str, release: F)
where
    F: Future<Output = Result<()>> + Send + 'static,
{
    let pending = Pending { what, done: false };
    runtime.spawn(async move {
        match tokio::time::timeout(deadline, release).await {
            Ok(Ok(())) => tracing::debug!("{what} done in the background"),
            Ok(Err(error)) => tracing::warn!(
                error = &error as &dyn std::error::Error,
                "{what} failed; the lease's expiry will release instead"
            ),
            Err(_) => tracing::warn!(
                ?deadline,
                "{what} timed out; the lease's expiry will release instead"
            ),
        }
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
