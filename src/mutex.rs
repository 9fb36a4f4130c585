//! [`Mutex`]: a distributed lock with a fenced RAII guard.

use std::fmt;
use std::sync::Arc;

use etcd_client::{Compare, GetOptions, SortOrder, SortTarget};

mod holder;

pub use self::holder::Holder;

use crate::acquire::{Create, Request, join};
use crate::error::{Error, Result};
use crate::ownership::OwnedKey;
use crate::session::{Session, first_in_queue};
use crate::wait::{QueueWatch, wait_for_turn};

/// A distributed lock named by a key prefix, held through a [`Session`]'s lease.
///
/// Waiters queue in etcd in the order they asked (FIFO, by the create revision of their
/// key), and the holder's key is the one with the lowest create revision under `name/`.
/// The keys are those of Go's `concurrency.Mutex`, etcd's server-side Lock service and
/// `etcdctl lock`: `name/` followed by the lease id in lowercase hex. Rust and Go
/// processes can therefore share one lock.
///
/// If the holder's process dies, its session's lease expires after the TTL and the next
/// waiter gets the lock. A lock alone cannot stop a paused holder from acting after its
/// lease expired: guard each write with [`MutexGuard::ownership_compare`] (see the crate
/// docs on fencing).
///
/// `Mutex` is a cheap [`Clone`] handle; clones lock the same lock. Two `lock()` calls
/// through one session on one name share one key in etcd, so they are serialised in the
/// process: the second waits until the first guard is released. The lock is therefore not
/// re-entrant: a second `lock()` by the task holding the guard waits until the session is
/// lost (for ever, if it is not), and its `try_lock()` gives `None` (Go's `Lock` and
/// `TryLock` on a session that holds the lock return at once, sharing the key). After a
/// `lock()` that waited, they keep its watch on the queue open (read by a small task) for
/// a next call within 15 s and 16 releases, until the last of them is dropped or the
/// session ends; a later call opens another, so handles kept on many names hold no watch
/// each.
///
/// # Example
///
/// ```no_run
/// use etcd_concurrency::{Mutex, Session};
///
/// # async fn example(client: etcd_client::Client) -> etcd_concurrency::Result<()> {
/// let session = Session::new(client).await?;
/// let mutex = Mutex::new(&session, "/locks/reports");
/// let guard = mutex.lock().await?;
/// // ... critical section ...
/// guard.unlock().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Mutex {
    session: Session,
    name: Arc<[u8]>,
    /// Shared by every handle on this name and session: serialises their `lock()` calls
    /// and keeps the queue's watch open between them.
    queue: Arc<tokio::sync::Mutex<QueueWatch>>,
}

/// Proof of holding a [`Mutex`]: the holder's key and its fencing token.
///
/// Dropping the guard without [`unlock`](Self::unlock) releases the lock in a background
/// task on the session's runtime, so the lock is released even when the holder's future
/// was cancelled or panicked. Each attempt is bounded by the session's release timeout
/// (default 5 s) and failures are retried for as long as the session lives (while its
/// lease is renewed, nothing else would free the key). If etcd refuses the delete (for
/// instance permission denied), the key stays until the session ends; if that runtime has
/// shut down, or is shutting down (a guard dropped as `#[tokio::main]`'s `main` returns,
/// or just before), the lease's expiry releases the lock: call [`unlock`](Self::unlock)
/// before exiting. A `tracing` warning says so in both cases. Go has no guard: its `Mutex`
/// itself holds the lock until `Unlock`.
///
/// # Example
///
/// ```no_run
/// # async fn example(mutex: etcd_concurrency::Mutex) -> etcd_concurrency::Result<()> {
/// let guard = mutex.lock().await?;
/// println!(
///     "holding {} with fencing token {}",
///     String::from_utf8_lossy(guard.key()),
///     guard.fencing_token()
/// );
/// drop(guard); // released in the background; `guard.unlock().await?` reports errors
/// # Ok(())
/// # }
/// ```
#[must_use = "dropping the guard releases the lock at once (in the background)"]
pub struct MutexGuard {
    key: OwnedKey,
}

