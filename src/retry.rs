//! Retrying requests that failed for transient reasons, with jittered back-off.
//!
//! etcd-client balances requests across endpoints but does not fail over: with one member
//! down, some requests fail `Unavailable` although the cluster is healthy. And when the
//! raft leader dies, a write in flight at a follower hangs until etcd's request timeout
//! (5 s + 2 election timeouts, measured: 6 s) although a new leader is elected within
//! about one election timeout. So a request unanswered after [`ATTEMPT_TIMEOUT`] is sent
//! again, until the caller's deadline; the earlier attempts stay in flight (up to
//! [`MAX_IN_FLIGHT`]) and the first answer is taken, so that a link or an etcd slower than
//! that still gets its answers. Only requests that are safe to apply twice come here:
//! reads, and writes guarded by a compare that a first application falsifies
//! (create-if-absent, fenced by create revision). A create-if-absent is safe only while
//! the key stays: an attempt left in flight and delivered after its release creates it
//! again, which the session then deletes (see `late_join`).

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use etcd_client::{Client, Txn, TxnResponse};

use futures::StreamExt;
use futures::future::{AbortHandle, abortable};
use futures::stream::FuturesUnordered;
use rand::Rng;
use tokio::time::Instant;

use crate::auth_token::OldToken;
use crate::error::{
    Error, Result, is_answer_too_large, is_no_space, is_transient, was_not_applied,
};

/// The first back-off step; steps double up to [`MAX_STEP`].
const FIRST_STEP: Duration = Duration::from_millis(20);
const MAX_STEP: Duration = Duration::from_secs(1);
/// How long an attempt may go unanswered before the request is sent again.
pub(crate) const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// How many attempts of one request may be in flight: sending another abandons the
/// oldest.
pub(crate) const MAX_IN_FLIGHT: usize = 4;
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

/// Runs `request`, a `call` of etcd's API (its gRPC method's name, such as "Range"), until
/// it succeeds, fails with a non-transient error, or `limit` has passed. `request` is given
/// `client` and clones the part it calls (`kv_client()`, `lease_client()`,
/// `watch_client()`: etcd-client's calls borrow it mutably), which costs a ninth of a whole
/// `Client`'s clone (3.5 KB, 1.8 µs). An attempt unanswered after
/// [`ATTEMPT_TIMEOUT`] is sent again, the first staying in flight: the first answer counts.
/// A request refused for its auth token's revision ("revision of auth store is old") is
/// sent again, after renewing the token if that keeps happening (see [`OldToken`]).
///
/// Returns the request's answer; the last error if it kept failing (transient or not),
/// also when the deadline came with attempts in flight; or [`Error::Timeout`] if no
/// attempt got an answer at all.
pub(crate) async fn retry<T, F, Fut>(
    client: &Client,
    call: &'static str,
    limit: Duration,
    request: F,
) -> Result<T>
where
    F: FnMut(&Client) -> Fut,
    Fut: Future<Output = Result<T, etcd_client::Error>>,
{
    retry_every(ATTEMPT_TIMEOUT, client, call, limit, request).await
}

