//! Releases that outlive the caller: a guard dropped without `unlock().await`, a session
//! dropped without `close().await`, a cancelled `lock()`.
//!
//! The release runs in a task on the session's runtime, so it completes even when the
//! caller's future was cancelled; each release bounds its own requests and reports its own
//! failures. When that runtime has shut down, the task never runs: the session's keep-alive
//! is gone with it, so the lease's expiry is the release, and a warning says so. A release
//! that panicked is warned about as such.

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

/// Warns if dropped before the release ran to completion: its runtime shut down, or it
/// panicked.
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
        if self.done {
            return;
        }
        let why = if std::thread::panicking() {
            "it panicked"
        } else {
            "no runtime left to run it"
        };
        tracing::warn!(
            "{}: {why}; the lease's expiry will release instead",
            self.what
        );
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::spawn_release;

    /// Collects what the `tracing` subscriber writes.
    #[derive(Clone, Default)]
    struct Log(Arc<Mutex<Vec<u8>>>);

    impl Write for Log {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Log {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
        }
    }

    fn warnings_of(run: impl FnOnce()) -> String {
        let log = Log::default();
        let writer = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, run);
        log.text()
    }

    fn current_thread_runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    }

    #[test]
    fn a_release_left_by_a_runtime_shut_down_says_so() {
        let log = warnings_of(|| {
            let runtime = current_thread_runtime();
            spawn_release(runtime.handle(), "unlock", std::future::pending());
        });
        assert!(log.contains("unlock: no runtime left to run it"), "{log}");
    }

    #[test]
    fn a_release_that_panicked_says_so() {
        let log = warnings_of(|| {
            let runtime = current_thread_runtime();
            spawn_release(runtime.handle(), "unlock", async {
                panic!("broken release")
            });
            runtime.block_on(tokio::task::yield_now());
        });
        assert!(log.contains("unlock: it panicked"), "{log}");
        assert!(!log.contains("no runtime left"), "{log}");
    }
}