impl Mutex {
    /// A handle on the lock `name` (any bytes, not empty) for `session`. Nothing is sent
    /// until [`lock`](Self::lock), [`try_lock`](Self::try_lock) or
    /// [`holder`](Self::holder). Mirrors Go's
    /// `concurrency.NewMutex(session, pfx)`, which also appends the `/` to the name.
    ///
    /// The keys live under `name` + `/`, so `a` and `ab` never meet; but a name that
    /// continues another one after a `/` (`jobs/daily` and `jobs`, or `jobs/`, whose keys
    /// are `jobs//…`) puts its keys into the other's queue, as in Go, and the shorter
    /// name then waits for them too. Nor give a lock and an [`Election`](crate::Election)
    /// the same name: in one session they would share one key.
    ///
    /// Keep names well under 200 KiB: the Txn that joins the queue carries the name about
    /// seven times, so longer names make `lock()` and `try_lock()` fail with etcd's
    /// "request is too large" (over 1.5 MiB) or gRPC's "received message larger than max"
    /// (over 2 MiB), although etcd would store a key that long.
    ///
    /// ```no_run
    /// # fn example(session: &etcd_concurrency::Session) {
    /// let mutex = etcd_concurrency::Mutex::new(session, "/locks/reports");
    /// assert_eq!(mutex.name(), b"/locks/reports");
    /// # }
    /// ```
    pub fn new(session: &Session, name: impl AsRef<[u8]>) -> Mutex {
        Mutex {
            session: session.clone(),
            name: Arc::from(name.as_ref()),
            queue: session.queue_slot(name.as_ref()),
        }
    }

    /// The lock's name, without the trailing `/`. No Go counterpart: Go's `Mutex` keeps its
    /// prefix to itself.
    pub fn name(&self) -> &[u8] {
        &self.name
    }

    /// The session whose lease holds the lock's key. No Go counterpart.
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// Waits until the lock is held by this session, and returns the guard. Mirrors Go's
    /// `Mutex.Lock`.
    ///
    /// Uncontended, this is one Txn (create this session's key and read the queue). Under
    /// contention it then watches the queue and returns as soon as every earlier waiter's
    /// key is gone; no request is made per hand-off. A waiter more than 128 places back
    /// watches only its own key and the key 129 places ahead of it until that key is gone,
    /// then reads the queue once and watches all of it: so each release reaches at most
    /// 129 waiters, and a long queue does not cost etcd an event per waiter per hand-off.
    ///
    /// Waiting has no deadline of its own: to give up after a while, wrap the call in
    /// [`tokio::time::timeout`] (see the example). That includes waiting for this
    /// session's earlier calls on the name: a guard's release, or the undoing of a
    /// cancelled `lock()`, which retries until etcd answers or the session is lost. A
    /// `lock()` whose Txn failed does not hold up the next one: if it failed without
    /// reaching etcd (connection refused), it left nothing to undo; if its outcome is
    /// unknown (cut off in a partition), the key it may have made is left to the session,
    /// which deletes it once etcd answers unless a later call takes it up (see
    /// [`Session`]); while it deletes one, the next `lock()` waits for that. A `lock()`
    /// that failed while waiting, after its Txn, releases its key as a dropped guard does,
    /// and the next one waits for that.
    ///
    /// # Errors
    ///
    /// - [`Error::InvalidArgument`]: the name is empty.
    /// - [`Error::SessionLost`]: the session is or becomes lost before the lock is held;
    ///   no guard is ever returned for a key whose lease is gone.
    /// - [`Error::OwnershipLost`]: this session's waiting key was deleted by someone else,
    ///   or vanished while its lease could not be checked (then the session may be lost).
    /// - [`Error::Etcd`] / [`Error::Timeout`]: etcd refused the request or could not be
    ///   reached within the session's request timeout.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime, or in one without its time driver (see the crate docs).
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: dropping the future deletes this session's key in the background (also
    /// when the Txn creating it was in flight: it is left to finish, then undone, retried
    /// while the session lives; if its outcome stays unknown, the key it may have made is
    /// left to the session's sweep for late joins), so a timed-out waiter leaves nothing
    /// in the queue.
    ///
    /// # Example
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// # async fn example(mutex: etcd_concurrency::Mutex) -> etcd_concurrency::Result<()> {
    /// match tokio::time::timeout(Duration::from_secs(5), mutex.lock()).await {
    ///     Ok(guard) => {
    ///         let guard = guard?;
    ///         // ... critical section ...
    ///         guard.unlock().await?;
    ///     }
    ///     Err(_) => println!("still locked after 5 s; gave up (our key is removed)"),
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn lock(&self) -> Result<MutexGuard> {
        self.check()?;
        // Waits while another `lock()` or guard of this session has the name.
        let local = tokio::select! {
            local = self.queue.clone().lock_owned() => local,
            () = self.session.lost() => return Err(Error::SessionLost),
        };
        self.check()?;
        let request = Request {
            create: Create::IfAbsent,
            value: Vec::new(),
            queue: GetOptions::new().with_keys_only(),
            local: Some(local),
            claim: None,
        };
        // The condition is "no key yet": when it is false, the same Txn found the key.
        let Some(mut joined) = join(&self.session, &self.name, request).await? else {
            return Err(Error::OwnershipLost);
        };
        Box::pin(wait_for_turn(&mut joined, &self.name)).await?;
        Ok(MutexGuard { key: joined.key })
    }

