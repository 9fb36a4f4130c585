//! [`Session`]: a lease kept alive in the background, the basis of every lock and election.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use etcd_client::{Client, LeaseGrantOptions};
use tokio::runtime::Handle;
use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard, watch};
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::error::{Error, Result, is_lease_gone, is_lease_not_found, is_lease_taken};
use crate::late_join::LateJoins;
use crate::release::spawn_release;
use crate::retry::{ATTEMPT_TIMEOUT, Backoff, deadline_after, retry, retry_every, retry_write};
use crate::wait::QueueWatch;

/// The TTL of [`Session::new`], as in Go's `concurrency.NewSession`.
pub const DEFAULT_TTL: Duration = Duration::from_secs(60);
/// The default of [`SessionBuilder::release_timeout`]: the bound on each attempt to delete
/// a dropped guard's key, on the whole revoke of a dropped session, and on the revokes of
/// a lease that a failed or dropped build may have granted. No Go counterpart: Go bounds
/// its requests with the caller's `context`.
pub const DEFAULT_RELEASE_TIMEOUT: Duration = Duration::from_secs(5);
/// The default of [`SessionBuilder::request_timeout`] and [`Stm::request_timeout`]. No Go
/// counterpart: Go bounds its requests with the caller's `context`.
///
/// [`Stm::request_timeout`]: crate::Stm::request_timeout
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest TTL etcd grants (its `MaxLeaseTTL`), in seconds.
const MAX_TTL_SECS: u64 = 9_000_000_000;

/// A lease kept alive in the background: the liveness of one process, to which locks and
/// elections attach their keys.
///
/// Creating a session grants a lease (or resumes one) and starts a task that renews it
/// every TTL/3. When the process dies, renewals stop, the lease expires after its TTL and
/// etcd deletes every key attached to it: this is how locks and leadership of a crashed
/// process are released. The TTL counts from the last renewal, up to TTL/3 before the
/// crash, and etcd looks for expired leases every 500 ms, so the release comes at most
/// about half a second after the TTL (measured with a 2 s TTL: 1.45-2.44 s). Mirrors Go's
/// `concurrency.Session`.
///
/// # Unreachable and frozen members
///
/// Requests that fail in transit are retried, and sent again when unanswered for 2 s (so
/// a write stuck behind a dead raft leader goes through another member; the first attempt
/// stays in flight, for a slow link), until the session's request timeout.
/// An abandoned attempt to join a lock's or election's queue may still reach etcd later
/// and make the session's key there again, for nobody. So the session remembers the key
/// of each such join until it is lost, closed, orphaned or dropped, and sweeps: one task
/// lists the keys on its lease (one LeaseTimeToLive request for all the keys it
/// remembers; where etcd will not answer it, one Range per remembered key instead: key
/// names over the client's answer limit, 4 MiB by default, or, with auth on etcd 3.4.26+
/// and 3.5.9+, a user that may not read every key on the lease) within 250 ms of such a
/// join, then at intervals doubling up to 10 s, and deletes any incarnation of a
/// remembered key that no guard, leadership or waiting call of the session took up. With
/// etcd answering, a late incarnation thus lasts about 10 s at most, unless a handle of
/// the session still holds the name. The key of a `lock()` that failed with its outcome
/// unknown is left to that sweep too, so the next `lock()` does not wait for it to be
/// looked up.
/// Watches that stay silent for 5 s ask their member for a progress notification and are
/// re-opened if it does not come; but a member cut off from its peers still answers
/// them, from its stale state, so waits and `observe()` through it hear of nothing until
/// the partition heals, unless etcd cancels their watches for want of a leader. To have
/// such watches cancelled, and whatever is stuck on a frozen member failed (and so sent
/// again) after the ping interval plus timeout, configure the client with HTTP/2 pings
/// and `require_leader`:
/// `ConnectOptions::new().with_keep_alive(interval, timeout).with_require_leader(true)`
/// (etcd refuses pings more frequent than its `--grpc-keepalive-min-time`, 5 s by default).
/// Pings do not stop etcd-client from sending new requests to a frozen member, which
/// still accepts connections; removing its endpoint does (`Client::remove_endpoint`).
///
/// `Session` is a cheap [`Clone`] handle to shared state; all clones share one lease.
/// When the last handle (including those held by [`Mutex`](crate::Mutex),
/// [`Election`](crate::Election), guards and leaderships) is dropped without
/// [`close`](Self::close) or [`orphan`](Self::orphan), the keep-alive stops and the lease
/// is revoked in a background task with its own deadline (unless etcd has already said
/// that the lease is gone: then there is nothing to revoke).
///
/// Before the process exits, [`close`](Self::close) the session (after `unlock()` or
/// `resign()`): background releases run as tasks on the runtime, and one that is ending
/// (a session or guard dropped as `#[tokio::main]`'s `main` returns) does not run them.
/// The keys then stay until the lease expires, a TTL later, and a warning is logged
/// through `tracing`.
///
/// # Example
///
/// ```no_run
/// use std::time::Duration;
/// use etcd_concurrency::Session;
///
/// # async fn example() -> etcd_concurrency::Result<()> {
/// let client = etcd_client::Client::connect(["http://127.0.0.1:2379"], None).await?;
/// let session = Session::builder(client).ttl(Duration::from_secs(10)).build().await?;
/// println!("lease {:x}, TTL {:?}", session.lease_id(), session.ttl());
/// session.close().await?; // revokes the lease: attached keys go at once
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Session {
    shared: Arc<Shared>,
}

