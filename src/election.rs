//! [`Election`]: leader election with a fenced [`Leadership`] guard and a truthful
//! observation stream.

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use etcd_client::{Compare, GetOptions, KeyValue};

mod observe;

pub use self::observe::Observe;

use crate::acquire::{Create, Request, join};
use crate::error::{Error, Result};
use crate::ownership::OwnedKey;
use crate::session::{Session, first_in_queue, lease_hex};
use crate::wait::{wait_for_turn, why_gone};

/// A leader election named by a key prefix; candidates campaign through a [`Session`].
///
/// Each candidate writes `name/` + its lease id in lowercase hex, with its proposal as the
/// value; the leader is the candidate whose key has the lowest create revision, so
/// candidates lead in the order they campaigned. These are the keys of Go's
/// `concurrency.Election`, etcd's server-side Election service and `etcdctl elect`, so
/// Rust and Go processes can take part in one election.
///
/// If the leader's process dies, its lease expires after the TTL and the next candidate
/// leads. As with locks, a paused leader can outlive its lease: fence writes that only
/// the leader may make with [`Leadership::ownership_compare`] (see the crate docs).
///
/// `Election` is a cheap [`Clone`] handle; nothing is sent until a method is called.
///
/// # Example: a leader-only job
///
/// A lost lease ends its session for good (its campaigns return [`Error::SessionLost`]),
/// so a process that keeps standing for election starts a session for each term, as Go
/// code makes a new `Session` once `Done()` fires.
///
/// ```no_run
/// use etcd_concurrency::{Election, Error, Session};
///
/// # async fn run_job() {}
/// # async fn example(client: etcd_client::Client) -> etcd_concurrency::Result<()> {
/// loop {
///     let session = Session::new(client.clone()).await?;
///     let election = Election::new(&session, "/elections/scheduler");
///     let leadership = match election.campaign("host-a").await {
///         Ok(leadership) => leadership,
///         // The lease expired, or the key was deleted, while waiting.
///         Err(Error::SessionLost | Error::OwnershipLost) => continue,
///         Err(error) => return Err(error),
///     };
///     // Runs until the job ends or leadership is lost (lease expired, key deleted).
///     if leadership.while_leading(run_job()).await.is_some() {
///         leadership.resign().await?;
///         return session.close().await;
///     }
///     // Lost: the next pass campaigns again; dropping this session revokes its lease,
///     // if it still has one.
/// }
/// # }
/// ```
#[derive(Clone)]
pub struct Election {
    session: Session,
    name: Arc<[u8]>,
}

/// Proof of leading an [`Election`]: the leader's key and its fencing token.
///
/// Dropping it without [`resign`](Self::resign) resigns in a background task on the
/// session's runtime, so leadership is handed on even when the leader's future was
/// cancelled; unless another campaign or leadership of this session shares its key, which
/// then stays theirs. Each attempt is bounded by the session's release timeout
/// (default 5 s) and failures are retried for as long as the session lives (while its
/// lease is renewed, nothing else would free the key). If etcd refuses the delete (for
/// instance permission denied), the key stays until the session ends; if that runtime has
/// shut down, or is shutting down (a leadership dropped as `#[tokio::main]`'s `main`
/// returns, or just before), the lease's expiry ends the leadership: call
/// [`resign`](Self::resign) before exiting. A `tracing` warning says so in both cases. Go
/// has no such guard: its `Election` itself leads until `Resign`.
///
/// # Example
///
/// ```no_run
/// # async fn example(election: etcd_concurrency::Election) -> etcd_concurrency::Result<()> {
/// let leadership = election.campaign("host-a").await?;
/// println!(
///     "leading as {} (term {})",
///     String::from_utf8_lossy(leadership.key()),
///     leadership.fencing_token()
/// );
/// leadership.resign().await?;
/// # Ok(())
/// # }
/// ```
#[must_use = "dropping the leadership resigns at once (in the background)"]
pub struct Leadership {
    key: OwnedKey,
}

/// A leader as seen by [`Election::leader`] and [`Election::observe`]: the leader's key as
/// Go's `Election.Leader` and `Election.Observe` return it (`GetResponse.Kvs[0]`). Two are
/// equal when they are the same write of the same key: a proclaim, even of the same value,
/// makes a new one.
///
/// ```no_run
/// # async fn example(election: etcd_concurrency::Election) -> etcd_concurrency::Result<()> {
/// if let Some(leader) = election.leader().await? {
///     println!(
///         "{} leads since revision {} on lease {}",
///         String::from_utf8_lossy(leader.value()),
///         leader.create_revision(),
///         leader.lease_id()
///     );
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Leader {
    key: Vec<u8>,
    value: Vec<u8>,
    create_revision: i64,
    mod_revision: i64,
    lease_id: i64,
}

