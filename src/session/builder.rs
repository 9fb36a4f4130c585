//! [`SessionBuilder`]: the options of a new session, and the grant or resume of its lease.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use etcd_client::{Client, LeaseGrantOptions};
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::time::Instant;

use super::keep_alive::{Deadline, MarkLostOnExit, Renewed, keep_alive};
use super::{
    DEFAULT_RELEASE_TIMEOUT, DEFAULT_REQUEST_TIMEOUT, DEFAULT_TTL, Session, Shared, lease_hex,
    revoke_repeatedly, secs, time_to_live,
};
use crate::error::{Error, Result, is_lease_gone, is_lease_taken};
use crate::release::spawn_release;
use crate::retry::{retry, retry_write};

/// The largest TTL etcd grants (its `MaxLeaseTTL`), in seconds.
const MAX_TTL_SECS: u64 = 9_000_000_000;

/// Configures and creates a [`Session`]; see [`Session::builder`] for an example. Go's
/// `concurrency.NewSession` takes its options (`WithTTL`, `WithLease`, `WithContext`) as
/// arguments instead.
#[derive(Clone)]
#[must_use = "a builder does nothing until `build().await`"]
pub struct SessionBuilder {
    client: Client,
    ttl: Option<Duration>,
    lease: Option<i64>,
    release_timeout: Duration,
    request_timeout: Duration,
}

impl fmt::Debug for SessionBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionBuilder")
            .field("ttl", &self.ttl)
            .field("lease", &self.lease)
            .field("release_timeout", &self.release_timeout)
            .field("request_timeout", &self.request_timeout)
            .finish_non_exhaustive()
    }
}