/// A [`Session`] that does not keep it alive: background releases hold one, so that
/// dropping the last handle still revokes the lease.
#[derive(Clone)]
pub(crate) struct WeakSession(Weak<Shared>);

impl WeakSession {
    pub(crate) fn upgrade(&self) -> Option<Session> {
        self.0.upgrade().map(|shared| Session { shared })
    }
}

struct Shared {
    client: Client,
    lease_id: i64,
    ttl: Duration,
    release_timeout: Duration,
    request_timeout: Duration,
    runtime: Handle,
    lost: watch::Sender<bool>,
    keep_alive: AbortHandle,
    /// Set by `close` and `orphan`: the lease needs no revoke on drop.
    ended: AtomicBool,
    /// Set once etcd has said that the lease is gone (expired or revoked): nothing is left
    /// to revoke on drop. Not set when the session is lost only by its own clock (no
    /// renewal answered for a whole TTL), as renewals may have reached etcd unanswered.
    lease_gone: Arc<AtomicBool>,
    /// One queue slot per mutex name, so that two `lock()` calls on this session (which
    /// share one key in etcd) never both believe they hold it.
    queues: std::sync::Mutex<HashMap<Vec<u8>, Weak<tokio::sync::Mutex<QueueWatch>>>>,
    /// One claim slot per election name: this session's campaigns and leaderships there
    /// share one key in etcd.
    elections: std::sync::Mutex<HashMap<Vec<u8>, Weak<tokio::sync::RwLock<Leftover>>>>,
    /// The keys of this session swept for incarnations made by join attempts delivered
    /// late.
    late_joins: std::sync::Mutex<LateJoins>,
}

/// Configures and creates a [`Session`]; see [`Session::builder`] for an example.
#[derive(Clone)]
#[must_use = "a builder does nothing until `build().await`"]
pub struct SessionBuilder {
    client: Client,
    ttl: Option<Duration>,
    lease: Option<i64>,
    release_timeout: Duration,
    request_timeout: Duration,
}

