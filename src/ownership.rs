//! A key this session holds in a lock's or election's queue: fenced operations on it, loss
//! detection, and its release when dropped.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};
use tokio::sync::OwnedMutexGuard;

use crate::error::{Error, Result};
use crate::release::spawn_release;
use crate::retry::{Backoff, retry, retry_write_txn};
use crate::session::{ElectionClaim, LastClaim, Session, WeakSession};
use crate::wait::QueueWatch;
use crate::watcher::until_gone;

/// This session's key in a queue, identified by its create revision (the fencing token).
///
/// Every write to the key is fenced: it applies only while the key still has that create
/// revision, so a stale handle never deletes or overwrites a newer incarnation of the key
/// (etcd #22082). Dropped before [`release`](Self::release) reached a definite outcome
/// (never called, cancelled, or failed in transit), it deletes the key in a background
/// task on the session's runtime, each attempt bounded by the session's release timeout,
/// retried for as long as the session lives: while its lease is renewed, nothing else
/// would free the key. Nothing is released once the session has ended (closed: the key
/// went with the lease; orphaned: it stays until the lease expires) or is lost, nor while
/// another campaign or leadership of the session shares an election's key, unless a
/// release of this handle was cut short (it ends them all, as it would have). The last of
/// those to go, released or not, deletes any other incarnation of the key that one of them
/// left behind (see [`ElectionClaim::leave`]).
pub(crate) struct OwnedKey {
    session: Session,
    key: Vec<u8>,
    create_revision: i64,
    /// The key's mod revision as this handle last wrote or read it.
    mod_revision: AtomicI64,
    /// Set once [`lost`](Self::lost) saw this incarnation of the key gone, or a fenced
    /// [`put`](Self::put) found it so, which it is for good.
    seen_gone: AtomicBool,
    release_on_drop: bool,
    /// Set while [`release`](Self::release) runs, and after it failed in transit: dropped
    /// then, the handle deletes its incarnation in the background even while others of the
    /// session share the key, as the release would have.
    releasing: bool,
    /// Held until the key is deleted: the in-process slot of a mutex's queue, if any.
    local: Option<OwnedMutexGuard<QueueWatch>>,
    /// Held until the key is deleted: the claim of an election's campaign, if any.
    claim: Option<ElectionClaim>,
}

impl OwnedKey {
    pub(crate) fn new(
        session: Session,
        key: Vec<u8>,
        create_revision: i64,
        mod_revision: i64,
        local: Option<OwnedMutexGuard<QueueWatch>>,
        claim: Option<ElectionClaim>,
    ) -> OwnedKey {
        OwnedKey {
            session,
            key,
            create_revision,
            mod_revision: AtomicI64::new(mod_revision),
            seen_gone: AtomicBool::new(false),
            release_on_drop: true,
            releasing: false,
            local,
            claim,
        }
    }

    pub(crate) fn key(&self) -> &[u8] {
        &self.key
    }

    pub(crate) fn create_revision(&self) -> i64 {
        self.create_revision
    }

    pub(crate) fn session(&self) -> &Session {
        &self.session
    }

    /// The queue slot held with this key, if it is a mutex's.
    pub(crate) fn queue_watch(&mut self) -> Option<&mut QueueWatch> {
        self.local.as_deref_mut()
    }

    /// True while the key is this incarnation: `CreateRevision(key) == token`.
    pub(crate) fn ownership_compare(&self) -> Compare {
        Compare::create_revision(self.key.clone(), CompareOp::Equal, self.create_revision)
    }

