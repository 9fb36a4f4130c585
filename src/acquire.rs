//! Joining a lock's or election's queue: one Txn that creates this session's key under the
//! name's prefix (or finds it from an earlier call) and reads the queue in the same revision.
//!
//! The Txn runs in a task of its own, so that it completes even if the caller's future is
//! dropped while it is in flight; the key it created is then deleted (fenced by its create
//! revision). A Txn that failed in transit may still have committed: it is re-sent, and
//! since its condition is false once the key exists, the retry finds the key instead of
//! creating a second one. The same holds when the queue's keys together are over the
//! client's answer limit (4 MiB: long names, or tens of thousands of waiters): etcd applied
//! the Txn but its answer cannot be taken, so a `lock` or `campaign` sends it again
//! without the queue read, and waiting reads the queue itself, in parts.

use std::future::Future;

use etcd_client::{
    Compare, CompareOp, GetOptions, KeyValue, PutOptions, Txn, TxnOp, TxnOpResponse, TxnResponse,
};
use tokio::sync::OwnedMutexGuard;
use tokio::task::JoinHandle;

use crate::error::{Error, Result, is_answer_too_large, is_lease_gone};
use crate::late_join::Owner;
use crate::ownership::{OwnedKey, release_own_and_leftover};
use crate::release::spawn_release;
use crate::retry::retry_write_txn;
use crate::session::{ElectionClaim, Session, prefix_of};
use crate::wait::QueueWatch;

/// When the join Txn creates this session's key.
pub(crate) enum Create {
    /// Unless it exists: join the queue (`lock`, `campaign`).
    IfAbsent,
    /// Only if the queue is empty: take the lock or nothing (`try_lock`).
    IfQueueEmpty,
}

/// What to send.
pub(crate) struct Request {
    /// When the key is created with `value`; otherwise it is only looked up.
    pub(crate) create: Create,
    pub(crate) value: Vec<u8>,
    /// How to read the queue (the name's prefix is added here).
    pub(crate) queue: GetOptions,
    /// The mutex's in-process queue slot, held until the key is released.
    pub(crate) local: Option<OwnedMutexGuard<QueueWatch>>,
    /// The election claim of this call, held until the key is released.
    pub(crate) claim: Option<ElectionClaim>,
}

/// This session's key after the Txn, with the queue as it was at `revision`.
pub(crate) struct Joined {
    pub(crate) key: OwnedKey,
    /// The key's stored value if the Txn found the key rather than created it.
    pub(crate) found_value: Option<Vec<u8>>,
    pub(crate) revision: i64,
    /// The queue read in the same Txn, ordered as `Request::queue` asked; `None` if it
    /// was over the client's answer limit (see the module docs).
    pub(crate) queue: Option<Vec<KeyValue>>,
}

/// Sends the join Txn for `session` under lock or election `name`. `None` if the condition
/// was false and this session had no key: nothing was written (only a
/// [`Create::IfQueueEmpty`] can leave no key).
///
/// Errors: [`Error::SessionLost`] if etcd no longer knows the lease, or the session is
/// lost or ends before the Txn is answered; [`Error::Etcd`] / [`Error::Timeout`] if the
/// Txn failed or got no answer within the request timeout.
///
/// Cancel-safe: see the module docs.
pub(crate) async fn join(
    session: &Session,
    name: &[u8],
    request: Request,
) -> Result<Option<Joined>> {
    let key = session.key_in(name);
    let prefix = prefix_of(name);
    let lease = PutOptions::new().with_lease(session.lease_id());
    let queue = request.queue.with_prefix();
    let condition = match request.create {
        Create::IfAbsent => Compare::create_revision(key.clone(), CompareOp::Equal, 0),
        Create::IfQueueEmpty => {
            Compare::create_revision(prefix.clone(), CompareOp::Equal, 0).with_prefix()
        }
    };
    let read_queue = TxnOp::get(prefix, Some(queue));
    let txn_reading = {
        let (key, value) = (key.clone(), request.value.clone());
        move |queue: &[TxnOp]| {
            let put = TxnOp::put(key.clone(), value.clone(), Some(lease.clone()));
            Txn::new()
                .when([condition.clone()])
                .and_then([&[put], queue].concat())
                .or_else([&[TxnOp::get(key.clone(), None)], queue].concat())
        }
    };
    let txn = txn_reading(&[read_queue]);
    // Only a Txn that may create the key finds it when sent again.
    let may_resend_without_queue = matches!(request.create, Create::IfAbsent);
    let kv = session.shared_client();
    let limit = session.request_timeout();
    let send = session.until_ended(async move {
        let (answer, maybe_late) = retry_write_txn(&kv, limit, txn).await;
        match answer {
            Err(Error::Etcd(error)) if may_resend_without_queue && is_answer_too_large(&error) => {
                tracing::debug!("the queue is over the answer limit; joining without reading it");
                let (answer, late) = retry_write_txn(&kv, limit, txn_reading(&[])).await;
                (answer, maybe_late || late)
            }
            answer => (answer, maybe_late),
        }
    });
    let task = session.runtime().spawn(async move {
        match send.await {
            Some((answer, maybe_late)) => Sending { answer, maybe_late },
            // No use trying further: an attempt cut short may have been applied.
            None => Sending {
                answer: Err(Error::SessionLost),
                maybe_late: true,
            },
        }
    });
    let owner = match request.local {
        Some(_) => Owner::Mutex,
        None => Owner::Election,
    };
    let mut in_flight = InFlight {
        task: Some(task),
        session: session.clone(),
        name: name.to_vec(),
        owner,
        maybe_late: false,
        key: key.clone(),
        local: request.local,
        claim: request.claim,
    };
    let finished = tokio::select! {
        biased;
        finished = in_flight.finish() => finished,
        // The Txn's task runs on the session's runtime, which may not be driven (a
        // current-thread runtime whose `block_on` returned): the session is then lost a TTL
        // later, which this call must not outwait. Dropped, `in_flight` undoes the Txn in
        // the background once that task has run, as for a cancelled call.
        () = session.lost() => return Err(Error::SessionLost),
    };
    let answer = match finished {
        Ok(answer) => answer,
        Err(error) => {
            let sent = outcome_of_failure(in_flight.maybe_late, &error);
            in_flight.undo_in_background(sent);
            return Err(lease_gone_is_session_lost(session, error));
        }
    };
    if in_flight.maybe_late {
        session.sweep_for_late_joins(name, owner);
    }
    let (local, claim) = (in_flight.local.take(), in_flight.claim.take());
    let revision = answer.header().map_or(0, |h| h.revision());
    let (own, queue) = split(&answer);
    let (create_revision, mod_revision, found_value) = if answer.succeeded() {
        (revision, revision, None)
    } else {
        match own {
            Some(kv) => (
                kv.create_revision(),
                kv.mod_revision(),
                Some(kv.value().to_vec()),
            ),
            None => return Ok(None),
        }
    };
    session.note_joined(&key, create_revision);
    let key = OwnedKey::new(
        session.clone(),
        key,
        create_revision,
        mod_revision,
        local,
        claim,
    );
    Ok(Some(Joined {
        key,
        found_value,
        revision,
        queue,
    }))
}