impl Election {
    /// A handle on the election `name` (any bytes, not empty) for `session`. Mirrors Go's
    /// `concurrency.NewElection(session, pfx)`.
    ///
    /// As for a [`Mutex`](crate::Mutex), the keys live under `name` + `/`: an election
    /// whose name continues this one after a `/` puts its candidates among this one's (as
    /// in Go), and a lock of the same name would share this session's key. As for a lock,
    /// keep names well under 200 KiB: the join Txn carries the name about seven times, and
    /// etcd refuses requests over 1.5 MiB.
    ///
    /// ```no_run
    /// # fn example(session: &etcd_concurrency::Session) {
    /// let election = etcd_concurrency::Election::new(session, "/elections/scheduler");
    /// assert_eq!(election.name(), b"/elections/scheduler");
    /// # }
    /// ```
    pub fn new(session: &Session, name: impl AsRef<[u8]>) -> Election {
        Election {
            session: session.clone(),
            name: Arc::from(name.as_ref()),
        }
    }

    /// The election's name, without the trailing `/`. No Go counterpart: Go's `Election`
    /// keeps its prefix to itself.
    pub fn name(&self) -> &[u8] {
        &self.name
    }

    /// The session whose lease holds this candidate's key. No Go counterpart.
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// Becomes a candidate with proposal `value` and waits until elected. Mirrors Go's
    /// `Election.Campaign`.
    ///
    /// One Txn writes the candidate's key and reads the candidates ahead; then one watch
    /// on the election follows them until the last one is gone, without a request per
    /// change (a candidate more than 128 places back watches only its own key and the key
    /// 129 places ahead until that is gone, then reads the candidates once, as
    /// [`Mutex::lock`](crate::Mutex::lock) waiters do). If this session already has a key
    /// in the election (an earlier campaign, or a resumed lease), that key keeps its place
    /// and takes the new value, as in Go. The leaderships that share it end together when
    /// one resigns; dropping one leaves the key to the others. A campaign that starts while
    /// a dropped leadership's key is being deleted waits for that delete, so it never joins
    /// a key about to vanish; so does one that starts while an earlier campaign that failed
    /// with its outcome unknown is being undone (its key looked up until etcd answers or
    /// the session is lost): bound the call with [`tokio::time::timeout`] to give up
    /// meanwhile.
    ///
    /// # Errors
    ///
    /// - [`Error::InvalidArgument`]: the name is empty.
    /// - [`Error::SessionLost`]: the session is or becomes lost before the election is
    ///   won; a candidate whose lease died is never told it leads.
    /// - [`Error::OwnershipLost`]: the candidate's key was deleted by someone else, or
    ///   vanished while its lease could not be checked (then the session may be lost).
    /// - [`Error::Etcd`] / [`Error::Timeout`]: etcd refused the request (for instance a
    ///   value over its request size limit, 1.5 MiB by default) or could not be reached
    ///   within the session's request timeout.
    ///
    /// A campaign that fails, like one cancelled, withdraws this session's key in the
    /// election (one left by an earlier process on the same lease included), unless
    /// another campaign or [`Leadership`] of this session uses it. One whose join never
    /// reached etcd (every attempt's connection refused, or turned away for want of a
    /// leader) wrote and found nothing, so it leaves nothing to undo: the next campaign
    /// fails the same way at once, instead of waiting for a look-up that only etcd's
    /// return would end.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime, or in one without its time driver (see the crate docs).
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: dropping the future withdraws the candidacy (its key is deleted in the
    /// background, also if the Txn creating it was in flight), unless another live
    /// campaign or [`Leadership`] of this session shares the key: then the last of them to
    /// go withdraws it, even if it resigned before this campaign made the key.
    ///
    /// # Example
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// # async fn example(election: etcd_concurrency::Election) -> etcd_concurrency::Result<()> {
    /// // Give up the candidacy after a minute (its key is withdrawn).
    /// match tokio::time::timeout(Duration::from_secs(60), election.campaign("host-a")).await {
    ///     Ok(leadership) => leadership?.resign().await?,
    ///     Err(_) => println!("not elected within a minute"),
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn campaign(&self, value: impl Into<Vec<u8>>) -> Result<Leadership> {
        self.check()?;
        let value = value.into();
        // Waits while the session's key is being deleted (a dropped leadership).
        let claim = tokio::select! {
            claim = self.session.claim_election(&self.name) => claim,
            () = self.session.lost() => return Err(Error::SessionLost),
        };
        let request = Request {
            create: Create::IfAbsent,
            value: value.clone(),
            queue: GetOptions::new().with_keys_only(),
            local: None,
            claim: Some(claim),
        };
        // The condition is "no key yet": when it is false, the same Txn found the key.
        let Some(mut joined) = join(&self.session, &self.name, request).await? else {
            return Err(Error::OwnershipLost);
        };
        if joined
            .found_value
            .take()
            .is_some_and(|found| found != value)
        {
            match Box::pin(joined.key.put(value)).await {
                // Gone since the join found it: with the lease, or deleted by someone.
                Err(Error::OwnershipLost) => return Err(Box::pin(why_gone(&self.session)).await),
                written => written?,
            }
        }
        Box::pin(wait_for_turn(&mut joined, &self.name)).await?;
        Ok(Leadership { key: joined.key })
    }

    /// The current leader, or `None` if nobody campaigns. One linearizable read. Mirrors
    /// Go's `Election.Leader`, which returns `ErrElectionNoLeader` instead of `None`.
    ///
    /// The leader is the candidate with the lowest create revision. Candidates created by
    /// one Txn (written by hand: each `campaign()` is a Txn of its own) tie, and etcd's
    /// sorted read may then name any of them, where [`observe`](Self::observe) names the
    /// lowest key.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for an empty name; [`Error::Etcd`] / [`Error::Timeout`]
    /// if etcd could not be read within the session's request timeout.
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
    /// # async fn example(election: etcd_concurrency::Election) -> etcd_concurrency::Result<()> {
    /// match election.leader().await? {
    ///     Some(leader) => println!("leader: {}", String::from_utf8_lossy(leader.value())),
    ///     None => println!("nobody leads"),
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn leader(&self) -> Result<Option<Leader>> {
        if self.name.is_empty() {
            return Err(empty_name());
        }
        let first = first_in_queue(&self.session, &self.name).await?;
        Ok(first.as_ref().map(Leader::from_kv))
    }

    /// A stream ([`Observe`], `Unpin`) of the election's leader: first the current one
    /// (`None` when nobody leads), then every change of leader and every write of the
    /// leader's key, in order: each proclaim is reported, even of the same value (with a
    /// new [`Leader::mod_revision`]), so a leader can proclaim as a heartbeat. Nothing is
    /// sent until it is first polled. Mirrors Go's `Election.Observe`, which never reports
    /// that nobody leads and can report a later candidate as leader (etcd #18163); here the
    /// leader is always the candidate with the lowest create revision (of candidates
    /// created by one Txn, the lowest key).
    ///
    /// It follows all candidates through one watch. A broken watch (member killed,
    /// connection lost) is re-opened from the last revision seen + 1, so no change is
    /// missed, with two exceptions: if that history was compacted, or if replaying it takes
    /// an answer over the client's size limit (4 MiB in etcd-client; Go's client takes up
    /// to 2 GiB), the election is read again and the stream goes on from there: it yields
    /// the leader as it is then, and the changes in between are not reported. The stream
    /// never ends by itself: it yields an `Err` for an error that retrying does not cure
    /// (e.g. permission denied), then keeps trying with back-off. Drop it to stop. Only for
    /// an empty name does it yield one [`Error::InvalidArgument`] and end. While no member
    /// can be reached it yields nothing and keeps trying (Go's blocks the same way): to
    /// notice an outage, bound each `next()` with [`tokio::time::timeout`], or watch the
    /// session's [`lost`](Session::lost), which resolves once its keep-alive has failed for
    /// a TTL. A member cut off from the raft leader keeps its watches open, silent: the
    /// stream re-opens its watch through another member once it sees that member fall
    /// behind the cluster, within about 20 s of the cut; connect with
    /// etcd-client's `ConnectOptions::with_require_leader(true)` (Go's
    /// `clientv3.WithRequireLeader`) to have etcd cancel such watches within about 2 s.
    ///
    /// Observing only reads: it uses the session's client, not its lease. Poll the stream
    /// steadily, or drop it: while it is not polled its events wait unread in the
    /// connection, where they hold HTTP/2 flow-control windows (a few such watches on busy
    /// elections can stall every request on the connection).
    ///
    /// # Errors
    ///
    /// Items, not the end of the stream: [`Error::InvalidArgument`] for an empty name (the
    /// only item; the stream then ends); [`Error::Etcd`] when etcd refuses a read or the
    /// watch (e.g. permission denied), after which the stream keeps trying with back-off.
    /// Never [`Error::Timeout`]: while etcd cannot be reached it yields nothing.
    ///
    /// # Panics
    ///
    /// When polled outside a Tokio runtime, or in one without its time driver (see the crate
    /// docs).
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: dropping a `next()` future loses no change, as the read in progress
    /// belongs to the stream; dropping the stream closes its watch.
    ///
    /// # Example
    ///
    /// ```no_run
    /// use futures::StreamExt;
    /// # async fn example(election: etcd_concurrency::Election) -> etcd_concurrency::Result<()> {
    /// let mut leaders = election.observe();
    /// while let Some(leader) = leaders.next().await {
    ///     match leader {
    ///         Ok(Some(leader)) => println!("leader: {}", String::from_utf8_lossy(leader.value())),
    ///         Ok(None) => println!("nobody leads"),
    ///         // One it cannot retry (say, permission denied); it keeps following after it.
    ///         Err(error) => eprintln!("observe: {error}"),
    ///     }
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn observe(&self) -> Observe {
        Observe::new(self.session.client().clone(), &self.name)
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

fn empty_name() -> Error {
    Error::InvalidArgument("an election name must not be empty".into())
}

impl fmt::Debug for Election {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Election")
            .field("name", &String::from_utf8_lossy(&self.name))
            .field("session", &self.session)
            .finish()
    }
}

impl Leadership {
    /// Replaces the leader's proposal with `value`, if this is still the leader: a put
    /// fenced by the key's create revision. Observers see the new value. Mirrors Go's
    /// `Election.Proclaim`.
    ///
    /// The put is also fenced by the key's mod revision as this leadership last saw it, so
    /// an attempt sent again (after 2 s unanswered) whose first copy reaches etcd
    /// late, held up in a stalled link, never overwrites a later proclaim.
    ///
    /// # Errors
    ///
    /// - [`Error::SessionLost`]: the session is lost (then nothing is written), or becomes
    ///   lost before etcd answers (the value may have been written; the key goes with the
    ///   lease).
    /// - [`Error::OwnershipLost`]: the key is gone or belongs to a newer incarnation (this
    ///   leader was deposed); nothing is written, unless an earlier attempt of this call
    ///   that failed in transit was applied before the key was lost. From then on
    ///   [`is_lost`](Self::is_lost) is true, and [`lost`](Self::lost),
    ///   [`while_leading`](Self::while_leading) and [`resign`](Self::resign) answer at
    ///   once.
    /// - [`Error::Etcd`] / [`Error::Timeout`]: etcd refused the request (e.g. a value over
    ///   its request size limit, 1.5 MiB by default) or could not be reached. When
    ///   [`Error::is_transient`] is true, the value may have been written; so it may when
    ///   etcd answered "mvcc: database space exceeded", which it gives the write that
    ///   crosses its backend quota after applying it. Proclaiming the same value again is
    ///   safe.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime, or in one without its time driver (see the crate docs).
    ///
    /// # Cancel safety
    ///
    /// If the future is dropped before completing, the value may or may not have been
    /// written.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn example(leadership: etcd_concurrency::Leadership) -> etcd_concurrency::Result<()> {
    /// leadership.proclaim("host-a: draining").await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn proclaim(&self, value: impl Into<Vec<u8>>) -> Result<()> {
        if self.key.session().is_lost() {
            return Err(Error::SessionLost);
        }
        self.key.put(value.into()).await
    }

    /// Gives up leadership: deletes the key if it is still this leader's incarnation, so
    /// the next candidate leads at once. Mirrors Go's `Election.Resign`, which does not
    /// report a leadership that had already ended.
    ///
    /// The session's other campaigns and leaderships in this election share the key, so
    /// this ends them too. A campaign of the session that makes a new key meanwhile and is
    /// then cancelled leaves that key to them and to this leadership: the last of them to
    /// go withdraws it in the background.
    ///
    /// # Errors
    ///
    /// - [`Error::OwnershipLost`]: the key was already gone (its lease expired or revoked;
    ///   deleted) or re-created; this leadership had already ended. Returned at once, with
    ///   no request, if [`lost`](Self::lost) has seen the key gone or a
    ///   [`proclaim`](Self::proclaim) found it so. If no other campaign or
    ///   leadership of this session is in the election, a newer key of its lease there
    ///   (made by a campaign since cancelled) is withdrawn in the background. As for
    ///   [`MutexGuard::unlock`](crate::MutexGuard::unlock), not returned after an attempt
    ///   of the delete whose outcome is unknown.
    /// - [`Error::Etcd`] for which [`Error::is_transient`] is true, or [`Error::Timeout`]:
    ///   etcd could not be reached; resigning goes on in the background for as long as the
    ///   session lives (not after [`Session::orphan`](crate::Session::orphan)), ending the
    ///   session's other leaderships here too, as the resign would have. A campaign of
    ///   this session that starts meanwhile may join the key before that delete lands, and
    ///   then fail with [`Error::OwnershipLost`] or lose the leadership it won.
    /// - [`Error::SessionLost`]: as for [`MutexGuard::unlock`](crate::MutexGuard::unlock),
    ///   the session was lost or closed before etcd answered; the key goes with the lease.
    ///   After [`Session::orphan`](crate::Session::orphan) the delete is still sent.
    /// - Any other [`Error::Etcd`]: etcd refused the delete (for instance permission
    ///   denied); the key stays until the session ends.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime, or in one without its time driver (see the crate docs).
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: if the future is dropped before the delete is known to be applied
    /// (also before its first poll), resigning goes on in the background, as after a
    /// transient error.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn example(leadership: etcd_concurrency::Leadership) -> etcd_concurrency::Result<()> {
    /// leadership.resign().await?; // the next candidate leads at once
    /// # Ok(())
    /// # }
    /// ```
    pub fn resign(self) -> impl Future<Output = Result<()>> + Send + 'static {
        // Not an `async fn`: the resign is under way from this call, so that a future
        // dropped before its first poll still resigns (in the background).
        self.key.release()
    }

