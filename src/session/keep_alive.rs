//! The keep-alive task of a session: renews its lease until the lease is gone.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use etcd_client::Client;
use futures::future::OptionFuture;
use tokio::sync::watch;
use tokio::time::Instant;

use super::secs;
use crate::error::{Error, Result, is_lease_gone};
use crate::retry::{ATTEMPT_TIMEOUT, Backoff, retry_every};

/// A keep-alive stream: the sender of renewals, and their answers.
pub(super) type Stream = (etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream);

/// When the lease expires at the latest without a further renewal, as the keep-alive last
/// counted it (see [`keep_alive`]), shared with the session: [`Session::is_lost`] and
/// [`Session::lost`] check it themselves, so that a keep-alive task that could not run on
/// time (its runtime's threads blocked or busy past the TTL) does not leave the session
/// believing itself alive after etcd may have expired its lease.
///
/// [`Session::is_lost`]: super::Session::is_lost
/// [`Session::lost`]: super::Session::lost
pub(super) struct Deadline(std::sync::Mutex<Instant>);

impl Deadline {
    pub(super) fn new(at: Instant) -> Deadline {
        Deadline(std::sync::Mutex::new(at))
    }

    pub(super) fn get(&self) -> Instant {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Moves the deadline to `to`, if later.
    fn extend(&self, to: Instant) {
        let mut at = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *at = (*at).max(to);
    }
}

/// A renewal that has just succeeded: when it was sent, and the keep-alive stream it was
/// sent on, if any.
pub(super) struct Renewed {
    pub(super) at: Instant,
    pub(super) stream: Option<Stream>,
}

/// Renews the lease every TTL/3 until it is gone, then marks the session lost (and sets
/// `lease_gone` if etcd said so, rather than the time running out).
///
/// `alive_until` is when the lease expires at the latest without a further renewal: an
/// answered renewal moves it to (the time that renewal was sent + TTL). The keep-alive
/// stream is re-opened when it breaks, and another is opened beside it when an answer is
/// overdue (its member may be down), until `alive_until` passes; the first to answer is
/// kept. Opening one is sent again when unanswered for [`answer_due`], the earlier
/// attempts staying in flight in case their link is only slow.
pub(super) async fn keep_alive(
    client: Client,
    lease_id: i64,
    ttl: Duration,
    renewed: Renewed,
    lease_gone: Arc<AtomicBool>,
    alive_until: Arc<Deadline>,
    // Dropped with the future, also unpolled, as when its runtime shuts down first.
    lost: MarkLostOnExit,
) {
    let mut stream = renewed.stream.map(|stream| (stream, renewed.at));
    let mut backoff = Backoff::new();
    let period = renewal_period(ttl);
    let renewing = Renewing {
        client: &client,
        lease_id,
        ttl,
    };
    let said_by_etcd = loop {
        let mut opening = None;
        if let Some((current, renewed_at)) = stream.take() {
            backoff = Backoff::new();
            match renewing.renew(current, renewed_at, &alive_until).await {
                StreamEnd::LeaseGone => break true,
                StreamEnd::TimeRanOut => break false,
                StreamEnd::Broken(replacement) => opening = replacement,
                StreamEnd::Replaced(replacement, attempted) => {
                    stream = Some((*replacement, attempted));
                    continue;
                }
            }
        }
        if Instant::now() >= alive_until.get() {
            break false;
        }
        let opening =
            opening.unwrap_or_else(|| open(client.clone(), lease_id, period, alive_until.get()));
        match opening.await {
            Err(Error::Etcd(error)) if is_lease_gone(&error) => break true,
            Err(error) => {
                tracing::debug!(%error, lease_id, "cannot open the keep-alive stream; retrying");
                let delay = backoff.next_delay();
                tokio::time::sleep_until((Instant::now() + delay).min(alive_until.get())).await;
            }
            Ok((attempted, opened)) => {
                // Opening sent a renewal and etcd-client checked that its answer had TTL > 0.
                alive_until.extend(attempted + ttl);
                stream = Some((opened, attempted));
            }
        }
    };
    let why = if said_by_etcd {
        lease_gone.store(true, Ordering::SeqCst);
        "etcd says it is gone (expired or revoked)"
    } else {
        UNANSWERED_FOR_A_TTL
    };
    lost.lose(why);
}

/// Opening a keep-alive stream, which sends a renewal: when the attempt that opened it
/// was sent, and the stream.
type Opening = Pin<Box<dyn Future<Output = Result<(Instant, Stream)>> + Send>>;

/// Opens a keep-alive stream for `lease_id`, trying until `until`. Another attempt goes
/// out whenever one is unanswered for [`answer_due`]: one sent to a frozen member must not
/// use up the time left for another member to renew the lease.
fn open(client: Client, lease_id: i64, period: Duration, until: Instant) -> Opening {
    Box::pin(async move {
        let left = until.saturating_duration_since(Instant::now());
        retry_every(
            answer_due(period),
            &client,
            "LeaseKeepAlive",
            left,
            |client| {
                // Taken before this attempt is sent: the renewal it makes counts from here.
                let (mut leases, attempted) = (client.lease_client(), Instant::now());
                async move { Ok((attempted, leases.keep_alive(lease_id).await?)) }
            },
        )
        .await
    })
}

/// Why a session is lost when no renewal of its lease was answered in time.
pub(super) const UNANSWERED_FOR_A_TTL: &str = "no keep-alive was answered for a whole TTL";

/// Marks the session lost when dropped: however the keep-alive task ends, nothing renews
/// the lease any more.
pub(super) struct MarkLostOnExit {
    pub(super) lost: watch::Sender<bool>,
    pub(super) lease_id: i64,
}

impl MarkLostOnExit {
    fn lose(&self, why: &str) {
        mark_lost(&self.lost, self.lease_id, why);
    }
}

impl Drop for MarkLostOnExit {
    fn drop(&mut self) {
        // The session was closed, orphaned or dropped already, unless the task was dropped
        // with its runtime, or panicked.
        self.lose("the keep-alive task stopped (its runtime shut down, or it panicked)");
    }
}

/// Tells every waiter that the session is lost, with a warning that says `why`, unless it
/// was lost already or had ended (closed, orphaned or dropped: on purpose).
pub(super) fn mark_lost(lost: &watch::Sender<bool>, lease_id: i64, why: &str) {
    if !lost.send_replace(true) {
        tracing::warn!(lease_id, "lease lost: {why}");
    }
}

/// How often the lease is renewed: a third of its TTL, as Go does.
fn renewal_period(ttl: Duration) -> Duration {
    (ttl / 3).max(Duration::from_millis(100))
}

/// How long a renewal, or an attempt to open a stream, may go unanswered before another
/// stream is tried: an answer takes milliseconds, so at most 2 s, and half the renewal
/// period, so that at least three attempts go out between an unanswered renewal and the
/// expiry two periods later (etcd-client picks a member for each at random, and may pick
/// the unanswering one again).
fn answer_due(period: Duration) -> Duration {
    (period / 2).min(ATTEMPT_TIMEOUT)
}

enum StreamEnd {
    /// etcd answered a renewal with TTL 0: expired or revoked.
    LeaseGone,
    /// No renewal answered for a whole TTL: the lease has expired, unless renewals
    /// reached etcd and only their answers were lost.
    TimeRanOut,
    /// The stream broke: open another, or take the one being opened beside it, if any.
    Broken(Option<Opening>),
    /// Another stream, opened while an answer was overdue, answered first; with when the
    /// attempt that opened it was sent.
    Replaced(Box<Stream>, Instant),
}

/// What renewing through a stream needs besides the stream.
struct Renewing<'a> {
    client: &'a Client,
    lease_id: i64,
    ttl: Duration,
}