impl Session {
    /// Creates a session with a new lease of [`DEFAULT_TTL`] (60 s). Same as
    /// `Session::builder(client).build()`; mirrors Go's `concurrency.NewSession(client)`.
    ///
    /// # Errors
    ///
    /// As [`SessionBuilder::build`].
    ///
    /// # Cancel safety
    ///
    /// As [`SessionBuilder::build`]: dropping the future revokes, in the background, a
    /// lease its grant may have created.
    ///
    /// # Panics
    ///
    /// As [`SessionBuilder::build`].
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn example() -> etcd_concurrency::Result<()> {
    /// let client = etcd_client::Client::connect(["http://127.0.0.1:2379"], None).await?;
    /// let session = etcd_concurrency::Session::new(client).await?;
    /// assert_eq!(session.ttl(), std::time::Duration::from_secs(60));
    /// # Ok(())
    /// # }
    /// ```
    pub async fn new(client: Client) -> Result<Session> {
        Session::builder(client).build().await
    }

    /// A builder for a session with a chosen TTL, an existing lease, or other timeouts: Go's
    /// `concurrency.NewSession(client, opts...)`, with the options as builder methods.
    ///
    /// # Example
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// # async fn example(client: etcd_client::Client) -> etcd_concurrency::Result<()> {
    /// let session = etcd_concurrency::Session::builder(client)
    ///     .ttl(Duration::from_secs(5)) // a crashed holder's locks go 5 s after its last renewal
    ///     .release_timeout(Duration::from_secs(2))
    ///     .build()
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn builder(client: Client) -> SessionBuilder {
        SessionBuilder {
            client,
            ttl: None,
            lease: None,
            release_timeout: DEFAULT_RELEASE_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }

    /// The lease's id (Go's `Session.Lease()`). Keys of locks and elections end with it in
    /// lowercase hex as Go writes it: a negative id (only a resumed lease can have one) as
    /// `-` and the hex of its magnitude, where Rust's `{:x}` would print the two's
    /// complement.
    pub fn lease_id(&self) -> i64 {
        self.shared.lease_id
    }

    /// The TTL etcd granted, in whole seconds: the `TTL` of its `LeaseGrant` answer, or for
    /// a resumed lease the one it was granted with. It can exceed the one asked for: etcd
    /// raises TTLs below its minimum (1.5 × its election timeout). Go's `Session` has no
    /// accessor for it.
    pub fn ttl(&self) -> Duration {
        self.shared.ttl
    }

    /// The client this session talks through (Go's `Session.Client()`).
    pub fn client(&self) -> &Client {
        &self.shared.client
    }

    /// Resolves once the lease can no longer be assumed alive: etcd answered a keep-alive
    /// with TTL 0 (expired or revoked by anyone), no keep-alive succeeded for a whole TTL,
    /// a lock or campaign found that etcd no longer knows the lease (its key refused for
    /// it, or its waiting key gone with it), [`close`](Self::close) /
    /// [`orphan`](Self::orphan) was called on any handle, or the runtime the session was
    /// built on shut down (taking its keep-alive task with it). Resolves at once if that
    /// already happened. Like Go's `Session.Done()`.
    ///
    /// The "whole TTL" is counted from when the last answered keep-alive was *sent*, so it
    /// never ends later than etcd's own expiry (which can come later, after a leader change).
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: dropping the future has no effect.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn work() {}
    /// # async fn example(session: etcd_concurrency::Session) {
    /// tokio::select! {
    ///     () = work() => println!("done"),
    ///     () = session.lost() => println!("lease lost: stopping, locks can no longer be assumed"),
    /// }
    /// # }
    /// ```
    pub async fn lost(&self) {
        let mut lost = self.shared.lost.subscribe();
        // An error means the sender is gone, which only happens when the session is.
        let _ = lost.wait_for(|lost| *lost).await;
    }

    /// Whether [`lost`](Self::lost) has resolved, without waiting (in Go, a `select` on
    /// `Session.Done()` with a `default` case).
    ///
    /// ```no_run
    /// # fn example(session: etcd_concurrency::Session) {
    /// if session.is_lost() {
    ///     println!("lease {:x} is gone", session.lease_id());
    /// }
    /// # }
    /// ```
    pub fn is_lost(&self) -> bool {
        *self.shared.lost.borrow()
    }

    /// Stops the keep-alive and revokes the lease, so every key attached to it (locks held,
    /// leadership) is deleted at once. Other handles of this session become lost. Mirrors
    /// Go's `Session.Close()`.
    ///
    /// # Errors
    ///
    /// [`Error::Etcd`] if etcd refused the revoke (for instance permission denied), or
    /// [`Error::Etcd`] / [`Error::Timeout`] if it could not be reached within the request
    /// timeout; the lease then expires after its TTL, unless an attempt cut off was
    /// applied all the same. A lease that is already gone is not an error.
    ///
    /// # Cancel safety
    ///
    /// The keep-alive stops when `close` is called, even if the future it returns is never
    /// polled. If the future is dropped before the revoke completes, the revoke may or may
    /// not have been applied; if not, the lease expires after its TTL.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn example(session: etcd_concurrency::Session) -> etcd_concurrency::Result<()> {
    /// // Shutting down: release every lock and leadership of this process at once,
    /// // instead of one TTL later.
    /// session.close().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn close(self) -> impl Future<Output = Result<()>> + Send + 'static {
        self.shared.end();
        let shared = &self.shared;
        revoke(
            shared.client.clone(),
            shared.lease_id,
            shared.request_timeout,
        )
    }

    /// Stops the keep-alive without revoking the lease: attached keys stay until the lease
    /// expires, one TTL from its last renewal (guards and leaderships dropped afterwards
    /// leave their keys; an explicit `unlock()` or `resign()` still deletes its key). Use
    /// it to hand the lease over (another process resumes it with
    /// [`SessionBuilder::lease`]) or to simulate a crash. Mirrors Go's `Session.Orphan()`.
    ///
    /// # Example
    ///
    /// ```no_run
    /// use etcd_concurrency::Session;
    /// # async fn example(session: Session, client: etcd_client::Client) -> etcd_concurrency::Result<()> {
    /// let lease = session.lease_id();
    /// session.orphan(); // e.g. before handing over to a new process
    /// let resumed = Session::builder(client).lease(lease).build().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn orphan(self) {
        self.shared.end();
    }