    /// Takes the lock if nobody holds it, without waiting: `Some(guard)` if taken, `None`
    /// if held by anyone, or busy in this session (another `lock()` of this session is
    /// waiting for it, a dropped guard's release or the undoing of a cancelled `lock()` is
    /// still running, or the session is deleting a key that a join attempt delivered late
    /// made: see [`Session`]). Mirrors Go's `Mutex.TryLock`.
    ///
    /// One Txn, which creates this session's key only if no key exists under the name, so
    /// a failed attempt leaves nothing behind (Go creates its key and deletes it again).
    ///
    /// Where Go returns `ErrLocked`, this returns `None`. If this session has a key under
    /// the name from an earlier run waiting behind the holder, a second request withdraws
    /// it.
    ///
    /// # Errors
    ///
    /// - [`Error::InvalidArgument`]: the name is empty.
    /// - [`Error::SessionLost`]: the session is lost, or is lost or closed before the Txn
    ///   is answered (a key it made goes with the lease, or is released in the background).
    /// - [`Error::Etcd`] / [`Error::Timeout`]: etcd refused a request (the Txn, or the
    ///   withdrawal of a leftover key) or could not be reached within the session's
    ///   request timeout.
    ///
    /// A lost race is `Ok(None)`, never [`Error::OwnershipLost`].
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime, or in one without its time driver (see the crate docs).
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: if the future is dropped while the Txn is in flight, a key it created
    /// is deleted in the background.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn example(mutex: etcd_concurrency::Mutex) -> etcd_concurrency::Result<()> {
    /// if let Some(guard) = mutex.try_lock().await? {
    ///     // ... critical section ...
    ///     guard.unlock().await?;
    /// } else {
    ///     println!("busy, try later");
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn try_lock(&self) -> Result<Option<MutexGuard>> {
        self.check()?;
        let Ok(local) = self.queue.clone().try_lock_owned() else {
            return Ok(None);
        };
        let request = Request {
            create: Create::IfQueueEmpty,
            value: Vec::new(),
            queue: GetOptions::new()
                .with_keys_only()
                .with_sort(SortTarget::Create, SortOrder::Ascend)
                .with_limit(1),
            local: Some(local),
            claim: None,
        };
        let Some(joined) = join(&self.session, &self.name, request).await? else {
            return Ok(None);
        };
        if self.session.is_lost() {
            return Err(Error::SessionLost); // lost or closed while the Txn was answered
        }
        let holder = joined.queue.iter().flatten().next().map(|kv| kv.key());
        if holder == Some(joined.key.key()) {
            return Ok(Some(MutexGuard { key: joined.key }));
        }
        // This session's key from an earlier run waits behind the holder: withdraw it.
        match joined.key.release().await {
            Ok(()) | Err(Error::OwnershipLost) => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Who holds the lock now, or `None` if nobody holds it or waits for it: the key with
    /// the lowest create revision under the name. One linearizable read; the holder may
    /// change as soon as it is answered. No Go counterpart (Curator's
    /// `InterProcessMutex.getParticipantNodes` is the nearest); for diagnostics, such as
    /// finding the session that keeps a lock, or a key without a lease written by hand,
    /// which holds it until deleted.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for an empty name; [`Error::Etcd`] / [`Error::Timeout`]
    /// if etcd could not be read within the session's request timeout. Unlike `lock()`, it
    /// works on a lost session too: it only reads.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime, or in one without its time driver (see the crate docs).
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: it only reads.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn example(mutex: etcd_concurrency::Mutex) -> etcd_concurrency::Result<()> {
    /// match mutex.holder().await? {
    ///     Some(holder) => println!("held by lease {}", holder.lease_id()),
    ///     None => println!("free"),
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn holder(&self) -> Result<Option<Holder>> {
        if self.name.is_empty() {
            return Err(empty_name());
        }
        let first = first_in_queue(&self.session, &self.name).await?;
        Ok(first.as_ref().map(Holder::from_kv))
    }

    fn check(&self) -> Result<()> {
        if self.name.is_empty() {
            return Err(empty_name());
        }
        if self.session.is_lost() {
            return Err(Error::SessionLost);
        }
        Ok(())
    }
}

impl fmt::Debug for Mutex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mutex")
            .field("name", &String::from_utf8_lossy(&self.name))
            .field("session", &self.session)
            .finish()
    }
}

impl MutexGuard {
    /// The holder's key: the lock's name, `/`, and the lease id in lowercase hex (Go's
    /// `Mutex.Key()`).
    pub fn key(&self) -> &[u8] {
        self.key.key()
    }

