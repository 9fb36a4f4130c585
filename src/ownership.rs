//! A key this session holds in a lock's or election's queue: fenced operations on it, loss
//! detection, and its release when dropped.

use etcd_client::{Compare, CompareOp, EventType, GetOptions, PutOptions, Txn, TxnOp};
use tokio::sync::OwnedMutexGuard;

use crate::error::{Error, Result};
use crate::release::spawn_release;
use crate::retry::retry;
use crate::session::Session;
use crate::wait::QueueWatch;
use crate::watcher::{Follower, Update};

/// This session's key in a queue, identified by its create revision (the fencing token).
///
/// Every write to the key is fenced: it applies only while the key still has that create
/// revision, so a stale handle never deletes or overwrites a newer incarnation of the key
/// (etcd #22082). Dropped without [`release`](Self::release), it deletes the key in a
/// background task with the session's release timeout, unless the session has ended
/// (closed: the key went with the lease; orphaned: it stays until the lease expires).
pub(crate) struct OwnedKey {
    session: Session,
    key: Vec<u8>,
    create_revision: i64,
    release_on_drop: bool,
    /// Held until the key is deleted: the in-process slot of a mutex's queue, if any.
    local: Option<OwnedMutexGuard<QueueWatch>>,
}

impl OwnedKey {
    pub(crate) fn new(
        session: Session,
        key: Vec<u8>,
        create_revision: i64,
        local: Option<OwnedMutexGuard<QueueWatch>>,
    ) -> OwnedKey {
        OwnedKey {
            session,
            key,
            create_revision,
            release_on_drop: true,
            local,
        }
    }

    /// Whether dropping this handle deletes the key (default: yes).
    pub(crate) fn set_release_on_drop(&mut self, release: bool) {
        self.release_on_drop = release;
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
    /// Errors: [`Error::OwnershipLost`] if it was not (deleted or re-created meanwhile);
    /// [`Error::Etcd`] / [`Error::Timeout`] if etcd could not be reached.
    pub(crate) async fn release(mut self) -> Result<()> {
        self.release_on_drop = false;
        fenced_delete(&self.session, &self.key, self.create_revision).await
    }

    /// Overwrites the key's value (keeping it on the session's lease) if it is still this
    /// incarnation.
    ///
    /// Errors: as [`release`](Self::release).
    pub(crate) async fn put(&self, value: Vec<u8>) -> Result<()> {
        let lease = PutOptions::new().with_lease(self.session.lease_id());
        let put = TxnOp::put(self.key.clone(), value, Some(lease));
        match fenced(&self.session, &self.key, self.create_revision, put).await? {
            Fenced::Applied => Ok(()),
            Fenced::Refused | Fenced::RefusedAfterRetry => Err(Error::OwnershipLost),
        }
    }

    /// Resolves once ownership can no longer be assumed: the session is lost, or the key is
    /// deleted or re-created. Also resolves if the key cannot be watched at all (a
    /// permission error), since ownership can then not be confirmed.
    pub(crate) async fn lost(&self) {
        tokio::select! {
            () = self.session.lost() => {}
            () = key_gone(&self.session, &self.key, self.create_revision) => {}
        }
    }
}

impl Drop for OwnedKey {
    fn drop(&mut self) {
        if !self.release_on_drop || self.session.has_ended() {
            return;
        }
        let session = self.session.clone();
        let key = std::mem::take(&mut self.key);
        let revision = self.create_revision;
        let local = self.local.take();
        spawn_release(
            self.session.runtime(),
            self.session.release_timeout(),
            "releasing a dropped lock guard or leadership",
            async move {
                let released = fenced_delete(&session, &key, revision).await;
                drop(local); // the next local `lock()` may go once the key is gone
                match released {
                    Err(Error::OwnershipLost) => Ok(()), // already gone: nothing to release
                    other => other,
                }
            },
        );
    }
}

/// The outcome of a fenced write.
pub(crate) enum Fenced {
    Applied,
    /// The key was not this incarnation.
    Refused,
    /// Refused, but an earlier attempt's outcome is unknown and may have applied.
    RefusedAfterRetry,
}

/// Applies `op` if `key` still has create revision `revision`, retrying transient failures.
pub(crate) async fn fenced(
    session: &Session,
    key: &[u8],
    revision: i64,
    op: TxnOp,
) -> Result<Fenced> {
    let txn = Txn::new()
        .when([Compare::create_revision(key, CompareOp::Equal, revision)])
        .and_then([op]);
    let mut attempts = 0;
    let kv = session.client().kv_client();
    let answer = retry(&kv, session.request_timeout(), |mut kv| {
        attempts += 1;
        let txn = txn.clone();
        async move { kv.txn(txn).await }
    })
    .await?;
    Ok(match (answer.succeeded(), attempts) {
        (true, _) => Fenced::Applied,
        (false, 1) => Fenced::Refused,
        (false, _) => Fenced::RefusedAfterRetry,
    })
}

/// Deletes `key` if it still has create revision `revision`.
///
/// Errors: [`Error::OwnershipLost`] if it had not; a refusal after an attempt with unknown
/// outcome counts as done (that attempt may have been the one that deleted it).
pub(crate) async fn fenced_delete(session: &Session, key: &[u8], revision: i64) -> Result<()> {
    match fenced(session, key, revision, TxnOp::delete(key, None)).await? {
        Fenced::Applied | Fenced::RefusedAfterRetry => Ok(()),
        Fenced::Refused => Err(Error::OwnershipLost),
    }
}

/// Resolves when `key` no longer has create revision `revision`.
async fn key_gone(session: &Session, key: &[u8], revision: i64) {
    let read = GetOptions::new().with_keys_only();
    let mut follower = Follower::new(session.client().clone(), key.to_vec(), false, read, 0);
    loop {
        match follower.next().await {
            Ok(Update::Snapshot { kvs, .. }) => {
                if kvs.first().map(|kv| kv.create_revision()) != Some(revision) {
                    return;
                }
            }
            Ok(Update::Events(events)) => {
                let gone = events.iter().any(|event| {
                    event.event_type() == EventType::Delete
                        || event.kv().map(|kv| kv.create_revision()) != Some(revision)
                });
                if gone {
                    return;
                }
            }
            Err(error) => {
                tracing::warn!(
                    error = &error as &dyn std::error::Error,
                    "cannot watch a held key; ownership can no longer be assumed"
                );
                return;
            }
        }
    }
}
