//! [`Session`]: a lease kept alive in the background, the basis of every lock and election.

mod builder;
mod election_claim;
mod keep_alive;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use etcd_client::{Client, GetOptions, KeyValue, LeaseTimeToLiveResponse, SortOrder, SortTarget};
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tokio::time::Instant;

pub use self::builder::SessionBuilder;
use self::election_claim::Leftover;
pub(crate) use self::election_claim::{ElectionClaim, LastClaim};
use self::keep_alive::{Deadline, UNANSWERED_FOR_A_TTL, mark_lost};
use crate::error::{Error, Result, is_lease_gone};
use crate::late_join::LateJoins;
use crate::release::spawn_release;
use crate::retry::{Backoff, deadline_after, retry};
use crate::wait::QueueWatch;

/// The TTL of [`Session::new`], as in Go's `concurrency.NewSession`.
pub const DEFAULT_TTL: Duration = Duration::from_secs(60);
/// The default of [`SessionBuilder::release_timeout`]: the bound on each attempt to delete
/// a dropped guard's key, on the whole revoke of a dropped session, and on the revokes of
/// a lease that a failed or dropped build may have granted, among the background work
/// listed there. No Go counterpart: Go bounds
/// its requests with the caller's `context`.
pub const DEFAULT_RELEASE_TIMEOUT: Duration = Duration::from_secs(5);
/// The default of [`SessionBuilder::request_timeout`] and [`Stm::request_timeout`]. No Go
/// counterpart: Go bounds its requests with the caller's `context`.
///
/// [`Stm::request_timeout`]: crate::Stm::request_timeout
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

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
/// lists the keys on its lease (one LeaseTimeToLive request, then one keys-only Range for
/// each remembered key found there; where etcd will not list them, one Range per
/// remembered key instead: key
/// names over the client's answer limit, 4 MiB by default, or, with auth on etcd 3.4.26+
/// and 3.5.9+, a user that may not read every key on the lease) within 250 ms of such a
/// join, then at intervals doubling up to 10 s, and deletes any incarnation of a
/// remembered key that no guard, leadership or waiting call of the session took up. With
/// etcd answering, a late incarnation thus lasts about 10 s at most, unless a handle of
/// the session still holds the name. The key of a `lock()` that failed with its outcome
/// unknown is left to that sweep too, so the next `lock()` does not wait for it to be
/// looked up.
/// Watches that stay silent for 5 s ask their member for a progress notification and are
/// re-opened if it does not come. A member cut off from its peers still answers, from its
/// stale state, so after each notification the cluster's revision is read (one key,
/// linearizably: each silent watch costs one such read every 5 s), and a watch whose
/// member is still below it at the next notification is re-opened through another
/// member: waits and `observe()` through such a member hear of changes within about 20 s
/// of the cut (measured: 4-19 s). etcd itself cancels such watches within about 2 s for
/// clients that require a leader. To have them cancelled, and whatever is stuck on a
/// frozen member failed (and so sent again) after the ping interval plus timeout,
/// configure the client with HTTP/2 pings and `require_leader`:
/// `ConnectOptions::new().with_keep_alive(interval, timeout).with_require_leader(true)`
/// (etcd refuses pings more frequent than its `--grpc-keepalive-min-time`, 5 s by default),
/// and give it more than one endpoint: a cancelled watch is opened again, and with one
/// endpoint that is on the same leaderless member.
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
/// `resign()`): background releases run as tasks on the runtime, and one that is ending (a
/// session or guard dropped as `#[tokio::main]`'s `main` returns, or just before) does not
/// run them. The keys then stay until the lease expires, a TTL later, and a warning is
/// logged through `tracing`. The same goes for a runtime that still exists but is no longer
/// driven (a current-thread runtime whose `block_on` has returned): the keep-alive and the
/// background releases, which run on the runtime the session was built on, wait until it is
/// driven again, though [`lost`](Self::lost) and [`is_lost`](Self::is_lost) still say when
/// the lease may have expired. So does the join Txn of `lock()`, `try_lock()` and
/// `campaign()`, which runs there too: called from another runtime, they wait for it, and
/// fail with [`Error::SessionLost`] once the session is lost (a TTL after its last renewal
/// at the latest).
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
/// println!("lease {}, TTL {:?}", session.lease_id(), session.ttl());
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

/// Tells when a session is lost or has ended, from [`Session::ended_signal`].
pub(crate) struct EndedSignal(watch::Receiver<bool>);

