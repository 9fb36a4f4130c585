//! Join attempts delivered late. A join Txn that went unanswered is sent again, and one
//! whose outcome is unknown is undone by looking its key up (a lock's is left to the sweep
//! below, which deletes it unless a later call takes it up); but the first attempt may only
//! have been held up (a stalled link that heals, a paused member that resumes) and reach
//! etcd after the key was released or looked up. Its condition then holds again and it
//! creates the key anew, for nobody: a holder or candidate that blocks everyone else while
//! the session lives.
//!
//! Such an attempt may come at any time while the lease lives, so after such a join the
//! session remembers the key for as long as it lives, and sweeps: it lists the keys on its
//! lease (one LeaseTimeToLive request, however many keys it remembers) within
//! [`SWEEP_FIRST`] of each such join, then at intervals doubling up to [`SWEEP_MAX`], and
//! deletes every incarnation of a remembered key that no handle of it uses (one keys-only
//! Range for each remembered key found on the lease). One task for the whole session, not
//! a watch per key: a long-lived session whose lock names vary would otherwise gain a
//! watch stream and its tasks for each name that ever saw a join sent again. Where etcd
//! will not list the lease's keys (their names take more than the client's 4 MiB answer
//! limit, or, with auth, etcd 3.4.26+ and 3.5.9+ refuse a user that may not read them
//! all), a sweep reads every remembered key instead.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, GetOptions, LeaseTimeToLiveOptions};
use tokio::sync::Notify;
use tokio::task::AbortHandle;

use crate::error::Result;
use crate::ownership::{release_lease_key, release_while_session_lives};
use crate::retry::{Backoff, retry};
use crate::session::{Session, WeakSession};

/// The first sweep after a join that may be delivered late comes within this.
const SWEEP_FIRST: Duration = Duration::from_millis(250);
/// Sweeps come at most this far apart: the longest a late incarnation stays.
const SWEEP_MAX: Duration = Duration::from_secs(10);
/// How many of a remembered key's joined incarnations are remembered.
const JOINED_REMEMBERED: usize = 16;

/// What the remembered key belongs to: the in-process slot that says whether a handle of
/// the session uses it.
#[derive(Clone, Copy)]
pub(crate) enum Owner {
    Mutex,
    Election,
}

/// A session's keys that join attempts delivered late may make, and its sweeper.
#[derive(Default)]
pub(crate) struct LateJoins {
    keys: HashMap<Vec<u8>, Remembered>,
    sweeper: Option<Sweeper>,
}

/// One key of the session in a lock or election that a late join attempt may make.
struct Remembered {
    name: Vec<u8>,
    owner: Owner,
    /// The create revisions of the key's latest incarnations that a join of the session
    /// took up (created, or found): theirs, not late ones.
    joined: VecDeque<i64>,
    /// The incarnation the last sweep found and left, waiting for a handle to let go.
    suspect: Option<Suspect>,
}

struct Sweeper {
    task: AbortHandle,
    /// Asks for a sweep now, with the intervals starting over.
    soon: Arc<Notify>,
}

impl LateJoins {
    /// Stops the sweeper (the session is dropped).
    pub(crate) fn stop(&mut self) {
        if let Some(sweeper) = self.sweeper.take() {
            sweeper.task.abort();
        }
    }
}

impl Session {
    /// Remembers this session's key in lock or election `name` as one a late join attempt
    /// may make, and sweeps for it soon, then until the session is lost, closed, orphaned
    /// or dropped.
    pub(crate) fn sweep_for_late_joins(&self, name: &[u8], owner: Owner) {
        let key = self.key_in(name);
        let mut late = self.late_joins();
        late.keys.entry(key).or_insert_with(|| Remembered {
            name: name.to_vec(),
            owner,
            joined: VecDeque::new(),
            suspect: None,
        });
        match &late.sweeper {
            Some(sweeper) => sweeper.soon.notify_one(),
            None => {
                let soon = Arc::new(Notify::new());
                let task = self.runtime().spawn(sweep(self.downgrade(), soon.clone()));
                let task = task.abort_handle();
                late.sweeper = Some(Sweeper { task, soon });
            }
        }
    }