impl SessionBuilder {
    pub(super) fn new(client: Client) -> SessionBuilder {
        SessionBuilder {
            client,
            ttl: None,
            lease: None,
            release_timeout: DEFAULT_RELEASE_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }

    /// The lease's TTL: whole seconds, at least 1 s (default [`DEFAULT_TTL`], 60 s). A
    /// crashed holder's locks are released this long after its last renewal. etcd may
    /// raise TTLs below its minimum; [`Session::ttl`] reports the granted one. Go's
    /// `concurrency.WithTTL`. A TTL that is not a whole number of seconds from 1 s to etcd's
    /// maximum (9,000,000,000 s) makes [`build`](Self::build) return
    /// [`Error::InvalidArgument`].
    pub fn ttl(mut self, ttl: Duration) -> SessionBuilder {
        self.ttl = Some(ttl);
        self
    }

    /// Resumes an existing lease instead of granting one (Go's `concurrency.WithLease`),
    /// e.g. one handed over with [`Session::orphan`]. Its TTL is the one it was granted
    /// with, so it cannot be combined with [`ttl`](Self::ttl): [`build`](Self::build)
    /// returns [`Error::InvalidArgument`] for both, and for a lease etcd does not know.
    ///
    /// Two live sessions on one lease are one owner to etcd: a lock's key is named after
    /// the lease, so both hold a lock either takes, and a release by either releases it
    /// for both. Resume a lease only once its previous session is orphaned or gone.
    pub fn lease(mut self, lease_id: i64) -> SessionBuilder {
        self.lease = Some(lease_id);
        self
    }

    /// How long a background release may take (default [`DEFAULT_RELEASE_TIMEOUT`], 5 s;
    /// not zero): each attempt to delete the key of a guard dropped without an explicit
    /// release (retried for as long as the session lives), each request of the session's
    /// sweeps for keys that join attempts delivered late made (see [`Session`]), the
    /// revoke of a session dropped without [`Session::close`] (after which the lease's
    /// expiry releases), and the revokes of a lease that a failed or dropped
    /// [`build`](Self::build) may have granted (repeated for this long, or a TTL if
    /// shorter). No Go counterpart: Go bounds its requests with the caller's `context`.
    /// Zero makes [`build`](Self::build) return [`Error::InvalidArgument`].
    pub fn release_timeout(mut self, timeout: Duration) -> SessionBuilder {
        self.release_timeout = timeout;
        self
    }

    /// How long one request is retried on transient failures (member down, leader
    /// change, lost connection) before its error is returned (default
    /// [`DEFAULT_REQUEST_TIMEOUT`], 5 s). Waiting for a lock is not limited by this. Not
    /// zero ([`build`](Self::build) returns [`Error::InvalidArgument`]); `Duration::MAX`
    /// retries for as long as it takes. No Go counterpart: Go bounds its requests with the
    /// caller's `context`.
    ///
    /// The bound is per request, so a call that needs more than one may take longer: twice
    /// as long for a build whose retried grant found its lease granted (it then reads the
    /// TTL), a resumed lease (checked, then renewed), a `try_lock` that withdraws a
    /// leftover key and a campaign that finds its key with another value (then written;
    /// three times if the key is gone by then and the lease is checked); once more for a
    /// `lock()` or campaign whose queue is too large for one answer (the join is sent
    /// again without reading it), for one whose waiting key vanishes (the lease is then
    /// checked), and for each time a proclaim finds the key rewritten by another leadership
    /// of the session.
    pub fn request_timeout(mut self, timeout: Duration) -> SessionBuilder {
        self.request_timeout = timeout;
        self
    }

    /// Grants (or resumes) the lease and starts keeping it alive in a task on the current
    /// Tokio runtime; if that runtime shuts down, the session is lost. Mirrors Go's
    /// `concurrency.NewSession` (its lease grant, or `WithLease`, and keep-alive).
    ///
    /// # Errors
    ///
    /// - [`Error::InvalidArgument`]: the TTL is not a whole number of seconds between 1 and
    ///   etcd's maximum (9 000 000 000 s); both a TTL and a lease were given; the lease to
    ///   resume does not exist or has expired; the release or request timeout is zero.
    /// - [`Error::Etcd`]: etcd refused the request (e.g. authentication), or it kept
    ///   failing until the request timeout (e.g. every endpoint refuses connections).
    /// - [`Error::Timeout`]: no answer within the request timeout (endpoints that accept
    ///   connections but do not answer: a stalled link, a hung member).
    /// - [`Error::SessionLost`]: the lease an earlier, unanswered attempt of the grant made
    ///   had already expired when a later attempt found it (the grant took about a TTL),
    ///   or the grant was answered a whole TTL after it was sent (a link slower than the
    ///   TTL), so the lease may have expired already; it is revoked in the background.
    ///
    /// After an error, a lease that an attempt cut off (or failed in transit) may have
    /// granted all the same is revoked in a background task, bounded by the release
    /// timeout. When the grant is answered on an attempt sent again, the earlier one may
    /// still be in transit and grant the lease anew once the session has ended: closing or
    /// dropping the session then repeats its revoke, with back-off, for the release
    /// timeout or the TTL, whichever is shorter (a grant that arrives later still makes a
    /// lease with no keys, which expires after its TTL).
    ///
    /// # Cancel safety
    ///
    /// Dropping the future before it completes revokes, in the background, a lease its
    /// grant may have created (as a build that fails does), for up to the release timeout
    /// (or the TTL, if shorter);
    /// a resumed lease is left as it was. A lease is left to expire after its TTL when the
    /// future is dropped outside a Tokio runtime or as that runtime shuts down, or when a
    /// grant held in transit reaches etcd after those revokes.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime, or in one without its time driver.
    ///
    /// # Example
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use etcd_concurrency::{Error, Session};
    /// # async fn example(client: etcd_client::Client) -> etcd_concurrency::Result<()> {
    /// match Session::builder(client).ttl(Duration::from_millis(500)).build().await {
    ///     Err(Error::InvalidArgument(why)) => println!("refused before anything was sent: {why}"),
    ///     other => drop(other?),
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn build(self) -> Result<Session> {
        if self.release_timeout.is_zero() || self.request_timeout.is_zero() {
            return Err(Error::InvalidArgument(
                "a release or request timeout of zero would fail every attempt".into(),
            ));
        }
        let (lease_id, ttl, renewed, late_grant) = match (self.lease, self.ttl) {
            (Some(_), Some(_)) => {
                return Err(Error::InvalidArgument(
                    "a resumed lease keeps its own TTL: give either `ttl` or `lease`".into(),
                ));
            }
            (Some(id), None) => {
                let (ttl, renewed) = self.resume(id).await?;
                (id, ttl, renewed, false)
            }
            (None, ttl) => {
                let ttl = validate_ttl(ttl.unwrap_or(DEFAULT_TTL))?;
                let sent = Instant::now();
                let (id, granted, late_grant) = self.grant(ttl).await?;
                if Instant::now() >= sent + granted {
                    // Answered a whole TTL after it was sent: etcd may have let the lease
                    // expire already, which the session could not count on.
                    self.revoke_in_background(id, granted);
                    return Err(Error::SessionLost);
                }
                let renewed = Renewed {
                    at: sent,
                    stream: None,
                };
                (id, granted, renewed, late_grant)
            }
        };
        let (lost, _) = watch::channel(false);
        let lease_gone = Arc::new(AtomicBool::new(false));
        let deadline = Arc::new(Deadline::new(renewed.at + ttl));
        let keep_alive = tokio::spawn(keep_alive(
            self.client.clone(),
            lease_id,
            ttl,
            renewed,
            Arc::clone(&lease_gone),
            Arc::clone(&deadline),
            MarkLostOnExit {
                lost: lost.clone(),
                lease_id,
            },
        ))
        .abort_handle();
        Ok(Session {
            shared: Arc::new(Shared {
                client: Arc::new(self.client),
                lease_id,
                ttl,
                release_timeout: self.release_timeout,
                request_timeout: self.request_timeout,
                runtime: Handle::current(),
                lost,
                keep_alive,
                ended: AtomicBool::new(false),
                orphaned: AtomicBool::new(false),
                lease_gone,
                deadline,
                late_grant,
                queues: Default::default(),
                elections: Default::default(),
                late_joins: Default::default(),
            }),
        })
    }

    /// Grants a lease of `ttl` seconds under an id chosen here, so that a retried grant
    /// whose first attempt was applied finds its lease instead of leaking a second one.
    /// Returns the id, the granted TTL, and whether another attempt may still be in
    /// transit and grant the lease again once it has ended.
    ///
    /// If it fails after an attempt that may have been granted (cut off, or failed in
    /// transit), or is dropped while an attempt is in flight, that lease is revoked in the
    /// background, as a dropped session's is: the caller gets no session, so nothing else
    /// would ever revoke it.
    async fn grant(&self, ttl: i64) -> Result<(i64, Duration, bool)> {
        let id = rand::random_range(1..i64::MAX);
        let revoke_unless_kept = RevokeOnDrop(Some((self, id, secs(ttl))));
        let options = LeaseGrantOptions::new().with_id(id);
        let (granted, maybe_granted) =
            retry_write(&self.client, "LeaseGrant", self.request_timeout, |client| {
                let (mut leases, options) = (client.lease_client(), options.clone());
                async move { leases.grant(ttl, Some(options)).await }
            })
            .await;
        let result = match granted {
            Ok(answer) => Ok((answer.id(), secs(answer.ttl()), maybe_granted)),
            // Taken by an earlier attempt only if one may have been granted: otherwise the
            // id is another client's, and the error stands.
            Err(Error::Etcd(error)) if is_lease_taken(&error) && maybe_granted => {
                time_to_live(&self.client, id, self.request_timeout)
                    .await
                    .and_then(|answer| match answer.ttl() {
                        // Granted by an earlier attempt, whose answer was lost, a TTL ago.
                        ..0 => Err(Error::SessionLost),
                        _ => Ok((id, secs(answer.granted_ttl()), maybe_granted)),
                    })
            }
            Err(error) => Err(error),
        };
        if result.is_ok() || !maybe_granted {
            revoke_unless_kept.disarm();
        }
        result
    }

    /// Revokes lease `id`, which a failed or dropped build may have granted, in a
    /// background task. An attempt cut off may still be in transit and grant the lease
    /// after a first revoke found nothing, so the revoke is repeated, with back-off, for
    /// the release timeout or the `ttl` asked for, whichever is shorter.
    fn revoke_in_background(&self, id: i64, ttl: Duration) {
        let limit = self.release_timeout;
        let revokes = revoke_repeatedly(self.client.clone(), id, limit, ttl);
        let what = "revoking the lease of a session build that failed or was dropped";
        match Handle::try_current() {
            Ok(runtime) => spawn_release(&runtime, what, revokes),
            Err(_) => tracing::warn!(
                lease_id = id,
                "a session build was dropped outside a Tokio runtime; the lease it may have \
                 granted expires after its TTL"
            ),
        }
    }

    /// Checks that lease `id` exists and renews it once: the renewal's send time bounds
    /// its expiry exactly (its remaining TTL is only reported in whole seconds). Returns
    /// its granted TTL and the renewal.
    async fn resume(&self, id: i64) -> Result<(Duration, Renewed)> {
        let gone = || {
            let hex = lease_hex(id);
            let why = format!("lease {id} (hex {hex}) does not exist or has expired");
            Error::InvalidArgument(why)
        };
        let answer = time_to_live(&self.client, id, self.request_timeout).await?;
        if answer.ttl() < 0 {
            return Err(gone());
        }
        let sent = Instant::now();
        let stream = match retry(
            &self.client,
            "LeaseKeepAlive",
            self.request_timeout,
            |client| {
                let mut leases = client.lease_client();
                async move { leases.keep_alive(id).await }
            },
        )
        .await
        {
            Err(Error::Etcd(error)) if is_lease_gone(&error) => return Err(gone()),
            other => other?,
        };
        let renewed = Renewed {
            at: sent,
            stream: Some(stream),
        };
        Ok((secs(answer.granted_ttl()), renewed))
    }
}

/// Revokes (in the background) the lease a build's grant may have created, when dropped
/// armed: by a grant that failed after an attempt that may have applied, or whose future
/// was dropped while an attempt was in flight.
struct RevokeOnDrop<'a>(Option<(&'a SessionBuilder, i64, Duration)>);

impl RevokeOnDrop<'_> {
    /// The lease is the session's, or was certainly not granted: nothing to revoke.
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for RevokeOnDrop<'_> {
    fn drop(&mut self) {
        if let Some((builder, id, ttl)) = self.0.take() {
            builder.revoke_in_background(id, ttl);
        }
    }
}

fn validate_ttl(ttl: Duration) -> Result<i64> {
    if ttl.subsec_nanos() != 0 || ttl.as_secs() == 0 || ttl.as_secs() > MAX_TTL_SECS {
        return Err(Error::InvalidArgument(format!(
            "a lease TTL is a whole number of seconds from 1 to {MAX_TTL_SECS}, not {ttl:?}"
        )));
    }
    Ok(ttl.as_secs() as i64)
}