/// [`retry`], sending the request again when an attempt is unanswered after `resend`.
pub(crate) async fn retry_every<T, F, Fut>(
    resend: Duration,
    client: &Client,
    call: &'static str,
    limit: Duration,
    mut request: F,
) -> Result<T>
where
    F: FnMut(&Client) -> Fut,
    Fut: Future<Output = Result<T, etcd_client::Error>>,
{
    let deadline = deadline_after(limit);
    let mut backoff = Backoff::new();
    let mut last_error = None;
    let mut attempts = FuturesUnordered::new();
    // The attempts in flight, oldest first, by number.
    let mut in_flight: VecDeque<(u64, AbortHandle)> = VecDeque::new();
    let mut sent = 0;
    let mut send_at = Instant::now();
    // The next attempt waits for a back-off after a failure, not for an answer.
    let mut backing_off = false;
    let mut old_token = OldToken::new();
    loop {
        let now = Instant::now();
        // The first attempt is sent whatever the limit; none after the deadline.
        if now >= send_at && (now < deadline || sent == 0) {
            if in_flight.len() == MAX_IN_FLIGHT {
                if let Some((_, oldest)) = in_flight.pop_front() {
                    oldest.abort();
                }
            }
            let (attempt, abort) = abortable(request(client));
            let number = sent;
            attempts.push(async move { (number, attempt.await) });
            in_flight.push_back((number, abort));
            sent += 1;
            send_at = Instant::now() + resend;
            backing_off = false;
        }
        let (number, answer) = tokio::select! {
            // An answer that is there counts, whatever time it is.
            biased;
            Some(answered) = attempts.next() => answered,
            () = tokio::time::sleep_until(send_at.min(deadline)) => {
                if Instant::now() < deadline {
                    if !backing_off {
                        tracing::debug!("no answer within {resend:?}; sending again");
                    }
                    continue;
                }
                // The last error says more than "no answer" (e.g. connection refused).
                let unanswered = Error::Timeout { call, after: limit };
                return Err(last_error.map_or(unanswered, Error::Etcd));
            }
        };
        // An abandoned attempt has no answer.
        let Ok(answer) = answer else { continue };
        in_flight.retain(|(sent, _)| *sent != number);
        match answer {
            Ok(answer) => return Ok(answer),
            Err(error) if !is_transient(&error) => return Err(Error::Etcd(error)),
            Err(error) => {
                let until = deadline.min(Instant::now() + resend);
                old_token.renew_if_refused(client, &error, until).await;
                let delay = backoff.next_delay();
                let resend_at = Instant::now() + delay;
                if resend_at >= deadline && in_flight.is_empty() {
                    return Err(Error::Etcd(error));
                }
                tracing::debug!(%error, ?delay, "transient etcd error; retrying");
                last_error = Some(error);
                // Past the deadline nothing more is sent, and only an answer already there counts.
                backing_off |= resend_at < send_at;
                send_at = send_at.min(resend_at);
            }
        }
    }
}

/// [`retry`] for a write: also says, with the answer or the error, whether an attempt that
/// did not succeed (the one answered included, if its answer is an error) may have been
/// applied all the same: because it failed in transit (unless [`was_not_applied`] says it
/// never got that far), was still unanswered when another answered or the deadline came,
/// or was applied but its answer was too large to take or crossed the backend quota. A
/// refusal by etcd, for what the request is, was not applied.
pub(crate) async fn retry_write<T, F, Fut>(
    client: &Client,
    call: &'static str,
    limit: Duration,
    mut request: F,
) -> (Result<T>, bool)
where
    F: FnMut(&Client) -> Fut,
    Fut: Future<Output = Result<T, etcd_client::Error>>,
{
    // Attempts sent and not answered: abandoned, or still in flight when another answered
    // or the deadline came.
    let unanswered = AtomicUsize::new(0);
    let maybe_applied = AtomicBool::new(false);
    let answer = retry(client, call, limit, |client| {
        let attempt = request(client);
        let (unanswered, maybe_applied) = (&unanswered, &maybe_applied);
        async move {
            unanswered.fetch_add(1, Ordering::Relaxed);
            let answer = attempt.await;
            unanswered.fetch_sub(1, Ordering::Relaxed);
            if matches!(&answer, Err(error) if may_have_applied(error)) {
                maybe_applied.store(true, Ordering::Relaxed);
            }
            answer
        }
    })
    .await;
    (
        answer,
        maybe_applied.into_inner() || unanswered.into_inner() > 0,
    )
}

/// [`retry`] for a Txn that writes nothing.
pub(crate) async fn retry_read_txn(
    client: &Client,
    limit: Duration,
    txn: Txn,
) -> Result<TxnResponse> {
    retry(client, "Txn", limit, |client| {
        let (mut kv, txn) = (client.kv_client(), txn.clone());
        async move { kv.txn(txn).await }
    })
    .await
}

/// [`retry_write`] for a Txn (one safe to apply twice: see the module docs).
pub(crate) async fn retry_write_txn(
    client: &Client,
    limit: Duration,
    txn: Txn,
) -> (Result<TxnResponse>, bool) {
    retry_write(client, "Txn", limit, |client| {
        let (mut kv, txn) = (client.kv_client(), txn.clone());
        async move { kv.txn(txn).await }
    })
    .await
}