    /// The key this session uses under a lock or election named `name`: `name/` followed
    /// by the lease id in lowercase hex, as Go and etcdctl write it.
    pub(crate) fn key_in(&self, name: &[u8]) -> Vec<u8> {
        let mut key = prefix_of(name);
        key.extend_from_slice(lease_hex(self.shared.lease_id).as_bytes());
        key
    }

    pub(crate) fn downgrade(&self) -> WeakSession {
        WeakSession(Arc::downgrade(&self.shared))
    }

    /// Whether [`close`](Self::close) or [`orphan`](Self::orphan) was called: keys on the
    /// lease are then gone or deliberately kept until expiry, so nothing is released.
    pub(crate) fn has_ended(&self) -> bool {
        self.shared.ended.load(Ordering::SeqCst)
    }

    pub(crate) fn release_timeout(&self) -> Duration {
        self.shared.release_timeout
    }

    pub(crate) fn request_timeout(&self) -> Duration {
        self.shared.request_timeout
    }

    pub(crate) fn runtime(&self) -> &Handle {
        &self.shared.runtime
    }

    /// Marks the session lost, etcd having said that its lease is gone (a key vanished
    /// with it): the keep-alive stops too, so that if etcd was wrong the lease still ends
    /// within a TTL.
    pub(crate) fn mark_lost(&self) {
        self.shared.lease_gone.store(true, Ordering::SeqCst);
        self.shared.keep_alive.abort();
        self.shared.lost.send_replace(true);
    }

    /// Whether etcd still knows the lease; marks the session lost when it does not. etcd
    /// rounds the remaining TTL down to whole seconds, so a live lease with less than a
    /// second left reports 0; only an unknown one reports -1.
    pub(crate) async fn check_lease(&self) -> Result<bool> {
        let id = self.shared.lease_id;
        let answer = retry(
            &self.shared.client,
            self.shared.request_timeout,
            |mut c| async move { c.lease_time_to_live(id, None).await },
        )
        .await?;
        let alive = answer.ttl() >= 0;
        if !alive {
            self.mark_lost();
        }
        Ok(alive)
    }

    /// The keys of this session swept for join attempts delivered late.
    pub(crate) fn late_joins(&self) -> std::sync::MutexGuard<'_, LateJoins> {
        self.shared
            .late_joins
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The in-process queue slot of the mutex `name` for this session, shared by every
    /// handle on it; it lives as long as one does.
    pub(crate) fn queue_slot(&self, name: &[u8]) -> Arc<tokio::sync::Mutex<QueueWatch>> {
        shared_slot(&self.shared.queues, name)
    }
}