    /// The leader's key: the election's name, `/`, and the lease id in lowercase hex (Go's
    /// `Election.Key()`).
    pub fn key(&self) -> &[u8] {
        self.key.key()
    }

    /// The create revision of the leader's key: it grows with every new leader, so a
    /// resource can reject writes from earlier leaders (Go's `Election.Rev()`).
    pub fn fencing_token(&self) -> i64 {
        self.key.create_revision()
    }

    /// A [`Compare`] that holds while this leadership lasts: `CreateRevision(key) ==
    /// fencing_token`. Put it in your own Txn so that a write commits only while this
    /// process leads. Go's `Election` uses the same compare inside `Proclaim` and
    /// `Resign` but does not expose it.
    ///
    /// ```no_run
    /// use etcd_client::{Txn, TxnOp};
    /// # async fn example(leadership: etcd_concurrency::Leadership, mut client: etcd_client::Client)
    /// # -> etcd_concurrency::Result<()> {
    /// let txn = Txn::new()
    ///     .when([leadership.ownership_compare()])
    ///     .and_then([TxnOp::put("/scheduler/next-run", "12:00", None)]);
    /// let written = client.txn(txn).await?.succeeded(); // false once deposed
    /// # Ok(())
    /// # }
    /// ```
    pub fn ownership_compare(&self) -> Compare {
        self.key.ownership_compare()
    }

