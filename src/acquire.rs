//! Joining a lock's or election's queue: one Txn that creates this session's key under the
//! name's prefix (or finds it from an earlier call) and reads the queue in the same revision.
//!
//! The Txn runs in a task of its own, so that it completes even if the caller's future is
//! dropped while it is in flight; the key it created is then deleted (fenced by its create
//! revision). A Txn that failed in transit may still have committed: it is re-sent, and
//! since its condition is false once the key exists, the retry finds the key instead of
//! creating a second one.

use std::future::Future;

use etcd_client::{
    Compare, CompareOp, GetOptions, KeyValue, PutOptions, Txn, TxnOp, TxnOpResponse, TxnResponse,
};
use tokio::sync::OwnedMutexGuard;
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use crate::ownership::{OwnedKey, fenced_delete};
use crate::release::spawn_release;
use crate::retry::retry;
use crate::session::{Session, prefix_of};
use crate::wait::QueueWatch;

/// What to send.
pub(crate) struct Request {
    /// When true, the key is created with `value`; otherwise it is only looked up.
    pub(crate) condition: Compare,
    pub(crate) value: Vec<u8>,
    /// How to read the queue (the name's prefix is added here).
    pub(crate) queue: GetOptions,
    /// Whether a call dropped mid-flight also deletes a key it found rather than created.
    /// A mutex's key belongs to one `lock()` at a time, so yes; an election's key may be
    /// shared with a live `Leadership` of the same session, so no.
    pub(crate) release_found: bool,
    /// The mutex's in-process queue slot, held until the key is released.
    pub(crate) local: Option<OwnedMutexGuard<QueueWatch>>,
}

/// This session's key after the Txn, with the queue as it was at `revision`.
pub(crate) struct Joined {
    pub(crate) key: OwnedKey,
    pub(crate) created: bool,
    /// The key's value: the one sent if created, the stored one if found.
    pub(crate) value: Vec<u8>,
    pub(crate) revision: i64,
    /// The queue read in the same Txn, ordered as `Request::queue` asked.
    pub(crate) queue: Vec<KeyValue>,
}

/// The Txn's outcome.
pub(crate) enum Outcome {
    Joined(Joined),
    /// The condition was false and this session had no key: nothing was written.
    NotJoined,
}

/// Sends the join Txn for `session` under lock or election `name`.
///
/// Errors: [`Error::SessionLost`] if etcd no longer knows the lease; [`Error::Etcd`] /
/// [`Error::Timeout`] if the Txn failed or got no answer within the request timeout.
///
/// Cancel-safe: see the module docs.
pub(crate) async fn join(session: &Session, name: &[u8], request: Request) -> Result<Outcome> {
    let key = session.key_in(name);
    let prefix = prefix_of(name);
    let lease = PutOptions::new().with_lease(session.lease_id());
    let queue = request.queue.with_prefix();
    let txn = Txn::new()
        .when([request.condition])
        .and_then([
            TxnOp::put(key.clone(), request.value.clone(), Some(lease)),
            TxnOp::get(prefix.clone(), Some(queue.clone())),
        ])
        .or_else([
            TxnOp::get(key.clone(), None),
            TxnOp::get(prefix, Some(queue)),
        ]);
    let kv = session.client().kv_client();
    let limit = session.request_timeout();
    let task = session.runtime().spawn(async move {
        retry(&kv, limit, |mut kv| {
            let txn = txn.clone();
            async move { kv.txn(txn).await }
        })
        .await
    });
    let mut in_flight = InFlight {
        task: Some(task),
        session: session.clone(),
        key: key.clone(),
        release_found: request.release_found,
        local: request.local,
    };
    let answer = match in_flight.finish().await {
        Ok(answer) => answer,
        Err(error) => {
            if error.is_transient() {
                in_flight.undo_in_background(Sent::Unknown);
            }
            return Err(lease_gone_is_session_lost(session, error));
        }
    };
    let local = in_flight.local.take();
    let revision = answer.header().map_or(0, |h| h.revision());
    let (own, queue) = split(&answer);
    let (create_revision, value, created) = if answer.succeeded() {
        (revision, request.value, true)
    } else {
        match own {
            Some(kv) => (kv.create_revision(), kv.value().to_vec(), false),
            None => return Ok(Outcome::NotJoined),
        }
    };
    Ok(Outcome::Joined(Joined {
        key: OwnedKey::new(session.clone(), key, create_revision, local),
        created,
        value,
        revision,
        queue,
    }))
}

