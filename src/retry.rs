//! Retrying requests that failed for transient reasons, with jittered back-off.
//!
//! etcd-client balances requests across endpoints but does not fail over: with one member
//! down, some requests fail `Unavailable` although the cluster is healthy. And when the
//! raft leader dies, a write in flight at a follower hangs until etcd's request timeout
//! (5 s + 2 election timeouts, measured: 6 s) although a new leader is elected within
//! about one election timeout. So each attempt is cut off after [`ATTEMPT_TIMEOUT`] and
//! retried until the caller's deadline. Only requests that are safe to apply twice come
//! here: reads, and writes guarded by a compare that a first application falsifies
//! (create-if-absent, fenced by create revision). A create-if-absent is safe only while
//! the key stays: an abandoned attempt delivered after its release creates it again,
//! which the session then deletes (see `late_join`).

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

use crate::error::{Error, Result, is_answer_too_large, is_transient, was_not_applied};

/// The first back-off step; steps double up to [`MAX_STEP`].
const FIRST_STEP: Duration = Duration::from_millis(20);
const MAX_STEP: Duration = Duration::from_secs(1);
/// How long one attempt may go unanswered before it is abandoned and sent again.
pub(crate) const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// Stands in for a deadline too far away to compute (about 30 years).
const FAR_FUTURE: Duration = Duration::from_secs(30 * 365 * 24 * 60 * 60);

/// `limit` from now; a limit too long to add (say `Duration::MAX`, for "no limit") gives a
/// deadline about 30 years away.
pub(crate) fn deadline_after(limit: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(limit).unwrap_or(now + FAR_FUTURE)
}

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
    let deadline = deadline_after(limit);
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

/// [`retry`] for a write: also says, with the answer or the error, whether an attempt that
/// did not succeed may have been applied all the same: because it failed in transit
/// (unless [`was_not_applied`] says it never got that far), went unanswered until it was
/// cut off, or was applied but its answer was too large to take. A refusal by etcd, for
/// what the request is, was not applied.
pub(crate) async fn retry_write<H, T, F, Fut>(
    handle: &H,
    limit: Duration,
    mut request: F,
) -> (Result<T>, bool)
where
    H: Clone,
    F: FnMut(H) -> Fut,
    Fut: Future<Output = Result<T, etcd_client::Error>>,
{
    let in_flight = AtomicBool::new(false);
    let maybe_applied = AtomicBool::new(false);
    let answer = retry(handle, limit, |handle| {
        let attempt = request(handle);
        let (in_flight, maybe_applied) = (&in_flight, &maybe_applied);
        async move {
            // Still set: the previous attempt was cut off before its answer came.
            if in_flight.swap(true, Ordering::Relaxed) {
                maybe_applied.store(true, Ordering::Relaxed);
            }
            let answer = attempt.await;
            in_flight.store(false, Ordering::Relaxed);
            if matches!(&answer, Err(error) if may_have_applied(error)) {
                maybe_applied.store(true, Ordering::Relaxed);
            }
            answer
        }
    })
    .await;
    // Still set: the last attempt was cut off at the deadline.
    let cut_off = in_flight.into_inner();
    (answer, maybe_applied.into_inner() || cut_off)
}

/// Whether a write that failed with `error` may have been applied.
fn may_have_applied(error: &etcd_client::Error) -> bool {
    (is_transient(error) && !was_not_applied(error)) || is_answer_too_large(error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

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

    #[tokio::test(start_paused = true)]
    async fn no_limit_is_a_limit_far_away() {
        let answer = retry(&idle_client().await, Duration::MAX, |_| async { Ok(1) }).await;
        assert_eq!(answer.unwrap(), 1);
    }

    /// A write whose first attempt ends as `first`, and whose second succeeds: whether
    /// `retry_write` says the first may have applied.
    async fn first_may_have_applied(first: Option<etcd_client::Error>) -> bool {
        let mut first = Some(first);
        let (answer, maybe_applied) =
            retry_write(&idle_client().await, Duration::from_secs(5), |_| {
                let outcome = first.take();
                async move {
                    match outcome {
                        Some(Some(error)) => Err(error),
                        Some(None) => std::future::pending().await,
                        None => Ok("applied"),
                    }
                }
            })
            .await;
        assert_eq!(answer.unwrap(), "applied");
        maybe_applied
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_cut_off_at_the_deadline_may_have_applied() {
        let limit = Duration::from_secs(1);
        let (answer, maybe_applied) = retry_write(&idle_client().await, limit, |_| {
            std::future::pending::<Result<(), etcd_client::Error>>()
        })
        .await;
        assert!(matches!(answer, Err(Error::Timeout { .. })), "{answer:?}");
        assert!(maybe_applied);
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_cut_off_unanswered_or_failed_in_transit_may_have_applied() {
        assert!(first_may_have_applied(None).await, "cut off unanswered");
        assert!(
            first_may_have_applied(Some(unavailable())).await,
            "failed in transit"
        );
        let refused = tonic::Status::unavailable("tcp connect error: connection refused");
        let refused = etcd_client::Error::GRpcStatus(refused);
        assert!(!first_may_have_applied(Some(refused)).await, "never sent");
    }

    /// Whether `retry_write` says a write that failed with `error` may have applied.
    async fn failed_write_may_have_applied(error: tonic::Status) -> bool {
        let mut error = Some(etcd_client::Error::GRpcStatus(error));
        let (answer, maybe_applied) =
            retry_write(&idle_client().await, Duration::from_secs(5), |_| {
                let error = error.take().expect("one attempt");
                async move { Err::<(), _>(error) }
            })
            .await;
        assert!(answer.is_err());
        maybe_applied
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_etcd_refused_was_not_applied_unless_only_its_answer_was_too_large() {
        let refused = tonic::Status::not_found("etcdserver: requested lease not found");
        assert!(!failed_write_may_have_applied(refused).await);
        let too_large = tonic::Status::out_of_range(
            "Error, decoded message length too large: found 4194649 bytes",
        );
        assert!(failed_write_may_have_applied(too_large).await);
    }
}
