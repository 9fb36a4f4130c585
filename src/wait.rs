//! The waiting primitive shared by the mutex and the election: wait until every key created
//! before mine under the prefix is gone, or mine is gone.
//!
//! The whole queue ahead is known from the join Txn, and one watch on the prefix keeps it
//! current: a release reaches the next waiter as one watch event, with no request per
//! hand-off (one read follows the opening of the watch, which shows a write that raced the
//! watch's registration: see [`Follower::reading_after_open`]). (Go re-reads the queue
//! after every deletion of its predecessor, and its watch starts in the past, so a hand-off
//! to a waiter that just queued also waits for etcd's 100 ms unsynced-watch catch-up). A
//! waiter far back in a long queue follows a single key instead until it moves up
//! ([`far_back`]), so that each release reaches a bounded number of waiters. Watching the
//! whole prefix also shows the waiter's own key: if it is deleted (the lease expired or was
//! revoked, or someone deleted it), waiting fails at once instead of granting a lock or
//! leadership that no longer exists (etcd #11456). The watch carries deletions only: the
//! puts under the prefix are later joins, which queue behind the waiter, and proclaimed
//! values, neither of which moves its turn. With them, etcd sent every waiter two events
//! per hand-off (the release and the releaser's next join) instead of one; leaving them out
//! made contended hand-offs about 10% faster on three members.
//!
//! A mutex keeps its watch open between `lock()` calls ([`QueueWatch`]): creating a watch
//! while the queue is busy races with writes in etcd (it reads its current revision before
//! registering the watch, and a write in between puts the watch on the 100 ms unsynced
//! path), which delayed about 6% of contended hand-offs by 100 ms when every `lock()`
//! opened its own. Between calls the watch is read by a small task and its events
//! dropped: left unread, a busy queue's events would pile up until h2 closed the whole
//! connection. The next `lock()` takes it back, and reads the queue again if the task
//! dropped events it needs.

mod far_back;

use std::borrow::Cow;
use std::collections::HashSet;
use std::time::Duration;

use etcd_client::{Event, GetOptions, KeyValue};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use self::far_back::{Moved, key_to_follow, until_moved};
use crate::acquire::Joined;
use crate::error::{Error, Result};
use crate::ownership::OwnedKey;
use crate::session::{Session, prefix_of};
use crate::watcher::{Follower, Update};

/// How long a kept queue watch that nobody waits on stays open: long enough for a session
/// that takes a busy lock again and again to keep it, not for as long as a handle lives (a
/// watch stream, a task, a progress request every 5 s, and every release on the queue
/// sent to it, per name).
const KEPT_IDLE: Duration = Duration::from_secs(15);
/// How many deletions (releases, and waiters that gave up) a kept queue watch hears before
/// it closes: each costs etcd an event that nobody uses until the session locks again (a
/// queue drained by sessions that lock once and keep their handles sent each release to
/// every one of them), and a session that comes back later than that opens a watch again.
const KEPT_FOR_RELEASES: usize = 16;

/// The in-process slot of a lock's queue for one session: it serialises that session's
/// `lock()` calls (which share one key in etcd), and keeps the queue's watch open, and
/// read, between them.
#[derive(Default)]
pub(crate) struct QueueWatch {
    parked: Option<Parked>,
}

/// A follower read by a task until it is wanted back.
struct Parked {
    stop: oneshot::Sender<()>,
    task: JoinHandle<Option<Follower>>,
}

impl QueueWatch {
    /// The kept follower, taken back from the task that reads it, if there is one.
    async fn take(&mut self) -> Option<Follower> {
        let parked = self.parked.take()?;
        let _ = parked.stop.send(());
        parked.task.await.ok().flatten()
    }

    /// Keeps `follower` open and read until the next [`take`](Self::take), or until
    /// `session` ends (lost, closed or orphaned: no later call of it needs the watch). Its
    /// watch closes sooner: once unused for [`KEPT_IDLE`], or after [`KEPT_FOR_RELEASES`]
    /// deletions.
    fn park(&mut self, follower: Follower, session: &Session) {
        let (stop, stopped) = oneshot::channel();
        let kept = session.until_ended(follower.drain(stopped, KEPT_IDLE, KEPT_FOR_RELEASES));
        let task = session.runtime().spawn(async move { kept.await.flatten() });
        self.parked = Some(Parked { stop, task });
    }
}

impl Drop for QueueWatch {
    fn drop(&mut self) {
        if let Some(parked) = self.parked.take() {
            parked.task.abort();
        }
    }
}

/// Waits until no key under `name/` created before the `joined` key remains, and checks
/// that the session still lives then: no guard or leadership is given for a lease that
/// is gone.
///
/// Errors: [`Error::SessionLost`] when the session is lost or the key vanished with its
/// lease; [`Error::OwnershipLost`] when the key was deleted while the lease lives;
/// non-transient etcd errors from watching.
///
/// Cancel-safe: dropping the future stops waiting and closes the watch (a mutex's next
/// `lock()` opens another); the key is untouched.
pub(crate) async fn wait_for_turn(joined: &mut Joined, name: &[u8]) -> Result<()> {
    let queue = joined.queue.as_deref();
    wait_behind(&mut joined.key, name, queue, joined.revision).await?;
    if joined.key.session().is_lost() {
        return Err(Error::SessionLost);
    }
    Ok(())
}