impl Renewing<'_> {
    /// Renews through `stream` every TTL/3, counted from when the last renewal was sent
    /// (`renewed_at` at first), until the stream breaks or the lease is gone. While a
    /// renewal is overdue, another stream is opened beside it (see [`open`]); its
    /// renewal, or a late answer on this stream, whichever comes first, counts.
    async fn renew(
        &self,
        (mut keeper, mut answers): Stream,
        renewed_at: Instant,
        alive_until: &Deadline,
    ) -> StreamEnd {
        let period = renewal_period(self.ttl);
        let mut next_renewal = renewed_at + period;
        // When the renewal awaiting its answer was sent.
        let mut pending_since: Option<Instant> = None;
        // When to open another stream, while a renewal is unanswered.
        let mut replace_at: Option<Instant> = None;
        let mut replacement: Option<Opening> = None;
        let mut backoff = Backoff::new();
        loop {
            tokio::select! {
                // An answer already there counts, whatever time it is.
                biased;
                answer = answers.message() => match answer {
                    Ok(Some(answer)) if answer.ttl() > 0 => {
                        if let Some(since) = pending_since.take() {
                            alive_until.extend(since + secs(answer.ttl()));
                            next_renewal = since + period;
                        }
                        (replace_at, replacement) = (None, None);
                    }
                    Ok(Some(_)) => return StreamEnd::LeaseGone,
                    Ok(None) | Err(_) => return StreamEnd::Broken(replacement),
                },
                Some(opened) = OptionFuture::from(replacement.as_mut()),
                    if replacement.is_some() =>
                {
                    match opened {
                        Ok((attempted, stream)) => {
                            // Opening sent a renewal, answered with TTL > 0.
                            alive_until.extend(attempted + self.ttl);
                            return StreamEnd::Replaced(Box::new(stream), attempted);
                        }
                        Err(Error::Etcd(error)) if is_lease_gone(&error) => {
                            return StreamEnd::LeaseGone;
                        }
                        Err(error) => {
                            tracing::debug!(%error, "cannot open another keep-alive stream");
                            replacement = None;
                            replace_at = Some(Instant::now() + backoff.next_delay());
                        }
                    }
                }
                () = tokio::time::sleep_until(alive_until.get()) => return StreamEnd::TimeRanOut,
                () = tokio::time::sleep_until(next_renewal), if pending_since.is_none() => {
                    // Taken before the send: the lease is counted from no later than etcd's.
                    let sending = Instant::now();
                    if keeper.keep_alive().await.is_err() {
                        return StreamEnd::Broken(replacement);
                    }
                    pending_since = Some(sending);
                    replace_at = Some(sending + answer_due(period));
                }
                // Unanswered for long: perhaps its member is down; try through another,
                // while this answer, perhaps only slow, may still come.
                () = tokio::time::sleep_until(replace_at.unwrap_or(alive_until.get())),
                    if replace_at.is_some() =>
                {
                    let (client, until) = (self.client.clone(), alive_until.get());
                    replacement = Some(open(client, self.lease_id, period, until));
                    replace_at = None;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_other_streams_are_tried_between_an_unanswered_renewal_and_expiry() {
        for ttl in [1, 2, 3, 5, 6, 10, 60, 3600].map(Duration::from_secs) {
            let period = renewal_period(ttl);
            // The renewal is sent a period after the last answered one, which it expires
            // a TTL after; the first other stream is tried `answer_due` later, and the next
            // ones each `answer_due` after that.
            let unanswered_for = ttl - period;
            let tries = unanswered_for.as_nanos() / answer_due(period).as_nanos() - 1;
            assert!(tries >= 3, "{tries} tries with a TTL of {ttl:?}");
        }
    }
}