    /// The create revision of the holder's key: a number that grows with every grant of
    /// this lock, to give to resources that must reject writes from older holders
    /// (Kleppmann's fencing token, Chubby's sequencer). Go's `Mutex.Header().Revision` at
    /// acquisition, roughly; here it is exact.
    ///
    /// ```no_run
    /// # async fn example(guard: etcd_concurrency::MutexGuard) {
    /// // Send the token with each write; the store refuses tokens below the highest seen.
    /// let request = format!("PUT /report?fencing-token={}", guard.fencing_token());
    /// # }
    /// ```
    pub fn fencing_token(&self) -> i64 {
        self.key.create_revision()
    }

    /// A [`Compare`] that holds while this guard's key is the holder's incarnation:
    /// `CreateRevision(key) == fencing_token`. Put it in your own [`etcd_client::Txn`] so
    /// the write commits only while the lock is held (Go's `Mutex.IsOwner()`).
    ///
    /// ```no_run
    /// use etcd_client::{Txn, TxnOp};
    /// # async fn example(guard: etcd_concurrency::MutexGuard, mut client: etcd_client::Client)
    /// # -> etcd_concurrency::Result<()> {
    /// let txn = Txn::new()
    ///     .when([guard.ownership_compare()])
    ///     .and_then([TxnOp::put("/balance", "100", None)]);
    /// if !client.txn(txn).await?.succeeded() {
    ///     println!("the lock was lost before the write: nothing written");
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn ownership_compare(&self) -> Compare {
        self.key.ownership_compare()
    }

    /// Resolves once holding the lock can no longer be assumed: the session is lost
    /// (lease expired, revoked, or not renewed for a TTL; also once it is closed or
    /// orphaned) or the key was deleted or re-created. Use it to stop work that must only
    /// run under the lock (Curator's `LOST`, Consul's lock channel; Go's nearest is
    /// `Session.Done()`). It watches the key while awaited, and also resolves if etcd
    /// refuses that watch (for instance permission denied), since holding the lock can
    /// then not be confirmed. Once it saw the key gone, later calls resolve at once.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime, or in one without its time driver (see the crate docs).
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe; each call opens its own watch, closed when the future is dropped.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn export_reports() {}
    /// # async fn example(guard: etcd_concurrency::MutexGuard) -> etcd_concurrency::Result<()> {
    /// tokio::select! {
    ///     () = export_reports() => guard.unlock().await?,
    ///     () = guard.lost() => println!("lock lost: export stopped half-way"),
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn lost(&self) {
        self.key.lost().await;
    }

    /// Whether holding the lock is known to be over, without waiting or asking etcd: true
    /// once the session is lost ([`Session::is_lost`], closed or orphaned included) or a
    /// call to [`lost`](Self::lost) saw the key deleted or re-created. A key deleted by
    /// someone else is seen only by a `lost()` being awaited, which watches it: with none
    /// running, this stays false until the session itself is lost. Meant for a health
    /// check or a gauge beside work that awaits `lost()` or runs in
    /// [`while_held`](Self::while_held); fence writes in any case. No Go counterpart (in
    /// Go, a `select` on `Session.Done()` with a `default` case).
    ///
    /// ```no_run
    /// # fn example(guard: &etcd_concurrency::MutexGuard) {
    /// let status = if guard.is_lost() { "lost" } else { "held" };
    /// println!("lock {}: {status}", String::from_utf8_lossy(guard.key()));
    /// # }
    /// ```
    ///
    /// [`Session::is_lost`]: crate::Session::is_lost
    pub fn is_lost(&self) -> bool {
        self.key.is_lost()
    }