    /// Resolves once leading can no longer be assumed: the session is lost or the key was
    /// deleted or re-created. It watches the key while awaited, and also resolves if etcd
    /// refuses that watch (for instance permission denied), since leading can then not be
    /// confirmed. Once it or a [`proclaim`](Self::proclaim) saw the key gone, later calls
    /// resolve at once. Go's nearest is `Session.Done()`.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime, or in one without its time driver (see the crate docs).
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe; each call opens its own watch, closed when the future is dropped. The
    /// watch carries only the key's deletion, so a future left unpolled while this
    /// leadership proclaims holds nothing back on the connection.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn example(leadership: etcd_concurrency::Leadership) {
    /// leadership.lost().await;
    /// println!("no longer leading");
    /// # }
    /// ```
    pub async fn lost(&self) {
        self.key.lost().await;
    }

    /// Whether leading is known to be over, without waiting or asking etcd: true once the
    /// session is lost ([`Session::is_lost`], closed or orphaned included), a call to
    /// [`lost`](Self::lost) saw the key deleted or re-created, or a
    /// [`proclaim`](Self::proclaim) found it so ([`Error::OwnershipLost`]). A key deleted
    /// by someone else (or by the resign of another leadership of this session, which
    /// shares it) is seen only by a `lost()` of this handle being awaited, which watches
    /// it: with none running, this stays false until the session itself is lost or a
    /// proclaim is refused so. Meant for a health check or a gauge ("am I the leader?")
    /// beside work that awaits `lost()` or runs in [`while_leading`](Self::while_leading);
    /// fence writes in any case. No Go counterpart (in Go, a `select` on `Session.Done()`
    /// with a `default` case).
    ///
    /// ```no_run
    /// # fn example(leadership: &etcd_concurrency::Leadership) {
    /// let leading = !leadership.is_lost();
    /// println!("leader: {leading}, fencing token {}", leadership.fencing_token());
    /// # }
    /// ```
    ///
    /// [`Session::is_lost`]: crate::Session::is_lost
    pub fn is_lost(&self) -> bool {
        self.key.is_lost()
    }

