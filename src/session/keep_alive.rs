//! The keep-alive task of a session: renews its lease until the lease is gone.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use etcd_client::Client;
use tokio::sync::watch;
use tokio::time::Instant;

use super::secs;
use crate::error::{Error, is_lease_not_found};
use crate::retry::{ATTEMPT_TIMEOUT, Backoff, retry_every};

/// A renewal that has just succeeded: when it was sent, and the keep-alive stream it was
/// sent on, if any.
pub(super) struct Renewed {
    pub(super) at: Instant,
    pub(super) stream: Option<(etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream)>,
}

/// Renews the lease every TTL/3 until it is gone, then marks the session lost (and sets
/// `lease_gone` if etcd said so, rather than the time running out).
///
/// `alive_until` is when the lease expires at the latest without a further renewal: an
/// answered renewal moves it to (the time that renewal was sent + TTL). The keep-alive
/// stream is re-opened when it breaks or an answer is overdue (its member may be down),
/// until `alive_until` passes. Opening it is sent again when unanswered for
/// [`answer_due`], the earlier attempts staying in flight in case their link is only slow.
pub(super) async fn keep_alive(
    client: Client,
    lease_id: i64,
    ttl: Duration,
    renewed: Renewed,
    lease_gone: Arc<AtomicBool>,
    // Dropped with the future, also unpolled, as when its runtime shuts down first.
    _lost: MarkLostOnExit,
) {
    let mut alive_until = renewed.at + ttl;
    let mut stream = renewed.stream;
    let mut backoff = Backoff::new();
    let period = renewal_period(ttl);
    let said_by_etcd = loop {
        if let Some((mut keeper, mut answers)) = stream.take() {
            backoff = Backoff::new();
            match renew(&mut keeper, &mut answers, period, &mut alive_until).await {
                StreamEnd::LeaseGone => break true,
                StreamEnd::TimeRanOut => break false,
                StreamEnd::Reopen => {}
            }
        }
        let now = Instant::now();
        if now >= alive_until {
            break false;
        }
        // Another attempt soon: one sent to a frozen member must not use up the time left
        // for another member to renew the lease.
        let left = alive_until - now;
        let opening = retry_every(answer_due(period), &client, left, |mut client| {
            // Taken before this attempt is sent: the renewal it makes counts from here.
            let attempted = Instant::now();
            async move { Ok((attempted, client.lease_keep_alive(lease_id).await?)) }
        });
        match opening.await {
            Err(Error::Etcd(error)) if is_lease_not_found(&error) => break true,
            Err(error) => {
                tracing::debug!(%error, lease_id, "cannot open the keep-alive stream; retrying");
                let delay = backoff.next_delay();
                tokio::time::sleep_until((Instant::now() + delay).min(alive_until)).await;
            }
            Ok((attempted, opened)) => {
                // Opening sent a renewal and etcd-client checked that its answer had TTL > 0.
                alive_until = attempted + ttl;
                stream = Some(opened);
            }
        }
    };
    tracing::debug!(lease_id, said_by_etcd, "lease lost");
    if said_by_etcd {
        lease_gone.store(true, Ordering::SeqCst);
    }
}

/// Marks the session lost when dropped: however the keep-alive task ends, nothing renews
/// the lease any more.
pub(super) struct MarkLostOnExit(pub(super) watch::Sender<bool>);

impl Drop for MarkLostOnExit {
    fn drop(&mut self) {
        self.0.send_replace(true);
    }
}

/// How often the lease is renewed: a third of its TTL, as Go does.
fn renewal_period(ttl: Duration) -> Duration {
    (ttl / 3).max(Duration::from_millis(100))
}

/// How long a renewal may go unanswered before its stream is given up: an answer takes
/// milliseconds, so at most 2 s, leaving time for several other members before expiry.
fn answer_due(period: Duration) -> Duration {
    period.min(ATTEMPT_TIMEOUT)
}

#[derive(Debug)]
enum StreamEnd {
    /// etcd answered a renewal with TTL 0: expired or revoked.
    LeaseGone,
    /// No renewal answered for a whole TTL: the lease has expired, unless renewals
    /// reached etcd and only their answers were lost.
    TimeRanOut,
    /// The stream broke or stopped answering: open another.
    Reopen,
}

/// Renews through one keep-alive stream until it fails or the lease is gone.
async fn renew(
    keeper: &mut etcd_client::LeaseKeeper,
    answers: &mut etcd_client::LeaseKeepAliveStream,
    period: Duration,
    alive_until: &mut Instant,
) -> StreamEnd {
    let mut ticks = tokio::time::interval_at(Instant::now() + period, period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // When the renewal awaiting its answer was sent.
    let mut pending_since: Option<Instant> = None;
    loop {
        let overdue = pending_since.map_or(*alive_until, |since| since + answer_due(period));
        tokio::select! {
            () = tokio::time::sleep_until(*alive_until) => return StreamEnd::TimeRanOut,
            // Unanswered for too long: try again, perhaps through another member.
            () = tokio::time::sleep_until(overdue), if pending_since.is_some() => {
                return StreamEnd::Reopen;
            }
            _ = ticks.tick(), if pending_since.is_none() => {
                // Taken before the send: the lease is counted from no later than etcd's.
                let sending = Instant::now();
                if keeper.keep_alive().await.is_err() {
                    return StreamEnd::Reopen;
                }
                pending_since = Some(sending);
            }
            answer = answers.message() => match answer {
                Ok(Some(answer)) if answer.ttl() > 0 => {
                    if let Some(since) = pending_since.take() {
                        *alive_until = since + secs(answer.ttl());
                    }
                }
                Ok(Some(_)) => return StreamEnd::LeaseGone,
                Ok(None) | Err(_) => return StreamEnd::Reopen,
            },
        }
    }
}