impl EndedSignal {
    /// Resolves once the session is lost, has ended or is dropped. Returns nothing, on
    /// purpose: the `Ref` that `wait_for` resolves to holds the channel's read lock, and a
    /// `select!` keeps it while it drops its other branches. Were one of them to drop the
    /// session's last handle, whose drop writes to the channel, the thread would wait on
    /// itself for good.
    pub(crate) async fn wait(&mut self) {
        // An error means the sender is gone, which only happens when the session is.
        let _ = self.0.wait_for(|ended| *ended).await;
    }
}

struct Shared {
    client: Arc<Client>,
    lease_id: i64,
    ttl: Duration,
    release_timeout: Duration,
    request_timeout: Duration,
    runtime: Handle,
    lost: watch::Sender<bool>,
    keep_alive: AbortHandle,
    /// Set by `close` and `orphan`: the lease needs no revoke on drop.
    ended: AtomicBool,
    /// Set by `orphan`: the lease lives on with the keys on it, until its TTL runs out or
    /// resumed by another session.
    orphaned: AtomicBool,
    /// Set once etcd has said that the lease is gone (expired or revoked): nothing is left
    /// to revoke on drop. Not set when the session is lost only by its own clock (no
    /// renewal answered for a whole TTL), as renewals may have reached etcd unanswered.
    lease_gone: Arc<AtomicBool>,
    /// When the lease expires at the latest without a further renewal, as the keep-alive
    /// last counted it: checked by `is_lost` and `lost` themselves, in case the keep-alive
    /// task could not run on time.
    deadline: Arc<Deadline>,
    /// Whether an attempt of the grant may still be in transit (the grant was answered
    /// after another attempt went unanswered): reaching etcd after the lease ended, it
    /// would grant it again, so a revoke is repeated for the release timeout (at most a
    /// TTL).
    late_grant: bool,
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
        SessionBuilder::new(client)
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

    /// The client, for a task that must not hold the session (whose last handle, dropped,
    /// revokes the lease): cheaper to hold than a clone of the whole `Client`.
    pub(crate) fn shared_client(&self) -> Arc<Client> {
        Arc::clone(&self.shared.client)
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
    /// `lost` and [`is_lost`](Self::is_lost) check that deadline themselves, so it holds
    /// even when the keep-alive task could not run on time (its runtime's threads blocked
    /// or busy past the TTL). `lost` therefore needs a Tokio runtime with its time driver.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime, or in one without its time driver (see the crate docs).
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
        let mut lost = self.ended_signal();
        // The deadline is watched here too, on the caller's runtime: the keep-alive task
        // that would mark the session lost may not get to run on time.
        while !self.shared.expired_by_clock() {
            let deadline = self.shared.deadline.get();
            tokio::select! {
                () = lost.wait() => return,
                () = tokio::time::sleep_until(deadline) => {}
            }
        }
    }

    /// Whether [`lost`](Self::lost) has resolved, without waiting (in Go, a `select` on
    /// `Session.Done()` with a `default` case).
    ///
    /// ```no_run
    /// # fn example(session: etcd_concurrency::Session) {
    /// if session.is_lost() {
    ///     println!("lease {} is gone", session.lease_id());
    /// }
    /// # }
    /// ```
    pub fn is_lost(&self) -> bool {
        // Read first: the check of the clock may write to the channel.
        let marked = *self.shared.lost.borrow();
        marked || self.shared.expired_by_clock()
    }

    /// How long the lease lives at least even if no further renewal reaches etcd: the TTL
    /// counted from when the last renewal that etcd answered was *sent* (etcd counts from
    /// when it got it, which is later). [`Duration::ZERO`] once [`is_lost`](Self::is_lost)
    /// is true, closed or orphaned sessions included. A revoke by another client is known
    /// only once a renewal is answered so (at most a third of the TTL and a round trip
    /// later): until then this still counts down.
    ///
    /// A session renews its lease every third of its TTL, so while renewals are answered
    /// this dips, just before each answer, to two thirds of the TTL less the renewal's
    /// round trip; well below that, renewals are failing, and the session is lost when it
    /// reaches zero. Work that must not outlast the lease can check it before each step,
    /// and stop early with time to spare instead of waiting for [`lost`](Self::lost) (the
    /// role of client-go's `RenewDeadline`). Go's `Session` has no counterpart; etcd's
    /// `LeaseTimeToLive` gives etcd's own count, but takes a round trip and cannot answer
    /// when etcd is out of reach.
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # async fn step() {}
    /// # async fn example(session: etcd_concurrency::Session) {
    /// // A step takes up to 2 s: start one only if it ends before the lease can expire.
    /// while session.time_left() > Duration::from_secs(2) {
    ///     step().await;
    /// }
    /// # }
    /// ```
    pub fn time_left(&self) -> Duration {
        if self.is_lost() {
            return Duration::ZERO;
        }
        self.shared
            .deadline
            .get()
            .saturating_duration_since(Instant::now())
    }