    /// Runs `work` while leading: returns `Some(output)` if it finished, or `None` if
    /// leadership was lost first (as [`lost`](Self::lost) tells), in which case `work` is
    /// dropped (cancelled) at once. [`lost`](Self::lost) is checked before each poll of
    /// `work`, so a leadership already known to be lost ([`is_lost`](Self::is_lost))
    /// returns `None` without starting `work`. The leadership is kept either way; resign or
    /// drop it when done. No Go counterpart; in Go, select on `Session.Done()`.
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
    /// # async fn compact_tables() -> u32 { 0 }
    /// # async fn example(leadership: etcd_concurrency::Leadership) {
    /// match leadership.while_leading(compact_tables()).await {
    ///     Some(tables) => println!("compacted {tables} tables"),
    ///     None => println!("leadership lost: compaction stopped"),
    /// }
    /// # }
    /// ```
    pub async fn while_leading<F: Future>(&self, work: F) -> Option<F::Output> {
        tokio::select! {
            biased;
            () = self.lost() => None,
            output = work => Some(output),
        }
    }
}

impl fmt::Debug for Leadership {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Leadership")
            .field("key", &String::from_utf8_lossy(self.key.key()))
            .field("fencing_token", &self.key.create_revision())
            .finish()
    }
}

impl fmt::Debug for Leader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Leader")
            .field("key", &String::from_utf8_lossy(&self.key))
            .field("value", &String::from_utf8_lossy(&self.value))
            .field("create_revision", &self.create_revision)
            .field("mod_revision", &self.mod_revision)
            .field("lease_id", &format_args!("{}", lease_hex(self.lease_id)))
            .finish()
    }
}

