//! Retrying requests that failed for transient reasons, with jittered back-off.
//!
//! etcd-client balances requests across endpoints but does not fail over: with one member
//! down, some requests fail `Unavailable` although the cluster is healthy. And when the
//! raft leader dies, a write in flight at a follower hangs until etcd's request timeout
//! (5 s + 2 election timeouts, measured: 6 s) although a new leader is elected within
//! about one election timeout. So each attempt is cut off after [`ATTEMPT_TIMEOUT`] and
//! retried until the caller's deadline. Only requests that are safe to apply twice come
//! here: reads, and writes guarded by a compare that a first application falsifies
//! (create-if-absent, fenced by create revision).

use std::future::Future;
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

use crate::error::{Error, Result, is_transient};

/// The first back-off step; steps double up to [`MAX_STEP`].
const FIRST_STEP: Duration = Duration::from_millis(20);
const MAX_STEP: Duration = Duration::from_secs(1);
/// How long one attempt may go unanswered before it is abandoned and sent again.
pub(crate) const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

/// Exponential back-off with full jitter: each wait is uniform in `[0, step]`.
#[derive(Debug)]
pub(crate) struct Backoff {
    step: Duration,
    max: Duration,
}

impl Backoff {
    /// The back-off between attempts of a failed request.
    pub(crate) fn new() -> Backoff {
        Backoff::with_steps(FIRST_STEP, MAX_STEP)
    }

    /// A back-off whose step starts at `first` and doubles up to `max`.
    pub(crate) fn with_steps(first: Duration, max: Duration) -> Backoff {
        Backoff { step: first, max }
    }

    /// The next wait; the step grows for the one after.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let delay = rand::rng().random_range(Duration::ZERO..=self.step);
        self.step = (self.step * 2).min(self.max);
        delay
    }

    pub(crate) async fn wait(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }
}

/// Runs `request` (given its own clone of `handle`, a `Client` or one of its service
/// clients such as `KvClient`, as etcd-client's calls borrow them mutably) until it
/// succeeds, fails with a non-transient error, or `limit` has passed.
/// An attempt unanswered after [`ATTEMPT_TIMEOUT`] is abandoned and sent again.
///
/// Returns the request's answer; the last error if it kept failing (transient or not),
/// also when the deadline cut off a later attempt; or [`Error::Timeout`] if no attempt
/// got an answer at all.
pub(crate) async fn retry<H, T, F, Fut>(handle: &H, limit: Duration, mut request: F) -> Result<T>
where
    H: Clone,
    F: FnMut(H) -> Fut,
    Fut: Future<Output = Result<T, etcd_client::Error>>,
{
    let deadline = Instant::now() + limit;
    let mut backoff = Backoff::new();
    let mut last_error = None;
    loop {
        let cut_off = deadline.min(Instant::now() + ATTEMPT_TIMEOUT);
        match tokio::time::timeout_at(cut_off, request(handle.clone())).await {
            Ok(Ok(answer)) => return Ok(answer),
            Ok(Err(error)) => {
                let delay = backoff.next_delay();
                if !is_transient(&error) || Instant::now() + delay >= deadline {
                    return Err(Error::Etcd(error));
                }
                tracing::debug!(%error, ?delay, "transient etcd error; retrying");
                last_error = Some(error);
                tokio::time::sleep(delay).await;
            }
            Err(_) if cut_off < deadline => {
                tracing::debug!("no answer within {ATTEMPT_TIMEOUT:?}; sending again");
            }
            // The last error says more than "no answer" (e.g. connection refused).
            Err(_) => {
                return Err(last_error.map_or(Error::Timeout { after: limit }, Error::Etcd));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A client that is never used for a request: connecting is lazy.
    async fn idle_client() -> etcd_client::Client {
        etcd_client::Client::connect(["http://127.0.0.1:9"], None)
            .await
            .unwrap()
    }

    fn unavailable() -> etcd_client::Error {
        etcd_client::Error::GRpcStatus(tonic::Status::unavailable("member down"))
    }

    #[tokio::test(start_paused = true)]
    async fn retries_transient_errors_until_success() {
        let calls = AtomicU32::new(0);
        let answer = retry(&idle_client().await, Duration::from_secs(5), |_| async {
            if calls.fetch_add(1, Ordering::SeqCst) < 3 {
                Err(unavailable())
            } else {
                Ok(7)
            }
        })
        .await
        .unwrap();
        assert_eq!(answer, 7);
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn returns_permanent_errors_at_once() {
        let calls = AtomicU32::new(0);
        let error = retry(&idle_client().await, Duration::from_secs(5), |_| async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err::<(), _>(etcd_client::Error::GRpcStatus(
                tonic::Status::permission_denied("no"),
            ))
        })
        .await
        .unwrap_err();
        assert!(matches!(error, Error::Etcd(_)));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn sends_again_when_an_attempt_hangs() {
        let calls = AtomicU32::new(0);
        let answer = retry(&idle_client().await, Duration::from_secs(5), |_| {
            let first = calls.fetch_add(1, Ordering::SeqCst) == 0;
            async move {
                if first {
                    std::future::pending().await
                } else {
                    Ok("answered")
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(answer, "answered");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_at_the_deadline() {
        let client = idle_client().await;
        let limit = Duration::from_secs(2);
        let error = retry(&client, limit, |_| async { Err::<(), _>(unavailable()) })
            .await
            .unwrap_err();
        assert!(error.is_transient());
        let calls = AtomicU32::new(0);
        let fails_then_hangs = retry(&client, limit, |_| {
            let first = calls.fetch_add(1, Ordering::SeqCst) == 0;
            async move {
                if first {
                    return Err::<(), _>(unavailable());
                }
                std::future::pending().await
            }
        })
        .await
        .unwrap_err();
        assert!(
            matches!(fails_then_hangs, Error::Etcd(_)),
            "{fails_then_hangs:?}"
        );
        let hang = retry(&client, limit, |_| std::future::pending::<Result<(), _>>())
            .await
            .unwrap_err();
        assert!(matches!(hang, Error::Timeout { after } if after == Duration::from_secs(2)));
    }
}