/// The key's own entry (from the else branch) and the queue (if the Txn read it), from a
/// join Txn's answer.
fn split(answer: &TxnResponse) -> (Option<KeyValue>, Option<Vec<KeyValue>>) {
    let mut reads = answer.op_responses().into_iter().filter_map(|op| match op {
        TxnOpResponse::Get(mut get) => Some(get.take_kvs()),
        _ => None,
    });
    if answer.succeeded() {
        (None, reads.next())
    } else {
        let own = reads.next().unwrap_or_default().into_iter().next();
        (own, reads.next())
    }
}

/// The join Txn's answer, and whether an attempt that did not succeed may have been
/// applied: it may then also reach etcd late, after the answer or the error.
struct Sending {
    answer: Result<TxnResponse>,
    maybe_late: bool,
}

/// The join Txn's task, undone if dropped before its answer was taken.
struct InFlight {
    task: Option<JoinHandle<Sending>>,
    session: Session,
    name: Vec<u8>,
    owner: Owner,
    /// Set by `finish`: an attempt that did not succeed may have been applied.
    maybe_late: bool,
    key: Vec<u8>,
    local: Option<OwnedMutexGuard<QueueWatch>>,
    claim: Option<ElectionClaim>,
}

/// What became of a join Txn.
enum Sent {
    Answered(TxnResponse),
    /// Failed in transit: it may or may not have committed.
    Unknown,
    /// Refused: nothing was written. etcd refuses a request for what it is, such as its
    /// size or the caller's permissions, so it refused every attempt; or the lease is
    /// gone, and its keys with it.
    Refused,
    /// No attempt got as far as a raft proposal (the connection was refused, etcd had no
    /// leader or too many requests): nothing was written, and nothing was learnt, so
    /// there is nothing to undo; a look-up would only wait for etcd to be reachable again.
    Unreached,
}

impl InFlight {
    async fn finish(&mut self) -> Result<TxnResponse> {
        let task = self.task.as_mut().expect("finish is called once");
        let sending = task.await;
        self.task = None;
        match sending {
            Ok(sending) => {
                self.maybe_late = sending.maybe_late;
                sending.answer
            }
            Err(join_error) if join_error.is_panic() => {
                std::panic::resume_unwind(join_error.into_panic())
            }
            // Cancelled: the session's runtime shut down, and its keep-alive with it.
            Err(_) => Err(Error::SessionLost),
        }
    }

    /// Deletes, in the background, what the Txn may have left, once its outcome is known;
    /// the in-process slot and election claim are held until then. Nothing is deleted
    /// while another campaign or leadership of the session shares the election's key: it
    /// is theirs (and if this Txn may have made a new incarnation of it, the last of them
    /// to go looks for it). The last claim on it deletes it whatever became of this Txn,
    /// as an earlier holder may have left it to this call.
    ///
    /// A lock's slot is free again before the caller hears of the error if there is
    /// nothing to undo, or if the outcome is unknown: see [`spawn_undo`](Self::spawn_undo).
    fn undo_in_background(&mut self, sent: Sent) {
        let maybe_late = self.maybe_late;
        match (&sent, self.owner) {
            (Sent::Refused | Sent::Unreached, Owner::Mutex) if !maybe_late => self.local = None,
            (Sent::Unknown, Owner::Mutex) => {
                self.session.sweep_for_late_joins(&self.name, self.owner);
                self.local = None;
            }
            _ => self.spawn_undo(async move { (sent, maybe_late) }),
        }
    }