/// The slot of `name` in `slots`, made if no handle holds it any more; slots nobody holds
/// are removed on the way.
fn shared_slot<T: Default>(
    slots: &std::sync::Mutex<HashMap<Vec<u8>, Weak<T>>>,
    name: &[u8],
) -> Arc<T> {
    let mut slots = slots
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    slots.retain(|_, slot| slot.strong_count() > 0);
    if let Some(slot) = slots.get(name).and_then(Weak::upgrade) {
        return slot;
    }
    let slot = Arc::new(T::default());
    slots.insert(name.to_vec(), Arc::downgrade(&slot));
    slot
}

/// A campaign's (or the leadership it becomes) claim on this session's key in an
/// election. The session's campaigns and leaderships there share that key in etcd, so each
/// holds the claim shared; the last one to go takes it exclusive while it deletes the key,
/// and a campaign starting meanwhile waits for the delete instead of joining a key that is
/// about to vanish.
pub(crate) struct ElectionClaim {
    slot: Arc<tokio::sync::RwLock<Leftover>>,
    shared: OwnedRwLockReadGuard<Leftover>,
}

/// Set by a handle that, as it leaves, may leave behind an incarnation of the key that
/// nobody uses (a campaign whose join created it after a resign had deleted the old one):
/// the last claim to go looks for it.
#[derive(Default)]
pub(crate) struct Leftover(AtomicBool);

/// The last claim on an election's key, held exclusive until the key is deleted.
pub(crate) struct LastClaim {
    _exclusive: OwnedRwLockWriteGuard<Leftover>,
    leftover: bool,
}

impl Session {
    /// Claims this session's key in election `name` for a campaign, once no delete of that
    /// key is in flight.
    pub(crate) async fn claim_election(&self, name: &[u8]) -> ElectionClaim {
        let slot = shared_slot(&self.shared.elections, name);
        let shared = slot.clone().read_owned().await;
        ElectionClaim { slot, shared }
    }

    /// This session's key in election `name`, as an incarnation that no campaign may know
    /// of (made by a join attempt delivered late).
    pub(crate) fn unknown_election_key(&self, name: &[u8]) -> UnknownKey {
        UnknownKey(shared_slot(&self.shared.elections, name))
    }

    /// Says `true` once the session is lost or has ended (closed, orphaned); closed once
    /// it is dropped. Holds nothing of the session.
    pub(crate) fn ended_signal(&self) -> watch::Receiver<bool> {
        self.shared.lost.subscribe()
    }

    /// Runs `work` until it is done (`Some` of its output) or the session is lost or ends
    /// (`None`, `work` dropped; never started if the session had ended already). Holds
    /// nothing of the session.
    pub(crate) fn until_ended<F: Future>(
        &self,
        work: F,
    ) -> impl Future<Output = Option<F::Output>> + use<F> {
        let mut ended = self.ended_signal();
        async move {
            tokio::select! {
                biased;
                _ = ended.wait_for(|ended| *ended) => None,
                output = work => Some(output),
            }
        }
    }
}

/// An incarnation of a session's key in an election that no campaign may know of.
pub(crate) struct UnknownKey(Arc<tokio::sync::RwLock<Leftover>>);

impl UnknownKey {
    /// Tells the session's campaigns and leaderships of the key, as a handle leaving it
    /// behind would (see [`ElectionClaim::leave`]): `Some` with the claim made exclusive if
    /// none of them holds it, to delete the key under; `Some(None)` if some do (the last
    /// of them to go looks for it); `None` if a last claim is deleting the key now (it may
    /// have looked before this incarnation was made): try again after it.
    pub(crate) fn note(&self) -> Option<Option<LastClaim>> {
        let shared = self.0.clone().try_read_owned().ok()?;
        let slot = self.0.clone();
        Some(ElectionClaim { slot, shared }.leave(true))
    }

    /// After a [`note`](Self::note) that left the key to others: `Some` with the claim
    /// made exclusive if they are all gone and none of them took the note (a campaign
    /// handed the claim but dropped before it ran never does), to delete the key under;
    /// `Some(None)` once one took it; `None` while they hold the claim.
    pub(crate) fn settle(&self) -> Option<Option<LastClaim>> {
        match self.0.clone().try_write_owned() {
            Ok(exclusive) => {
                let last = LastClaim::taking_note(exclusive);
                Some(last.leftover.then_some(last))
            }
            Err(_) => match self.0.try_read() {
                Ok(shared) if !shared.0.load(Ordering::Acquire) => Some(None),
                _ => None,
            },
        }
    }
}