    /// Notes that a join of this session took up incarnation `revision` of `key`, if
    /// that key is remembered.
    pub(crate) fn note_joined(&self, key: &[u8], revision: i64) {
        if let Some(remembered) = self.late_joins().keys.get_mut(key) {
            if remembered.joined.len() == JOINED_REMEMBERED {
                remembered.joined.pop_front();
            }
            remembered.joined.push_back(revision);
        }
    }

    /// Whether a join of this session took up incarnation `revision` of remembered `key`.
    fn was_joined(&self, key: &[u8], revision: i64) -> bool {
        self.late_joins()
            .keys
            .get(key)
            .is_some_and(|remembered| remembered.joined.contains(&revision))
    }
}

/// An incarnation of a remembered key that no join of the session noted (yet).
struct Suspect {
    revision: i64,
    /// Election only: the campaigns and leaderships holding the claim were told of it.
    told: bool,
}

/// Sweeps until the session ends or is dropped: within [`SWEEP_FIRST`] of being asked
/// to, then at intervals doubling up to [`SWEEP_MAX`] (jittered).
async fn sweep(session: WeakSession, soon: Arc<Notify>) {
    let Some((client, mut ended)) = session
        .upgrade()
        .map(|live| (live.client().clone(), live.ended_signal()))
    else {
        return;
    };
    let first_pace = || Backoff::with_steps(SWEEP_FIRST, SWEEP_MAX);
    let mut pace = first_pace();
    loop {
        tokio::select! {
            biased;
            () = ended.wait() => return,
            () = soon.notified() => pace = first_pace(),
            () = tokio::time::sleep(pace.next_delay()) => {}
        }
        let swept = tokio::select! {
            biased;
            () = ended.wait() => return,
            swept = sweep_once(&session, &client) => swept,
        };
        match swept {
            Ok(()) => {}
            Err(error) if error.is_transient() => tracing::debug!(
                error = &error as &dyn std::error::Error,
                "sweeping for keys of late joins failed; trying again later"
            ),
            Err(error) => tracing::warn!(
                error = &error as &dyn std::error::Error,
                "sweeping for keys of late joins failed; a late one would stay until it works"
            ),
        }
    }
}

/// Lists the keys on the session's lease and deals with the remembered ones among them.
async fn sweep_once(session: &WeakSession, client: &Client) -> Result<()> {
    // Background work, as a dropped guard's release: bounded by the release timeout, not
    // by the (perhaps shorter) request timeout, which would leave the keys it is for on a
    // link slower than that.
    let Some((lease, limit)) = session
        .upgrade()
        .map(|live| (live.lease_id(), live.release_timeout()))
    else {
        return Ok(());
    };
    let listed = retry(client, "LeaseTimeToLive", limit, |client| {
        let mut leases = client.lease_client();
        async move {
            let keys = LeaseTimeToLiveOptions::new().with_keys();
            leases.time_to_live(lease, Some(keys)).await
        }
    })
    .await;
    let Some(live) = session.upgrade() else {
        return Ok(());
    };
    let to_read: Vec<Vec<u8>> = match listed {
        // etcd no longer knows the lease, or is about to revoke it: its keys go with it.
        // The keep-alive, not this one answer, decides whether the session is lost.
        Ok(answer) if answer.ttl() < 0 => return Ok(()),
        Ok(answer) => {
            let on_lease: HashSet<&[u8]> = answer.keys().iter().map(Vec::as_slice).collect();
            let mut present = Vec::new();
            for (key, remembered) in &mut live.late_joins().keys {
                match on_lease.contains(key.as_slice()) {
                    true => present.push(key.clone()),
                    false => remembered.suspect = None,
                }
            }
            present
        }
        // The application may have put keys of its own on the session's lease: their
        // names may take more than the client's answer limit, or (etcd 3.4.26+ and
        // 3.5.9+, #15656) the user may not read them all. Read every remembered key.
        Err(error) if !error.is_transient() => {
            tracing::debug!(
                error = &error as &dyn std::error::Error,
                "cannot list the keys on the lease; reading each remembered key"
            );
            live.late_joins().keys.keys().cloned().collect()
        }
        Err(error) => return Err(error),
    };
    drop(live);
    // A key refused for what it is (its read permission revoked, say) does not keep the
    // sweep from the keys after it; the first such refusal is returned at the end.
    let mut refused = None;
    for key in to_read {
        let read = retry(client, "Range", limit, |client| {
            let (mut kv, key) = (client.kv_client(), key.clone());
            async move { kv.get(key, Some(GetOptions::new().with_keys_only())).await }
        });
        let found = match read.await {
            Ok(found) => found,
            Err(error) if !error.is_transient() => {
                refused.get_or_insert(error);
                continue;
            }
            Err(error) => return Err(error),
        };
        let incarnation = found
            .kvs()
            .first()
            .filter(|kv| kv.lease() == lease)
            .map(|kv| kv.create_revision());
        let Some(live) = session.upgrade() else {
            return Ok(());
        };
        let Some((name, owner, Some(suspect))) = live
            .late_joins()
            .keys
            .get_mut(&key)
            .map(|remembered| remembered.suspect_at(incarnation))
        else {
            continue;
        };
        drop(live);
        let left = settle(session, &name, &key, owner, suspect).await;
        if let Some(live) = session.upgrade() {
            if let Some(remembered) = live.late_joins().keys.get_mut(&key) {
                remembered.suspect = left;
            }
        }
    }
    refused.map_or(Ok(()), Err)
}