/// Whether a write that failed with `error` may have been applied: failed in transit, or
/// answered with an error after its apply (its answer too large to take, or the backend
/// quota crossed by it: see [`is_no_space`]).
fn may_have_applied(error: &etcd_client::Error) -> bool {
    (is_transient(error) && !was_not_applied(error))
        || is_answer_too_large(error)
        || is_no_space(error)
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

    #[test]
    fn backoff_waits_are_jittered_and_their_step_doubles_up_to_its_cap() {
        let (first, max) = (Duration::from_millis(10), Duration::from_millis(100));
        // Samples many back-offs at each of their first steps: every wait is within the
        // step, and the largest seen comes close to it.
        let mut longest = [Duration::ZERO; 8];
        let mut distinct = std::collections::HashSet::new();
        for _ in 0..400 {
            let mut backoff = Backoff::with_steps(first, max);
            for longest in &mut longest {
                let delay = backoff.next_delay();
                *longest = (*longest).max(delay);
                distinct.insert(delay);
            }
        }
        let steps = [10, 20, 40, 80, 100, 100, 100, 100].map(Duration::from_millis);
        for (i, (longest, step)) in longest.into_iter().zip(steps).enumerate() {
            assert!(
                longest <= step,
                "wait {i}: {longest:?} over its step {step:?}"
            );
            assert!(
                longest >= step * 3 / 4,
                "wait {i}: at most {longest:?}, step {step:?}"
            );
        }
        assert!(distinct.len() > 100, "waits are not jittered: {distinct:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn retries_transient_errors_until_success() {
        let calls = AtomicU32::new(0);
        let answer = retry(
            &idle_client().await,
            "Range",
            Duration::from_secs(5),
            |_| async {
                if calls.fetch_add(1, Ordering::SeqCst) < 3 {
                    Err(unavailable())
                } else {
                    Ok(7)
                }
            },
        )
        .await
        .unwrap();
        assert_eq!(answer, 7);
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn returns_permanent_errors_at_once() {
        let calls = AtomicU32::new(0);
        let error = retry(
            &idle_client().await,
            "Range",
            Duration::from_secs(5),
            |_| async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>(etcd_client::Error::GRpcStatus(
                    tonic::Status::permission_denied("no"),
                ))
            },
        )
        .await
        .unwrap_err();
        assert!(matches!(error, Error::Etcd(_)));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn sends_again_when_an_attempt_hangs() {
        let calls = AtomicU32::new(0);
        let answer = retry(
            &idle_client().await,
            "Range",
            Duration::from_secs(5),
            |_| {
                let first = calls.fetch_add(1, Ordering::SeqCst) == 0;
                async move {
                    if first {
                        std::future::pending().await
                    } else {
                        Ok("answered")
                    }
                }
            },
        )
        .await
        .unwrap();
        assert_eq!(answer, "answered");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_answer_to_an_attempt_still_in_flight_is_taken() {
        let calls = AtomicU32::new(0);
        let client = idle_client().await;
        let started = Instant::now();
        let slow = ATTEMPT_TIMEOUT + Duration::from_millis(500);
        let answer = retry(&client, "Range", Duration::from_secs(5), |_| {
            let call = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(slow).await;
                Ok(call)
            }
        })
        .await
        .unwrap();
        assert_eq!(answer, 0, "the first attempt's answer");
        assert_eq!(started.elapsed(), slow);
        assert_eq!(calls.load(Ordering::SeqCst), 2, "sent again meanwhile");
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_that_comes_with_the_deadline_or_a_resend_is_taken() {
        let client = idle_client().await;
        let limit = ATTEMPT_TIMEOUT * 2;
        let at_the_deadline = retry(&client, "Range", limit, |_| async move {
            tokio::time::sleep(limit).await;
            Ok(1)
        });
        assert_eq!(at_the_deadline.await.unwrap(), 1);
        let at_once = retry(&client, "Range", Duration::ZERO, |_| async { Ok(2) });
        assert_eq!(at_once.await.unwrap(), 2);
        // The first attempt answers as the fifth is due, which would abandon it.
        let calls = AtomicU32::new(0);
        let oldest = retry(&client, "Range", Duration::from_secs(30), |_| {
            let call = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(ATTEMPT_TIMEOUT * MAX_IN_FLIGHT as u32).await;
                Ok(call)
            }
        });
        assert_eq!(oldest.await.unwrap(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_in_flight_may_answer_after_another_failed_near_the_deadline() {
        let calls = AtomicU32::new(0);
        let client = idle_client().await;
        let answer = retry(&client, "Range", Duration::from_secs(5), |_| {
            let first = calls.fetch_add(1, Ordering::SeqCst) == 0;
            async move {
                if first {
                    tokio::time::sleep(Duration::from_millis(4_900)).await;
                    Ok("the first")
                } else {
                    Err(unavailable())
                }
            }
        });
        assert_eq!(answer.await.unwrap(), "the first");
    }

    #[tokio::test(start_paused = true)]
    async fn unanswered_attempts_in_flight_are_few() {
        /// Counts the attempts alive, as long as it is.
        struct InFlight<'a>(&'a AtomicUsize);
        impl Drop for InFlight<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let (calls, alive, most) = (AtomicU32::new(0), AtomicUsize::new(0), AtomicUsize::new(0));
        let client = idle_client().await;
        let limit = ATTEMPT_TIMEOUT * 10;
        let error = retry(&client, "Range", limit, |_| {
            calls.fetch_add(1, Ordering::SeqCst);
            let (alive, most) = (&alive, &most);
            async move {
                most.fetch_max(alive.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
                let _in_flight = InFlight(alive);
                std::future::pending::<Result<(), etcd_client::Error>>().await
            }
        })
        .await
        .unwrap_err();
        assert!(matches!(error, Error::Timeout { .. }), "{error:?}");
        assert_eq!(
            calls.load(Ordering::SeqCst),
            10,
            "one every ATTEMPT_TIMEOUT"
        );
        assert_eq!(most.load(Ordering::SeqCst), MAX_IN_FLIGHT);
        assert_eq!(alive.load(Ordering::SeqCst), 0, "none left behind");
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_at_the_deadline() {
        let client = idle_client().await;
        let limit = Duration::from_secs(2);
        let error = retry(&client, "Range", limit, |_| async {
            Err::<(), _>(unavailable())
        })
        .await
        .unwrap_err();
        assert!(error.is_transient());
        let calls = AtomicU32::new(0);
        let fails_then_hangs = retry(&client, "Range", limit, |_| {
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
        let hang = retry(&client, "Range", limit, |_| {
            std::future::pending::<Result<(), _>>()
        })
        .await
        .unwrap_err();
        let named = matches!(hang, Error::Timeout { call: "Range", after } if after.as_secs() == 2);
        assert!(named, "{hang:?}");
        assert_eq!(
            hang.to_string(),
            "no answer from etcd to a Range request within 2s"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn no_limit_is_a_limit_far_away() {
        let answer = retry(&idle_client().await, "Range", Duration::MAX, |_| async {
            Ok(1)
        })
        .await;
        assert_eq!(answer.unwrap(), 1);
    }

    /// A write whose first attempt ends as `first`, and whose second succeeds: whether
    /// `retry_write` says the first may have applied.
    async fn first_may_have_applied(first: Option<etcd_client::Error>) -> bool {
        let mut first = Some(first);
        let (answer, maybe_applied) =
            retry_write(&idle_client().await, "Txn", Duration::from_secs(5), |_| {
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
        let (answer, maybe_applied) = retry_write(&idle_client().await, "Txn", limit, |_| {
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
            retry_write(&idle_client().await, "Txn", Duration::from_secs(5), |_| {
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
        // etcd applies the write that crosses the backend quota, then answers it so.
        let full = tonic::Status::resource_exhausted("etcdserver: mvcc: database space exceeded");
        assert!(failed_write_may_have_applied(full).await);
    }
}