    /// Deletes the key if it is still this incarnation.
    ///
    /// Errors: [`Error::OwnershipLost`] if it was not (deleted or re-created meanwhile), at
    /// once if [`lost`](Self::lost) or a [`put`](Self::put) saw it gone;
    /// [`Error::SessionLost`] once the session is lost or closed before an answer
    /// ([`Session::lost_or_closed`]), at once if it was; [`Error::Etcd`] /
    /// [`Error::Timeout`] if etcd could not be reached, in which case the release goes on
    /// in the background (as it does when this future is dropped).
    ///
    /// The release counts as asked for as soon as this is called: a future dropped before
    /// its first poll releases in the background as one dropped half-way does (for an
    /// election's key, ending the others that share it, as the release would have).
    pub(crate) fn release(mut self) -> impl Future<Output = Result<()>> + Send + 'static {
        self.releasing = true;
        self.delete_incarnation()
    }

    /// The delete of [`release`](Self::release), once it counts as asked for. Once
    /// [`lost`](Self::lost) or a [`put`](Self::put) saw the incarnation gone, or the
    /// session is lost or closed (the key is gone or going with its lease), there is
    /// nothing to delete and no request to make or wait for (etcd may be unreachable by
    /// now).
    async fn delete_incarnation(mut self) -> Result<()> {
        let released = if self.seen_gone.load(Ordering::Relaxed) {
            Err(Error::OwnershipLost)
        } else {
            let limit = self.session.request_timeout();
            let delete = fenced_delete(&self.session, &self.key, self.create_revision, limit);
            tokio::select! {
                biased;
                () = self.session.lost_or_closed() => Err(Error::SessionLost),
                deleted = delete => deleted,
            }
        };
        match &released {
            Err(error) if error.is_transient() => {}
            // A newer incarnation of an election's key, made by a campaign since gone, may
            // be left: the drop looks for it, if it holds the last claim.
            Err(Error::OwnershipLost) if self.claim.is_some() => self.releasing = false,
            _ => self.release_on_drop = false,
        }
        released
    }

    /// Overwrites the key's value (keeping it on the session's lease) if it is still this
    /// incarnation. The put is also fenced by the key's mod revision as this handle last
    /// saw it, so that an attempt re-sent unanswered whose first copy reaches etcd late
    /// finds the key changed and writes nothing, instead of replacing a newer value.
    ///
    /// Errors: as [`release`](Self::release); [`Error::SessionLost`] as soon as the
    /// session is lost or has ended, even with the put unanswered (its lease is gone, or
    /// going, and the key with it).
    pub(crate) async fn put(&self, value: Vec<u8>) -> Result<()> {
        let written = self.session.until_ended(self.put_while_owned(value));
        written.await.unwrap_or(Err(Error::SessionLost))
    }

    async fn put_while_owned(&self, value: Vec<u8>) -> Result<()> {
        let lease = PutOptions::new().with_lease(self.session.lease_id());
        let put = TxnOp::put(self.key.clone(), value.clone(), Some(lease));
        let kv = self.session.client();
        loop {
            let seen = self.mod_revision.load(Ordering::Relaxed);
            let unchanged = Compare::mod_revision(self.key.clone(), CompareOp::Equal, seen);
            let txn = Txn::new()
                .when([self.ownership_compare(), unchanged])
                .and_then([put.clone()])
                .or_else([TxnOp::get(self.key.clone(), None)]);
            let (answer, _) = retry_write_txn(kv, self.session.request_timeout(), txn).await;
            let answer = answer?;
            if answer.succeeded() {
                let revision = answer.header().map_or(seen, |h| h.revision());
                self.mod_revision.fetch_max(revision, Ordering::Relaxed);
                return Ok(());
            }
            let current = answer.op_responses().into_iter().find_map(|op| match op {
                TxnOpResponse::Get(mut get) => get.take_kvs().into_iter().next(),
                _ => None,
            });
            match current {
                // Written since this handle saw it: by an attempt of this call whose answer
                // was lost, or by another leadership of the session sharing the key.
                Some(now) if now.create_revision() == self.create_revision => {
                    self.mod_revision
                        .fetch_max(now.mod_revision(), Ordering::Relaxed);
                    if now.value() == value.as_slice() {
                        return Ok(());
                    }
                }
                _ => {
                    self.seen_gone.store(true, Ordering::Relaxed);
                    return Err(Error::OwnershipLost);
                }
            }
        }
    }

    /// Whether ownership is known to be gone, without waiting: the session is lost, or
    /// [`lost`](Self::lost) or a fenced put saw this incarnation gone.
    pub(crate) fn is_lost(&self) -> bool {
        self.seen_gone.load(Ordering::Relaxed) || self.session.is_lost()
    }

    /// Resolves once ownership can no longer be assumed: the session is lost, or the key is
    /// deleted or re-created. Also resolves if the key cannot be watched at all (a
    /// permission error), since ownership can then not be confirmed. The watch exists
    /// while the future does, and carries only that key's deletion; once it or a
    /// [`put`](Self::put) saw the incarnation gone, later calls resolve at once.
    pub(crate) async fn lost(&self) {
        if self.seen_gone.load(Ordering::Relaxed) {
            return;
        }
        tokio::select! {
            () = self.session.lost() => {}
            gone = key_gone(&self.session, &self.key, self.create_revision) => {
                self.seen_gone.fetch_or(gone, Ordering::Relaxed);
            }
        }
    }
}