/// The key's own entry (from the else branch) and the queue, from a join Txn's answer.
fn split(answer: &TxnResponse) -> (Option<KeyValue>, Vec<KeyValue>) {
    let mut reads = answer.op_responses().into_iter().filter_map(|op| match op {
        TxnOpResponse::Get(mut get) => Some(get.take_kvs()),
        _ => None,
    });
    if answer.succeeded() {
        (None, reads.next().unwrap_or_default())
    } else {
        let own = reads.next().unwrap_or_default().into_iter().next();
        (own, reads.next().unwrap_or_default())
    }
}

/// The join Txn's task, undone if dropped before its answer was taken.
struct InFlight {
    task: Option<JoinHandle<Result<TxnResponse>>>,
    session: Session,
    key: Vec<u8>,
    release_found: bool,
    local: Option<OwnedMutexGuard<QueueWatch>>,
}

/// What became of a join Txn.
enum Sent {
    Answered(TxnResponse),
    /// Failed in transit: it may or may not have committed.
    Unknown,
    /// Refused by etcd: nothing was written.
    Refused,
}

impl InFlight {
    async fn finish(&mut self) -> Result<TxnResponse> {
        let task = self.task.as_mut().expect("finish is called once");
        let answer = task.await;
        self.task = None;
        match answer {
            Ok(answer) => answer,
            Err(join_error) => std::panic::resume_unwind(join_error.into_panic()),
        }
    }

    /// Deletes, in the background, what the Txn may have left; the in-process lock is
    /// held until then.
    fn undo_in_background(&mut self, sent: Sent) {
        self.spawn_undo(async move { sent });
    }

    fn spawn_undo(&mut self, sent: impl Future<Output = Sent> + Send + 'static) {
        let (session, key) = (self.session.clone(), self.key.clone());
        let release_found = self.release_found;
        let local = self.local.take();
        spawn_release(
            self.session.runtime(),
            self.session.release_timeout(),
            "undoing a cancelled or failed lock or campaign",
            async move {
                let undone = undo(&session, &key, sent.await, release_found).await;
                drop(local);
                undone
            },
        );
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.session.has_ended() {
            return; // nothing to undo: the lease was revoked, or its keys are to stay
        }
        if let Some(task) = self.task.take() {
            self.spawn_undo(async move {
                match task.await {
                    Ok(Ok(answer)) => Sent::Answered(answer),
                    Ok(Err(error)) if error.is_transient() => Sent::Unknown,
                    _ => Sent::Refused,
                }
            });
        }
    }
}

/// Deletes what a join Txn left behind for a caller that is gone or failed: the key it
/// created, the key it found if `release_found`, and, after an unknown outcome and if
/// `release_found`, whatever key of this lease is there.
async fn undo(session: &Session, key: &[u8], sent: Sent, release_found: bool) -> Result<()> {
    let revision = match sent {
        Sent::Answered(answer) if answer.succeeded() => answer.header().map_or(0, |h| h.revision()),
        Sent::Answered(answer) => match split(&answer).0 {
            Some(kv) if release_found => kv.create_revision(),
            _ => return Ok(()),
        },
        Sent::Unknown if release_found => {
            let delete_if_ours = Txn::new()
                .when([Compare::lease(key, CompareOp::Equal, session.lease_id())])
                .and_then([TxnOp::delete(key, None)]);
            let limit = session.request_timeout();
            return retry(&session.client().kv_client(), limit, |mut kv| {
                let txn = delete_if_ours.clone();
                async move { kv.txn(txn).await }
            })
            .await
            .map(drop);
        }
        Sent::Unknown | Sent::Refused => return Ok(()),
    };
    match fenced_delete(session, key, revision).await {
        Err(Error::OwnershipLost) => Ok(()),
        other => other,
    }
}

/// A Put on a lease etcd no longer knows fails with "requested lease not found": that is a
/// lost session, and the session is told so.
fn lease_gone_is_session_lost(session: &Session, error: Error) -> Error {
    match &error {
        Error::Etcd(etcd_client::Error::GRpcStatus(status))
            if status.code() == tonic::Code::NotFound && status.message().contains("lease") =>
        {
            session.mark_lost();
            Error::SessionLost
        }
        _ => error,
    }
}