/// Waits until no key under `name/` created before `mine` remains, given the `queue`
/// under that prefix as read at `revision` (`None`: too large to read with the join, so
/// the watch's first update reads it, in parts).
/// `mine`'s [`QueueWatch`], if it has one, lends its watch.
async fn wait_behind(
    mine: &mut OwnedKey,
    name: &[u8],
    queue: Option<&[KeyValue]>,
    revision: i64,
) -> Result<()> {
    let token = mine.create_revision();
    let session = mine.session().clone();
    let mut known = queue.map(|queue| (Cow::Borrowed(queue), revision));
    loop {
        let far_back = known.as_ref().and_then(|(queue, revision)| {
            key_to_follow(queue, token).map(|(target, created)| (target, created, *revision))
        });
        if let Some((target, created, revision)) = far_back {
            let mine = (mine.key(), token);
            match until_moved(&session, (&target, created), mine, revision).await? {
                Moved::Up => known = None,
                Moved::MineGone => return Err(why_gone(&session).await),
            }
        }
        match follow_near(mine, &session, name, token, known.take()).await {
            Ok(()) => return Ok(()),
            Err(FarBack { queue, revision }) => known = Some((Cow::Owned(queue), revision)),
            Err(Gone) => return Err(why_gone(&session).await),
            Err(Failed(error)) => return Err(error),
        }
    }
}

/// Follows the whole queue ahead of `mine` (create revision `token`), known as `known`
/// (the queue and the revision it was read at) or read first, until its turn, unless
/// that read finds it far back.
async fn follow_near(
    mine: &mut OwnedKey,
    session: &Session,
    name: &[u8],
    token: i64,
    known: Option<(Cow<'_, [KeyValue]>, i64)>,
) -> Result<(), NotMyTurn> {
    let ahead = known.as_ref().map(|(queue, _)| keys_before(queue, token));
    if ahead.as_ref().is_some_and(HashSet::is_empty) {
        return Ok(());
    }
    // A view as of revision 0 starts with a snapshot.
    let revision = known.map_or(0, |(_, revision)| revision);
    let read = GetOptions::new()
        .with_keys_only()
        .with_max_create_revision(token);
    // The kept watch is read by a task on the session's runtime, which may not be driven
    // (see `Session`): once the session is lost, waiting for it is pointless.
    let kept = match mine.queue_watch() {
        Some(queue_watch) => tokio::select! {
            biased;
            kept = queue_watch.take() => kept,
            () = session.lost() => return Err(Failed(Error::SessionLost)),
        },
        None => None,
    };
    let mut follower = match kept {
        Some(mut follower) => {
            follower.restart_view(read, revision);
            follower
        }
        None => Follower::new(
            session.client().clone(),
            prefix_of(name),
            true,
            read,
            revision,
        )
        .deletes_only()
        .reading_after_open(),
    };
    let key = mine.key().to_vec();
    let waited = follow_until_turn(&mut follower, session, &key, token, ahead).await;
    // Far back, it would hear of every release while it waits for its turn to come near.
    if !matches!(waited, Err(FarBack { .. })) {
        if let Some(queue_watch) = mine.queue_watch() {
            queue_watch.park(follower, session);
        }
    }
    waited
}

/// Why waiting ended without the turn.
enum NotMyTurn {
    /// The waiter's own key was deleted.
    Gone,
    /// The session was lost, or etcd refused the watch.
    Failed(Error),
    /// The queue, read at `revision`, has the waiter far back.
    FarBack { queue: Vec<KeyValue>, revision: i64 },
}
use NotMyTurn::{Failed, FarBack, Gone};

/// Applies the queue's deletions until nothing is `ahead` of the key with create revision
/// `token` (`None`: not known until the follower's first snapshot).
async fn follow_until_turn(
    follower: &mut Follower,
    session: &Session,
    key: &[u8],
    token: i64,
    mut ahead: Option<HashSet<Vec<u8>>>,
) -> Result<(), NotMyTurn> {
    loop {
        let update = tokio::select! {
            () = session.lost() => return Err(Failed(Error::SessionLost)),
            update = follower.next() => update.map_err(Failed)?,
        };
        let still_mine = match update {
            Update::Snapshot { kvs, revision } => {
                let still_mine = kvs
                    .iter()
                    .any(|kv| kv.key() == key && kv.create_revision() == token);
                if still_mine && key_to_follow(&kvs, token).is_some() {
                    return Err(FarBack {
                        queue: kvs,
                        revision,
                    });
                }
                ahead = Some(keys_before(&kvs, token));
                still_mine
            }
            Update::Events(deletions) => {
                let mut still_mine = true;
                for kv in deletions.iter().filter_map(Event::kv) {
                    if let Some(ahead) = ahead.as_mut() {
                        ahead.remove(kv.key());
                    }
                    still_mine &= kv.key() != key;
                }
                still_mine
            }
        };
        if !still_mine {
            return Err(Gone);
        }
        if ahead.as_ref().is_some_and(HashSet::is_empty) {
            return Ok(());
        }
    }
}

/// The keys in `queue` created before `token`.
fn keys_before(queue: &[KeyValue], token: i64) -> HashSet<Vec<u8>> {
    queue
        .iter()
        .filter(|kv| kv.create_revision() < token)
        .map(|kv| kv.key().to_vec())
        .collect()
}

/// Why a key of `session`'s that a call was using vanished: its lease ended (then the
/// session is marked lost), or someone deleted the key. The session being lost meanwhile
/// answers it too, so that a check that gets no answer (with an unbounded request
/// timeout, a partition) holds the caller no longer than that.
pub(crate) async fn why_gone(session: &Session) -> Error {
    tracing::debug!("a waiting key vanished; asking etcd whether the lease lives");
    let Some(checked) = session.until_ended(session.check_lease()).await else {
        return Error::SessionLost;
    };
    match checked {
        Ok(true) => Error::OwnershipLost,
        Ok(false) => Error::SessionLost,
        Err(error) => {
            tracing::debug!(%error, "cannot tell why a waiting key vanished");
            Error::OwnershipLost
        }
    }
}