impl Leader {
    fn from_kv(kv: &KeyValue) -> Leader {
        Leader {
            key: kv.key().to_vec(),
            value: kv.value().to_vec(),
            create_revision: kv.create_revision(),
            mod_revision: kv.mod_revision(),
            lease_id: kv.lease(),
        }
    }

    /// The leader's key: the election's name, `/`, and its lease id in lowercase hex. Go's
    /// `Kvs[0].Key`.
    pub fn key(&self) -> &[u8] {
        &self.key
    }

    /// The leader's proposal, as campaigned with or last proclaimed. Go's `Kvs[0].Value`.
    pub fn value(&self) -> &[u8] {
        &self.value
    }

    /// The create revision of the leader's key (its fencing token). Go's
    /// `Kvs[0].CreateRevision`.
    pub fn create_revision(&self) -> i64 {
        self.create_revision
    }

    /// The revision of the last write to the leader's key: its campaign, or its latest
    /// proclaim (even of the same value). Go's `Kvs[0].ModRevision`.
    pub fn mod_revision(&self) -> i64 {
        self.mod_revision
    }

    /// The id of the lease the leader's key is attached to (0 for a key without lease). Go's
    /// `Kvs[0].Lease`.
    pub fn lease_id(&self) -> i64 {
        self.lease_id
    }
}

#[cfg(test)]
mod tests {
    use super::Leader;

    #[test]
    fn a_leader_debugs_its_key_and_value_as_text_and_its_lease_in_hex() {
        let leader = Leader {
            key: b"/elections/jobs/694d7f3a".to_vec(),
            value: b"host-a".to_vec(),
            create_revision: 42,
            mod_revision: 57,
            lease_id: 0x694d7f3a,
        };
        assert_eq!(
            format!("{leader:?}"),
            r#"Leader { key: "/elections/jobs/694d7f3a", value: "host-a", create_revision: 42, mod_revision: 57, lease_id: 694d7f3a }"#
        );
    }
}