    /// Stops the keep-alive and revokes the lease, so every key attached to it (locks held,
    /// leadership) is deleted at once. Other handles of this session become lost. Mirrors
    /// Go's `Session.Close()`, which bounds its revoke by the TTL; here the bound is the
    /// request timeout ([`SessionBuilder::request_timeout`]).
    ///
    /// # Errors
    ///
    /// [`Error::Etcd`] if etcd refused the revoke (for instance permission denied), or
    /// [`Error::Etcd`] / [`Error::Timeout`] if it could not be reached within the request
    /// timeout; the lease then expires after its TTL, unless an attempt cut off was
    /// applied all the same. A lease that is already gone is not an error.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime, or in one without its time driver (see the crate docs).
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
        let (client, id) = (Client::clone(&shared.client), shared.lease_id);
        if shared.late_grant {
            // Spawned now: the future returned may never be polled to its end.
            let what = "revoking a closed session's lease again, for a late grant attempt";
            let limit = shared.release_timeout;
            let again = revoke_repeatedly(client.clone(), id, limit, shared.ttl);
            spawn_release(&shared.runtime, what, again);
        }
        revoke(client, id, shared.request_timeout)
    }

    /// Stops the keep-alive without revoking the lease: attached keys stay until the lease
    /// expires, one TTL from its last renewal (guards and leaderships dropped afterwards
    /// leave their keys; an explicit `unlock()` or `resign()` still sends the delete of its
    /// key, once: nothing retries it in the background). Use it to hand the lease over
    /// (another process resumes it with [`SessionBuilder::lease`]) or to simulate a crash.
    /// Mirrors Go's `Session.Orphan()`.
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
        self.shared.orphaned.store(true, Ordering::SeqCst);
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

    /// Resolves once the session is lost or closed, its keys gone or going with its lease
    /// (at most a TTL later); never for an orphaned session, whose lease lives on (resumed
    /// by another session, perhaps) with the keys on it.
    pub(crate) async fn lost_or_closed(&self) {
        self.lost().await;
        // Set before orphaning marks the session lost.
        if self.shared.orphaned.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
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
        self.shared
            .lose("etcd no longer knows it (a key on it was refused or vanished)");
    }

    /// Whether etcd still knows the lease; marks the session lost when it does not. etcd
    /// rounds the remaining TTL down to whole seconds, so a live lease with less than a
    /// second left reports 0; an unknown one reports -1, and so may one past its expiry
    /// whose revoke etcd has not applied yet (gone either way).
    pub(crate) async fn check_lease(&self) -> Result<bool> {
        let shared = &self.shared;
        let answer = time_to_live(&shared.client, shared.lease_id, shared.request_timeout).await?;
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

    /// What tells when the session is lost, has ended (closed, orphaned) or is dropped.
    /// Holds nothing of the session.
    pub(crate) fn ended_signal(&self) -> EndedSignal {
        EndedSignal(self.shared.lost.subscribe())
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
                () = ended.wait() => None,
                output = work => Some(output),
            }
        }
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

/// `name` followed by `/`: the prefix under which a lock's or election's keys live. The
/// slash keeps `a` from matching the keys of `ab` (etcd #6278).
pub(crate) fn prefix_of(name: &[u8]) -> Vec<u8> {
    let mut prefix = Vec::with_capacity(name.len() + 17);
    prefix.extend_from_slice(name);
    prefix.push(b'/');
    prefix
}