impl ElectionClaim {
    /// Gives the claim up. Returns it made exclusive if it was the last one, to hold until
    /// the key is deleted; `None` if another campaign or leadership of this session still
    /// uses the key: it is theirs, and stays. `may_have_left_key`: this handle may have
    /// made an incarnation of the key that nobody uses; if others still hold the claim,
    /// the last of them to go is told to look for it.
    pub(crate) fn leave(self, may_have_left_key: bool) -> Option<LastClaim> {
        if may_have_left_key {
            self.shared.0.store(true, Ordering::Release);
        }
        drop(self.shared);
        self.slot.try_write_owned().ok().map(LastClaim::taking_note)
    }
}

impl LastClaim {
    /// The claim made exclusive, which answers for any key left behind: it takes the note
    /// of one, so that the next claims start afresh.
    fn taking_note(exclusive: OwnedRwLockWriteGuard<Leftover>) -> LastClaim {
        let leftover = exclusive.0.swap(false, Ordering::Acquire);
        LastClaim {
            _exclusive: exclusive,
            leftover,
        }
    }

    /// Whether a handle that left before this one may have left a key behind.
    pub(crate) fn leftover(&self) -> bool {
        self.leftover
    }
}

/// `name` followed by `/`: the prefix under which a lock's or election's keys live. The
/// slash keeps `a` from matching the keys of `ab` (etcd #6278).
pub(crate) fn prefix_of(name: &[u8]) -> Vec<u8> {
    let mut prefix = Vec::with_capacity(name.len() + 17);
    prefix.extend_from_slice(name);
    prefix.push(b'/');
    prefix
}

/// A lease id in lowercase hex as Go's `%x` writes an `int64`: a negative id (etcd grants
/// one when asked for it) as `-` and the hex of its magnitude, not two's complement.
pub(crate) fn lease_hex(id: i64) -> String {
    let sign = if id < 0 { "-" } else { "" };
    format!("{sign}{:x}", id.unsigned_abs())
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field(
                "lease_id",
                &format_args!("{}", lease_hex(self.shared.lease_id)),
            )
            .field("ttl", &self.shared.ttl)
            .field("lost", &self.is_lost())
            .finish_non_exhaustive()
    }
}

impl Shared {
    fn end(&self) {
        self.ended.store(true, Ordering::SeqCst);
        self.keep_alive.abort();
        self.lost.send_replace(true);
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.keep_alive.abort();
        self.late_joins
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .stop();
        if self.ended.load(Ordering::SeqCst) || self.lease_gone.load(Ordering::SeqCst) {
            return;
        }
        let client = self.client.clone();
        // Bounded by the release timeout alone, not by the (perhaps shorter) request
        // timeout as well.
        let (id, limit) = (self.lease_id, self.release_timeout);
        spawn_release(
            &self.runtime,
            "revoking a dropped session's lease",
            async move {
                match revoke(client, id, limit).await {
                    Ok(()) => tracing::debug!(lease_id = id, "revoked a dropped session's lease"),
                    Err(error) => tracing::warn!(
                        error = &error as &dyn std::error::Error,
                        "revoking a dropped session's lease failed; it expires after its TTL"
                    ),
                }
            },
        );
    }
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
    /// The lease's TTL: whole seconds, at least 1 s (default [`DEFAULT_TTL`], 60 s). A
    /// crashed holder's locks are released this long after its last renewal. etcd may
    /// raise TTLs below its minimum; [`Session::ttl`] reports the granted one. Go's
    /// `concurrency.WithTTL`.
    pub fn ttl(mut self, ttl: Duration) -> SessionBuilder {
        self.ttl = Some(ttl);
        self
    }