impl Drop for OwnedKey {
    fn drop(&mut self) {
        if self.session.has_ended() {
            return;
        }
        // Not released yet, this key may be an incarnation that the others sharing the
        // claim do not use (made after a resign of theirs): if so, the last of them to go
        // looks for it.
        let leaving = self
            .claim
            .take()
            .map(|claim| claim.leave(self.release_on_drop));
        let last_claim = match leaving {
            None => None, // a mutex's key
            // Another campaign or leadership of the session uses it: it stays, unless this
            // handle was resigning, which ends them all.
            Some(None) if self.releasing && self.release_on_drop => None,
            Some(None) => return,
            Some(Some(last)) => Some(last),
        };
        // A handle that left before this last claim may have left an incarnation that
        // nobody uses (a campaign cancelled after a resign): it is nobody's now.
        let leftover = last_claim.as_ref().is_some_and(LastClaim::leftover);
        // None: released, or seen gone (nothing left to delete).
        let unreleased = self.release_on_drop && !self.seen_gone.load(Ordering::Relaxed);
        let own = unreleased.then_some(self.create_revision);
        if own.is_none() && !leftover {
            return;
        }
        let session = self.session.downgrade();
        let key = std::mem::take(&mut self.key);
        // The next `lock()` or campaign of this session may go once the key is gone.
        let local = self.local.take();
        // For the last claim, `leftover` holds whenever this drop releases its own key:
        // leaving with it unreleased noted one as possible.
        spawn_release(
            self.session.runtime(),
            "releasing a dropped lock guard or leadership",
            async move {
                release_own_and_leftover(session, &key, own, last_claim).await;
                drop(local);
            },
        );
    }
}

/// Deletes incarnation `own` of `key`, if any; then, if `last` is the last claim on an
/// election's key and a handle that shared it may have left another incarnation (a
/// campaign cancelled after a resign ended the one it joined: [`LastClaim::leftover`]),
/// whichever incarnation the session's lease holds, since it is nobody's now. Each delete
/// is retried as [`release_while_session_lives`]; the claim is held until both are done,
/// so that the session's next campaign waits for them.
pub(crate) async fn release_own_and_leftover(
    session: WeakSession,
    key: &[u8],
    own: Option<i64>,
    last: Option<LastClaim>,
) {
    if let Some(revision) = own {
        release_while_session_lives(session.clone(), key, revision).await;
    }
    if last.as_ref().is_some_and(LastClaim::leftover) {
        release_lease_key(session, key).await;
    }
    drop(last);
}