    /// Runs `work` while holding the lock: returns `Some(output)` if it finished, or `None`
    /// if the lock was lost first (as [`lost`](Self::lost) tells), in which case `work` is
    /// dropped (cancelled) at once. [`lost`](Self::lost) is checked before each poll of
    /// `work`, so a lock already known to be lost ([`is_lost`](Self::is_lost)) returns
    /// `None` without starting `work`. The guard is kept either way; unlock or drop it when
    /// done. As [`Leadership::while_leading`](crate::Leadership::while_leading); no Go
    /// counterpart (in Go, select on `Session.Done()`).
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime, or in one without its time driver (see the crate docs).
    ///
    /// # Cancel safety
    ///
    /// Dropping the future drops `work`.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn export_reports() -> u32 { 0 }
    /// # async fn example(guard: etcd_concurrency::MutexGuard) -> etcd_concurrency::Result<()> {
    /// match guard.while_held(export_reports()).await {
    ///     Some(reports) => println!("exported {reports} reports"),
    ///     None => println!("lock lost: export stopped half-way"),
    /// }
    /// guard.unlock().await
    /// # }
    /// ```
    pub async fn while_held<F: Future>(&self, work: F) -> Option<F::Output> {
        tokio::select! {
            biased;
            () = self.lost() => None,
            output = work => Some(output),
        }
    }

    /// Releases the lock: deletes the key if it is still this holder's incarnation (a
    /// fenced delete, one Txn). Mirrors Go's `Mutex.Unlock`, which deletes unconditionally
    /// and does not report a lock that was no longer held.
    ///
    /// # Errors
    ///
    /// - [`Error::OwnershipLost`]: the key was already gone (lease expired or revoked;
    ///   deleted) or re-created by a newer holder, which is left untouched. The lock was
    ///   not held when this was called. Returned at once, with no request, if
    ///   [`lost`](Self::lost) has seen the key gone. Not returned when another attempt of
    ///   the delete has an unknown outcome (unanswered, or failed in transit): the key
    ///   being gone may be its doing, so `Ok(())` says that the key is gone, not who
    ///   deleted it.
    /// - [`Error::SessionLost`]: the session was lost or closed before etcd answered (at
    ///   once, with no request, if it already was): the key is gone with the lease, or
    ///   goes when etcd expires it (at most a TTL after the last renewal that reached
    ///   etcd), so nothing waits on an etcd out of reach. After
    ///   [`Session::orphan`](crate::Session::orphan) the delete is still sent: the lease
    ///   lives on, perhaps resumed by another session.
    /// - [`Error::Etcd`] for which [`Error::is_transient`] is true, or [`Error::Timeout`]:
    ///   etcd could not be reached within the session's request timeout; releasing goes
    ///   on in the background for as long as the session lives (not after
    ///   [`Session::orphan`](crate::Session::orphan)).
    /// - Any other [`Error::Etcd`]: etcd refused the delete (for instance permission
    ///   denied); the key stays until the session ends.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime, or in one without its time driver (see the crate docs).
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: if the future is dropped before the delete is known to be applied, the
    /// release goes on in the background, as for a dropped guard.
    ///
    /// # Example
    ///
    /// ```no_run
    /// use etcd_concurrency::Error;
    /// # async fn example(guard: etcd_concurrency::MutexGuard) -> etcd_concurrency::Result<()> {
    /// match guard.unlock().await {
    ///     Ok(()) => {}
    ///     Err(Error::OwnershipLost) => println!("the lock had already been lost"),
    ///     Err(error) => return Err(error),
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn unlock(self) -> Result<()> {
        self.key.release().await
    }
}

impl fmt::Debug for MutexGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MutexGuard")
            .field("key", &String::from_utf8_lossy(self.key.key()))
            .field("fencing_token", &self.key.create_revision())
            .finish()
    }
}

fn empty_name() -> Error {
    Error::InvalidArgument("a lock name must not be empty".into())
}