    /// As [`undo_in_background`](Self::undo_in_background), for the outcome `sent` gives
    /// with whether an attempt that did not succeed may have been applied. If so, or if
    /// the outcome is unknown, the session then sweeps for the key of an attempt delivered
    /// late. A lock key of unknown fate is left to that sweep, which deletes it unless a
    /// later call of the session takes it up: the slot is freed at once, so that the next
    /// call asks etcd instead of waiting for a look-up that lasts as long as a partition.
    fn spawn_undo(&mut self, sent: impl Future<Output = (Sent, bool)> + Send + 'static) {
        let (session, key) = (self.session.downgrade(), self.key.clone());
        let (name, owner) = (self.name.clone(), self.owner);
        let (local, claim) = (self.local.take(), self.claim.take());
        spawn_release(
            self.session.runtime(),
            "undoing a cancelled or failed lock or campaign",
            async move {
                let (sent, maybe_late) = sent.await;
                if maybe_late || matches!(sent, Sent::Unknown) {
                    if let Some(live) = session.upgrade() {
                        live.sweep_for_late_joins(&name, owner);
                    }
                }
                // Any outcome but one that never reached etcd may have created a key.
                let may_have_left_key = !matches!(sent, Sent::Unreached);
                let left = left_behind(sent);
                if matches!((owner, &left), (Owner::Mutex, Left::Unknown)) {
                    return;
                }
                // The claim is given up only now, with the outcome known: a key this Txn
                // created after the others' key was deleted is then left to the last of
                // them, if they are still there. Any outcome that reached etcd may have
                // created one: a key found may be this very call's, from an attempt whose
                // answer was lost. One that did not leaves nothing to look up (a look-up
                // would hold the next campaign until etcd answers), unless an earlier
                // holder left a key to this call.
                let last_claim = match claim {
                    None => None,
                    Some(claim) => match claim.leave(may_have_left_key) {
                        None => return,
                        last => last,
                    },
                };
                // Whatever became of this Txn if it reached etcd, leaving noted that this
                // call may have left a key to the last claim, as an earlier holder may have.
                let own = match left {
                    Left::Key(revision) => Some(revision),
                    _ => None,
                };
                release_own_and_leftover(session, &key, own, last_claim).await;
                drop(local);
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
            // The join Txn is bounded by the request timeout: wait for its outcome.
            self.spawn_undo(async move {
                match task.await {
                    Ok(Sending { answer, maybe_late }) => match answer {
                        Ok(answer) => (Sent::Answered(answer), maybe_late),
                        Err(error) => (outcome_of_failure(maybe_late, &error), maybe_late),
                    },
                    Err(_) => (Sent::Unknown, true),
                }
            });
        }
    }
}

/// What became of a join Txn that failed, given whether an attempt may have been applied:
/// if none may (etcd refused it for what it is, or every attempt certainly went
/// unapplied: connection refused, no leader), nothing was written.
fn outcome_of_failure(maybe_applied: bool, error: &Error) -> Sent {
    match maybe_applied {
        true => Sent::Unknown,
        // Transient, yet no attempt may have applied: each one was turned away before
        // etcd proposed it (an answer that came, or a timeout, would make it unknown).
        false if error.is_transient() => Sent::Unreached,
        false => Sent::Refused,
    }
}

/// What a join Txn left behind for a caller that is gone or failed.
enum Left {
    /// The key it created or found, by create revision (a found key that no other handle
    /// of the session uses is a leftover, from an earlier attempt of this very call whose
    /// answer was lost or from an earlier process on the same lease).
    Key(i64),
    /// The outcome is unknown: the key of this lease, if there is one.
    Unknown,
    /// Nothing: the Txn was refused, or found no key and created none.
    Nothing,
}

fn left_behind(sent: Sent) -> Left {
    match sent {
        Sent::Answered(answer) if answer.succeeded() => answer
            .header()
            .map_or(Left::Unknown, |header| Left::Key(header.revision())),
        Sent::Answered(answer) => split(&answer)
            .0
            .map_or(Left::Nothing, |own| Left::Key(own.create_revision())),
        Sent::Unknown => Left::Unknown,
        Sent::Refused | Sent::Unreached => Left::Nothing,
    }
}

/// A Put on a lease etcd no longer knows fails with "requested lease not found": that is a
/// lost session, and the session is told so.
fn lease_gone_is_session_lost(session: &Session, error: Error) -> Error {
    match &error {
        Error::Etcd(etcd) if is_lease_gone(etcd) => {
            session.mark_lost();
            Error::SessionLost
        }
        _ => error,
    }
}