/// The key with the lowest create revision under `name/`: a lock's holder or an
/// election's leader, or `None` if the queue is empty. One read, retried as [`retry`]
/// does within `session`'s request timeout.
pub(crate) async fn first_in_queue(session: &Session, name: &[u8]) -> Result<Option<KeyValue>> {
    let prefix = prefix_of(name);
    let first = GetOptions::new()
        .with_prefix()
        .with_sort(SortTarget::Create, SortOrder::Ascend)
        .with_limit(1);
    let mut answer = retry(
        session.client(),
        "Range",
        session.request_timeout(),
        |client| {
            let (mut kv, prefix, first) = (client.kv_client(), prefix.clone(), first.clone());
            async move { kv.get(prefix, Some(first)).await }
        },
    )
    .await?;
    Ok(answer.take_kvs().into_iter().next())
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
    /// Whether a whole TTL has passed since the last answered renewal was sent, whether or
    /// not the keep-alive task has run since (its runtime's threads may be blocked or
    /// busy): if so, the session is marked lost (and its keep-alive stopped, as it would
    /// have stopped itself), once and for all.
    fn expired_by_clock(&self) -> bool {
        if Instant::now() < self.deadline.get() {
            return false;
        }
        self.lose(UNANSWERED_FOR_A_TTL);
        true
    }

    /// Stops the keep-alive and tells every waiter that the session is lost, without a
    /// warning: closed or orphaned on purpose.
    fn end(&self) {
        self.ended.store(true, Ordering::SeqCst);
        // Before the abort: a worker thread may drop the aborted task at once, whose end
        // would otherwise warn of a lost session.
        self.lost.send_replace(true);
        self.keep_alive.abort();
    }

    /// Stops the keep-alive and tells every waiter that the session is lost, with a
    /// warning that says `why` unless it was lost already or had ended.
    fn lose(&self, why: &str) {
        mark_lost(&self.lost, self.lease_id, why);
        self.keep_alive.abort();
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Dropped on purpose: its keep-alive's end says nothing (set before the abort, as
        // in `end`).
        self.lost.send_replace(true);
        self.keep_alive.abort();
        self.late_joins
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .stop();
        // Ended: closed (which revokes) or orphaned (which keeps the lease).
        if self.ended.load(Ordering::SeqCst) {
            return;
        }
        if self.lease_gone.load(Ordering::SeqCst) && !self.late_grant {
            return;
        }
        let client = Client::clone(&self.client);
        // Bounded by the release timeout alone, not by the (perhaps shorter) request
        // timeout as well.
        let (id, limit) = (self.lease_id, self.release_timeout);
        if self.late_grant {
            let what = "revoking a dropped session's lease, again for a late grant attempt";
            let again = revoke_repeatedly(client, id, limit, self.ttl);
            spawn_release(&self.runtime, what, again);
            return;
        }
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

fn secs(seconds: i64) -> Duration {
    Duration::from_secs(seconds.max(0) as u64)
}

/// Revokes lease `id` again and again, with back-off, for `limit` or `ttl`, whichever is
/// shorter: a grant attempt cut off in transit may still grant it after a revoke found
/// nothing. A lease granted later than that expires by itself a TTL later, nothing
/// attached to it, so a long (or unlimited) release timeout does not keep a task revoking
/// for as long. Warns if etcd refused, or if no revoke got an answer.
async fn revoke_repeatedly(client: Client, id: i64, limit: Duration, ttl: Duration) {
    let deadline = deadline_after(limit.min(ttl));
    let mut backoff = Backoff::new();
    let (mut answered, mut unreached) = (false, None);
    let failure = loop {
        if Instant::now() >= deadline {
            break unreached.filter(|_| !answered);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match revoke(client.clone(), id, left).await {
            Ok(()) => answered = true,
            Err(error) if error.is_transient() => unreached = Some(error),
            Err(refused) => break Some(refused),
        }
        tokio::time::sleep_until(deadline.min(Instant::now() + backoff.next_delay())).await;
    };
    if let Some(error) = failure {
        tracing::warn!(
            error = &error as &dyn std::error::Error,
            lease_id = id,
            "a lease that a grant attempt may have made could not be revoked; it expires \
             after its TTL"
        );
    }
}

/// etcd's answer on lease `id` (its TTL left, -1 if it does not know it), retried within
/// `limit`.
async fn time_to_live(
    client: &Client,
    id: i64,
    limit: Duration,
) -> Result<LeaseTimeToLiveResponse> {
    retry(client, "LeaseTimeToLive", limit, |client| {
        let mut leases = client.lease_client();
        async move { leases.time_to_live(id, None).await }
    })
    .await
}

async fn revoke(client: Client, lease_id: i64, limit: Duration) -> Result<()> {
    let revoked = retry(&client, "LeaseRevoke", limit, |client| {
        let mut leases = client.lease_client();
        async move { leases.revoke(lease_id).await }
    });
    match revoked.await {
        Err(Error::Etcd(error)) if is_lease_gone(&error) => Ok(()), // expired or revoked
        other => other.map(drop),
    }
}