impl Remembered {
    /// The key's name and owner, and the incarnation found (create revision), if any, as
    /// a suspect to settle: the one the last sweep left, if it is the same.
    fn suspect_at(&mut self, incarnation: Option<i64>) -> (Vec<u8>, Owner, Option<Suspect>) {
        let earlier = self.suspect.take();
        let suspect = incarnation.map(|revision| match earlier {
            Some(earlier) if earlier.revision == revision => earlier,
            _ => Suspect {
                revision,
                told: false,
            },
        });
        (self.name.clone(), self.owner, suspect)
    }
}

/// Deals with `suspect` as far as it can without waiting: returns it if it must wait
/// (a handle of the session holds the key's slot or claim).
async fn settle(
    session: &WeakSession,
    name: &[u8],
    key: &[u8],
    owner: Owner,
    suspect: Suspect,
) -> Option<Suspect> {
    let live = session.upgrade()?;
    if live.was_joined(key, suspect.revision) {
        return None;
    }
    match owner {
        Owner::Mutex => {
            // A join holds the slot from before its Txn until its key is gone, and notes
            // what it takes up while it holds it: unnoted once the slot is free, the
            // incarnation is a late one. The slot is only tried, never queued for, so
            // that a `try_lock` of the session finds it taken only while a late key is
            // being deleted.
            let Ok(held) = live.queue_slot(name).try_lock_owned() else {
                return Some(suspect);
            };
            if live.was_joined(key, suspect.revision) {
                return None;
            }
            drop(live);
            tracing::debug!(
                suspect.revision,
                "withdrawing a lock key made by a late join"
            );
            release_while_session_lives(session.clone(), key, suspect.revision).await;
            drop(held);
            None
        }
        Owner::Election => {
            // Tell the campaigns and leaderships holding the claim, so that the last of
            // them to go looks for the key; with none left, delete it under the claim.
            let unknown = live.unknown_election_key(name);
            drop(live);
            let last = match suspect.told {
                false => unknown.note(),
                true => unknown.settle(),
            };
            match last {
                Some(Some(last)) => {
                    tracing::debug!(suspect.revision, "withdrawing an election key made late");
                    release_lease_key(session.clone(), key).await;
                    drop(last);
                    None
                }
                Some(None) if suspect.told => None, // one of them took the note
                Some(None) => Some(Suspect {
                    told: true,
                    ..suspect
                }),
                None => Some(suspect),
            }
        }
    }
}