    /// Resumes an existing lease instead of granting one (Go's `concurrency.WithLease`),
    /// e.g. one handed over with [`Session::orphan`]. Its TTL is the one it was granted
    /// with, so it cannot be combined with [`ttl`](Self::ttl).
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
    /// release (retried for as long as the session lives), the revoke of a session
    /// dropped without [`Session::close`] (after which the lease's expiry releases), and
    /// the revokes of a lease that a failed or dropped [`build`](Self::build) may have
    /// granted. No Go counterpart: Go bounds its requests with the caller's `context`.
    pub fn release_timeout(mut self, timeout: Duration) -> SessionBuilder {
        self.release_timeout = timeout;
        self
    }

    /// How long one request is retried on transient failures (member down, leader
    /// change, lost connection) before its error is returned (default
    /// [`DEFAULT_REQUEST_TIMEOUT`], 5 s). Waiting for a lock is not limited by this. Not
    /// zero; `Duration::MAX` retries for as long as it takes. No Go counterpart: Go bounds
    /// its requests with the caller's `context`.
    ///
    /// The bound is per request, so a call that needs more than one may take longer: twice
    /// as long for a build whose retried grant found its lease granted (it then reads the
    /// TTL), a resumed lease (checked, then renewed), a `try_lock` that withdraws a
    /// leftover key and a campaign that finds its key with another value (then written;
    /// three times if the key is gone by then and the lease is checked); once more for
    /// each time a proclaim finds the key rewritten by another leadership of the session.
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
    ///
    /// After an error, a lease that an attempt cut off (or failed in transit) may have
    /// granted all the same is revoked in a background task, bounded by the release
    /// timeout.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future before it completes revokes, in the background, a lease its
    /// grant may have created (as a build that fails does), for up to the release timeout;
    /// a resumed lease is left as it was. A lease is left to expire after its TTL when the
    /// future is dropped outside a Tokio runtime or as that runtime shuts down, or when a
    /// grant held in transit reaches etcd after the release timeout.
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
        let (lease_id, ttl, renewed) = match (self.lease, self.ttl) {
            (Some(_), Some(_)) => {
                return Err(Error::InvalidArgument(
                    "a resumed lease keeps its own TTL: give either `ttl` or `lease`".into(),
                ));
            }
            (Some(id), None) => self.resume(id).await?,
            (None, ttl) => {
                let ttl = validate_ttl(ttl.unwrap_or(DEFAULT_TTL))?;
                let sent = Instant::now();
                let (id, granted) = self.grant(ttl).await?;
                let renewed = Renewed {
                    at: sent,
                    stream: None,
                };
                (id, granted, renewed)
            }
        };
        let (lost, _) = watch::channel(false);
        let lease_gone = Arc::new(AtomicBool::new(false));
        let keep_alive = tokio::spawn(keep_alive(
            self.client.clone(),
            lease_id,
            ttl,
            renewed,
            Arc::clone(&lease_gone),
            MarkLostOnExit(lost.clone()),
        ))
        .abort_handle();
        Ok(Session {
            shared: Arc::new(Shared {
                client: self.client,
                lease_id,
                ttl,
                release_timeout: self.release_timeout,
                request_timeout: self.request_timeout,
                runtime: Handle::current(),
                lost,
                keep_alive,
                ended: AtomicBool::new(false),
                lease_gone,
                queues: Default::default(),
                elections: Default::default(),
                late_joins: Default::default(),
            }),
        })
    }

    /// Grants a lease of `ttl` seconds under an id chosen here, so that a retried grant
    /// whose first attempt was applied finds its lease instead of leaking a second one.
    /// Returns the id and the granted TTL.
    ///
    /// If it fails after an attempt that may have been granted (cut off, or failed in
    /// transit), or is dropped while an attempt is in flight, that lease is revoked in the
    /// background, as a dropped session's is: the caller gets no session, so nothing else
    /// would ever revoke it.
    async fn grant(&self, ttl: i64) -> Result<(i64, Duration)> {
        let id = rand::random_range(1..i64::MAX);
        let revoke_unless_kept = RevokeOnDrop(Some((self, id)));
        let options = LeaseGrantOptions::new().with_id(id);
        let (granted, maybe_granted) = retry_write(&self.client, self.request_timeout, |mut c| {
            let options = options.clone();
            async move { c.lease_grant(ttl, Some(options)).await }
        })
        .await;
        let result = match granted {
            Ok(answer) => Ok((answer.id(), secs(answer.ttl()))),
            Err(Error::Etcd(error)) if is_lease_taken(&error) => {
                retry(&self.client, self.request_timeout, |mut c| async move {
                    c.lease_time_to_live(id, None).await
                })
                .await
                .map(|answer| (id, secs(answer.granted_ttl())))
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
    /// the release timeout.
    fn revoke_in_background(&self, id: i64) {
        let (client, limit) = (self.client.clone(), self.release_timeout);
        let revokes = async move {
            let deadline = deadline_after(limit);
            let mut backoff = Backoff::new();
            while Instant::now() < deadline {
                let left = deadline.saturating_duration_since(Instant::now());
                match revoke(client.clone(), id, left).await {
                    Err(error) if !error.is_transient() => {
                        tracing::warn!(
                            error = &error as &dyn std::error::Error,
                            lease_id = id,
                            "the lease of a session build that failed or was dropped could \
                             not be revoked; it expires after its TTL"
                        );
                        return;
                    }
                    _ => {}
                }
                tokio::time::sleep_until(deadline.min(Instant::now() + backoff.next_delay())).await;
            }
        };
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
    /// its expiry exactly (its remaining TTL is only reported in whole seconds).
    async fn resume(&self, id: i64) -> Result<(i64, Duration, Renewed)> {
        let gone = || {
            let hex = lease_hex(id);
            let why = format!("lease {id} (hex {hex}) does not exist or has expired");
            Error::InvalidArgument(why)
        };
        let answer = retry(&self.client, self.request_timeout, |mut c| async move {
            c.lease_time_to_live(id, None).await
        })
        .await?;
        if answer.ttl() < 0 {
            return Err(gone());
        }
        let sent = Instant::now();
        let stream = match retry(&self.client, self.request_timeout, |mut c| async move {
            c.lease_keep_alive(id).await
        })
        .await
        {
            Err(Error::Etcd(error)) if is_lease_not_found(&error) => return Err(gone()),
            other => other?,
        };
        let renewed = Renewed {
            at: sent,
            stream: Some(stream),
        };
        Ok((id, secs(answer.granted_ttl()), renewed))
    }
}

/// Revokes (in the background) the lease a build's grant may have created, when dropped
/// armed: by a grant that failed after an attempt that may have applied, or whose future
/// was dropped while an attempt was in flight.
struct RevokeOnDrop<'a>(Option<(&'a SessionBuilder, i64)>);

impl RevokeOnDrop<'_> {
    /// The lease is the session's, or was certainly not granted: nothing to revoke.
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for RevokeOnDrop<'_> {
    fn drop(&mut self) {
        if let Some((builder, id)) = self.0.take() {
            builder.revoke_in_background(id);
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

fn secs(seconds: i64) -> Duration {
    Duration::from_secs(seconds.max(0) as u64)
}

async fn revoke(client: Client, lease_id: i64, limit: Duration) -> Result<()> {
    let revoked = retry(&client, limit, |mut c| async move {
        c.lease_revoke(lease_id).await
    });
    match revoked.await {
        Err(Error::Etcd(error)) if is_lease_gone(&error) => Ok(()), // expired or revoked
        other => other.map(drop),
    }
}

/// A renewal that has just succeeded: when it was sent, and the keep-alive stream it was
/// sent on, if any.
struct Renewed {
    at: Instant,
    stream: Option<(etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream)>,
}

/// Renews the lease every TTL/3 until it is gone, then marks the session lost (and sets
/// `lease_gone` if etcd said so, rather than the time running out).
///
/// `alive_until` is when the lease expires at the latest without a further renewal: an
/// answered renewal moves it to (the time that renewal was sent + TTL). The keep-alive
/// stream is re-opened when it breaks or an answer is overdue (its member may be down),
/// until `alive_until` passes. Opening it is sent again when unanswered for
/// [`answer_due`], the earlier attempts staying in flight in case their link is only slow.
async fn keep_alive(
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
struct MarkLostOnExit(watch::Sender<bool>);

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