/// Deletes `key` if it still has create revision `revision`, retrying transient failures
/// with back-off for as long as the session lives and keeps its lease. Holds the session
/// only during an attempt, so that dropping its last handle still revokes the lease. A
/// key no longer of that create revision (gone, or re-created) is left as it is.
pub(crate) async fn release_while_session_lives(session: WeakSession, key: &[u8], revision: i64) {
    let release = while_session_lives(&session, |live| async move {
        // Bounded by the release timeout, as the docs of a background release say, not by
        // the (perhaps shorter) request timeout.
        let limit = live.release_timeout();
        match fenced_delete(&live, key, revision, limit).await {
            Ok(()) | Err(Error::OwnershipLost) => Ok(()),
            Err(error) => Err(error),
        }
    });
    release.await;
}

/// Deletes whichever incarnation of `key` the session's lease holds, if any: a key left
/// behind by handles that are gone. The lookup and the delete are each retried for as
/// long as the session lives.
pub(crate) async fn release_lease_key(session: WeakSession, key: &[u8]) {
    if let Some(revision) = lease_key(&session, key).await {
        release_while_session_lives(session, key, revision).await;
    }
}

/// The create revision of `key` if it exists on the session's lease, read (retried as
/// [`release_while_session_lives`]) on the way to releasing it.
async fn lease_key(session: &WeakSession, key: &[u8]) -> Option<i64> {
    let found = while_session_lives(session, |live| async move {
        let lookup = retry(live.client(), "Range", live.release_timeout(), |client| {
            let mut kv = client.kv_client();
            async move { kv.get(key, None).await }
        });
        let answer = lookup.await?;
        let found = answer.kvs().first();
        Ok(found
            .filter(|found| found.lease() == live.lease_id())
            .map(|found| found.create_revision()))
    });
    found.await.flatten()
}

/// Runs `attempt` (which bounds its requests by the session's release timeout) until it
/// succeeds, retrying transient failures with back-off for as long as the session lives and
/// keeps its lease. `None` once the session is gone, has ended or is lost (revoking or
/// expiring its lease deletes its keys, or they are to stay), or if etcd refuses.
async fn while_session_lives<T, F, A>(session: &WeakSession, mut attempt: F) -> Option<T>
where
    F: FnMut(Session) -> A,
    A: Future<Output = Result<T>>,
{
    let mut backoff = Backoff::new();
    let mut warned = false;
    loop {
        let live = session.upgrade()?;
        if live.has_ended() || live.is_lost() {
            return None;
        }
        let error = match attempt(live).await {
            Ok(answer) => return Some(answer),
            Err(error) if !error.is_transient() => {
                tracing::warn!(
                    error = &error as &dyn std::error::Error,
                    "a background release of a lock or election key failed; the key, if it \
                     exists, stays until the session ends"
                );
                return None;
            }
            Err(error) => error,
        };
        if !warned {
            tracing::warn!(
                error = &error as &dyn std::error::Error,
                "a background release of a lock or election key failed; retrying while the \
                 session lives"
            );
            warned = true;
        }
        backoff.wait().await;
    }
}

/// Deletes `key` if it still has create revision `revision`, retrying for up to `limit`.
///
/// Errors: [`Error::OwnershipLost`] if it had not; a refusal after an attempt with unknown
/// outcome counts as done (that attempt may have been the one that deleted it).
async fn fenced_delete(
    session: &Session,
    key: &[u8],
    revision: i64,
    limit: Duration,
) -> Result<()> {
    let txn = Txn::new()
        .when([Compare::create_revision(key, CompareOp::Equal, revision)])
        .and_then([TxnOp::delete(key, None)]);
    let (answer, maybe_applied) = retry_write_txn(session.client(), limit, txn).await;
    if answer?.succeeded() || maybe_applied {
        Ok(())
    } else {
        Err(Error::OwnershipLost)
    }
}

/// Resolves when `key` no longer has create revision `revision` (`true`), or cannot be
/// watched (`false`).
async fn key_gone(session: &Session, key: &[u8], revision: i64) -> bool {
    match until_gone(session.client(), key, revision, 0).await {
        Ok(()) => true,
        Err(error) => {
            tracing::warn!(
                error = &error as &dyn std::error::Error,
                "cannot watch a held key; ownership can no longer be assumed"
            );
            false
        }
    }
}
